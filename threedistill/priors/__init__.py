"""Frozen 2D diffusion priors: the interface, the diffusers loader, and name resolution.

``prior.name`` is looked up in this order: a built-in prior (:data:`BUILTIN_PRIORS`), a local
diffusers pipeline folder, a Hugging Face hub id already in the local cache. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import torch

from threedistill.errors import MissingWeightsError
from threedistill.priors.base import DiffusionPrior, PriorConfig, PromptEmbeddings, view_prompt
from threedistill.priors.diffusers_prior import DiffusersPrior, resolve_dtype, resolve_pipeline_path

#: The repository's ``assets/`` folder (next to ``configs/``): the shipped prior and classifier.
ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "assets"
#: Where the shipped shapes-world prior (the built-in name ``shapes``) lives: a diffusers pipeline
#: folder trained by ``threedistill prior train`` (:mod:`threedistill.shapes.prior`).
SHIPPED_PRIOR = ASSETS_DIR / "shapes-prior"


def _shapes_prior(cfg_prior: Any, device: torch.device) -> DiffusionPrior:
    """The shipped shapes-world prior: an ordinary pipeline folder, loaded by the generic loader."""
    if not (SHIPPED_PRIOR / "model_index.json").is_file():
        raise MissingWeightsError(
            f"built-in prior 'shapes' not found at '{SHIPPED_PRIOR}' (it ships with the repository: use an "
            f"editable install of a full clone, `pip install -e .`, or train one with `threedistill prior train DIR` "
            f"and set prior.name=DIR/pipeline)")
    return DiffusersPrior(SHIPPED_PRIOR, device=device, dtype=getattr(cfg_prior, "dtype", "auto"), name="shapes")


#: Built-in priors by name: ``factory(cfg_prior, device) -> DiffusionPrior``. Checked before any
#: path or hub lookup.
BUILTIN_PRIORS: Dict[str, Callable[[Any, torch.device], DiffusionPrior]] = {"shapes": _shapes_prior}


def check_prior_available(cfg_prior: Any) -> None:
    """Raise the loader's one-line error now when the prior's weights cannot be found (a built-in
    name, a pipeline folder, or a hub id in the local cache); loads no weights."""
    if str(cfg_prior.name) not in BUILTIN_PRIORS:
        resolve_pipeline_path(str(cfg_prior.name), getattr(cfg_prior, "revision", None),
                              getattr(cfg_prior, "cache_dir", None))


def load_prior(cfg_prior: Any, device: str | torch.device = "cpu") -> DiffusionPrior:
    """Load the frozen prior described by the ``prior`` config group (``name``, ``revision``,
    ``dtype``, ``cache_dir``) onto ``device`` ("auto" picks CUDA when available).

    Raises :class:`~threedistill.errors.MissingWeightsError` / :class:`~threedistill.errors.UserError`
    with a one-line message when the weights cannot be found or are not a usable pipeline.
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name = str(cfg_prior.name)
    factory = BUILTIN_PRIORS.get(name)
    if factory is not None:
        return factory(cfg_prior, device)
    return DiffusersPrior.from_pretrained(
        name,
        device=device,
        dtype=getattr(cfg_prior, "dtype", "auto"),
        revision=getattr(cfg_prior, "revision", None),
        cache_dir=getattr(cfg_prior, "cache_dir", None),
    )


def __getattr__(name: str) -> Any:
    # ``write_tiny_pipeline`` is imported lazily so that ``python -m threedistill.priors.tiny`` does
    # not find its own module already imported by this package (runpy warns about that).
    if name == "write_tiny_pipeline":
        from threedistill.priors.tiny import write_tiny_pipeline

        return write_tiny_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ASSETS_DIR",
    "BUILTIN_PRIORS",
    "check_prior_available",
    "DiffusionPrior",
    "DiffusersPrior",
    "PriorConfig",
    "PromptEmbeddings",
    "load_prior",
    "resolve_dtype",
    "resolve_pipeline_path",
    "SHIPPED_PRIOR",
    "view_prompt",
    "write_tiny_pipeline",
]
