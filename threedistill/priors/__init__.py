"""Frozen 2D diffusion priors: the interface, the diffusers loader, and name resolution.

``prior.name`` is looked up in this order: a built-in prior (:data:`BUILTIN_PRIORS`), a local
diffusers pipeline folder, a Hugging Face hub id: from the local cache, or downloaded into it on
first use (only the components a prior loads) unless offline (``HF_HUB_OFFLINE=1`` or
``prior.offline=true``).

:class:`PriorCache` holds loaded priors keyed by what changes the loaded weights (name, revision,
variant, dtype, cache dir, device, speed and memory settings); the other ``prior`` keys (negative prompt, view-dependent prompts) are
read per run by the guidance, so runs that differ only there share one loaded prior. The pipeline
(a refine stage shares its coarse run's prior), the web app and the batch workers use it.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from threedistill.devices import resolve_device
from threedistill.errors import MissingWeightsError
from threedistill.priors.base import (DiffusionPrior, PriorConfig, PromptEmbeddings, attention_slice, offload_setting,
                                     resolve_prior_device, view_prompt)
from threedistill.priors.diffusers_prior import (DiffusersPrior, hub_allow_patterns, hub_offline, resolve_dtype,
                                                resolve_pipeline_path)

#: The shipped weights (the shapes prior and the evaluation classifier): package data of
#: ``threedistill`` (``threedistill/assets``), found from any working directory, in a clone or a wheel.
ASSETS_DIR = Path(str(importlib.resources.files("threedistill") / "assets"))
#: Where the shipped shapes-world prior (the built-in name ``shapes``) lives: a diffusers pipeline
#: folder trained by ``threedistill prior train`` (:mod:`threedistill.shapes.prior`).
SHIPPED_PRIOR = ASSETS_DIR / "shapes-prior"


def _shapes_prior(cfg_prior: Any, device: torch.device) -> DiffusionPrior:
    """The shipped shapes-world prior: an ordinary pipeline folder, loaded by the generic loader."""
    if not (SHIPPED_PRIOR / "model_index.json").is_file():
        raise MissingWeightsError(
            f"built-in prior 'shapes' not found at '{SHIPPED_PRIOR}' (it is package data of threedistill: "
            f"reinstall the package, or train one with `threedistill prior train DIR` and set prior.name=DIR/pipeline)")
    return DiffusersPrior(SHIPPED_PRIOR, device=device, dtype=getattr(cfg_prior, "dtype", "auto"), name="shapes",
                          **_efficiency(cfg_prior))


def _efficiency(cfg_prior: Any) -> Dict[str, Any]:
    """The ``prior`` group's speed and memory settings, as :class:`DiffusersPrior` takes them."""
    slicing = attention_slice(getattr(cfg_prior, "attention_slicing", "off"))
    return {"channels_last": str(getattr(cfg_prior, "channels_last", "auto")).strip().lower(),
            "attention_slicing": "off" if slicing is None else str(slicing),
            "offload": offload_setting(getattr(cfg_prior, "offload", "auto")),
            "encoder_checkpointing": str(getattr(cfg_prior, "encoder_checkpointing", "false")).strip().lower()}


#: Built-in priors by name: ``factory(cfg_prior, device) -> DiffusionPrior``. Checked before any
#: path or hub lookup.
BUILTIN_PRIORS: Dict[str, Callable[[Any, torch.device], DiffusionPrior]] = {"shapes": _shapes_prior}


def check_prior_available(cfg_prior: Any) -> None:
    """Raise the loader's one-line error now when the prior's weights cannot be had (a built-in name,
    a pipeline folder, a hub id in the local cache, or, when online, any valid hub id: it is
    downloaded when the run loads it); loads no weights and downloads nothing. A ``prior.device``
    this machine does not have is an error too."""
    device = getattr(cfg_prior, "device", "auto")
    if device is not None and str(device) != "auto":
        resolve_prior_device(str(device), torch.device("cpu"))
    if str(cfg_prior.name) not in BUILTIN_PRIORS:
        resolve_pipeline_path(str(cfg_prior.name), getattr(cfg_prior, "revision", None),
                              getattr(cfg_prior, "cache_dir", None), variant=getattr(cfg_prior, "variant", None),
                              offline=bool(getattr(cfg_prior, "offline", False)), download=False)


def load_prior(cfg_prior: Any, device: str | torch.device = "cpu") -> DiffusionPrior:
    """Load the frozen prior described by the ``prior`` config group (``name``, ``revision``,
    ``variant``, ``dtype``, ``cache_dir``, ``offline``, and the speed and memory settings) onto
    ``prior.device``, or ``device`` (the run's; "auto" picks CUDA when available) when that is auto. A hub id not in the cache is downloaded first unless offline.

    Raises :class:`~threedistill.errors.MissingWeightsError` / :class:`~threedistill.errors.UserError`
    with a one-line message when the weights cannot be found or are not a usable pipeline.
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_prior_device(getattr(cfg_prior, "device", "auto"), torch.device(device))
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
        variant=getattr(cfg_prior, "variant", None),
        offline=bool(getattr(cfg_prior, "offline", False)),
        **_efficiency(cfg_prior),
    )


PriorKey = Tuple[str, Optional[str], Optional[str], str, Optional[str], str, str, str, str, str]


def prior_key(cfg_prior: Any, device: str | torch.device) -> PriorKey:
    """(name, revision, variant, dtype, cache_dir, device, channels_last, attention_slicing, offload,
    encoder_checkpointing):
    what the loaded weights and their layout depend on. ``device`` is the run's; ``prior.device``
    replaces it unless auto."""
    revision = getattr(cfg_prior, "revision", None)
    variant = getattr(cfg_prior, "variant", None)
    cache_dir = getattr(cfg_prior, "cache_dir", None)
    return (str(cfg_prior.name), None if revision is None else str(revision), None if variant is None else str(variant),
            str(getattr(cfg_prior, "dtype", "auto")), None if cache_dir is None else str(cache_dir),
            str(resolve_prior_device(getattr(cfg_prior, "device", "auto"), resolve_device(str(device)))),
            *_efficiency(cfg_prior).values())


class PriorCache:
    """Loaded priors by :func:`prior_key`; thread-safe. ``max_entries`` (None: unbounded) keeps the
    most recently used ones (a batch worker keeps one, to bound its memory)."""

    def __init__(self, max_entries: Optional[int] = None):
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._priors: "OrderedDict[PriorKey, DiffusionPrior]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cfg_prior: Any, device: str | torch.device) -> DiffusionPrior:
        """The prior of the ``prior`` config group on ``device``, loaded on first use."""
        key = prior_key(cfg_prior, device)
        with self._lock:
            if key in self._priors:
                self._priors.move_to_end(key)
                return self._priors[key]
            if self.max_entries is not None:
                while len(self._priors) >= self.max_entries:
                    self._priors.popitem(last=False)  # free the old weights before loading new ones
            prior = load_prior(cfg_prior, device)
            self._priors[key] = prior
            return prior

    def __len__(self) -> int:
        return len(self._priors)

    def __contains__(self, key: PriorKey) -> bool:
        return key in self._priors


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
    "hub_allow_patterns",
    "hub_offline",
    "PriorConfig",
    "PromptEmbeddings",
    "load_prior",
    "PriorCache",
    "PriorKey",
    "prior_key",
    "resolve_dtype",
    "resolve_pipeline_path",
    "SHIPPED_PRIOR",
    "view_prompt",
    "write_tiny_pipeline",
]
