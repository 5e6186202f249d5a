"""A :class:`DiffusionPrior` over a diffusers pipeline folder, loaded component by component.

Supported layouts (read from the folder's ``model_index.json``):

* **Latent** pipelines like Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` + ``AutoencoderKL``
  + a CLIP text encoder and tokenizer + any scheduler with ``alphas_cumprod``. Model space is the
  VAE latent (the posterior mean times ``vae.config.scaling_factor``).
* **Pixel** pipelines like DeepFloyd IF stage I: no VAE; the UNet sees RGB in [-1, 1] and predicts
  6 channels (epsilon + learned variance, ``variance_type="learned_range"``); the text encoder is
  T5 (whose attention mask is used) or CLIP.

Only ``unet``, ``text_encoder``, ``tokenizer``, ``vae`` and ``scheduler`` are loaded; safety checkers,
feature extractors, watermarkers and the like are ignored. Weights come from a local pipeline folder
or a hub id in the Hugging Face cache; a hub id not in the cache is downloaded on first use (only
those components: :func:`hub_allow_patterns`) unless offline (``HF_HUB_OFFLINE=1`` or
``prior.offline=true``).

The sub-models are frozen and deliberately *not* registered as ``nn.Module`` children, so the prior
contributes nothing to the caller's ``state_dict()``, ``parameters()`` or optimizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from threedistill.errors import MissingWeightsError, UserError
from threedistill.priors.base import DiffusionPrior, attention_slice, offload_setting

logger = logging.getLogger(__name__)

#: Components read from ``model_index.json``; every other entry is ignored.
REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_COMPONENTS = ("vae",)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Token budget when the tokenizer reports no real limit (``model_max_length`` ~ 1e30).
_DEFAULT_MAX_TOKENS = 77


# ----------------------------------------------------------------------------------------------
# Name resolution
# ----------------------------------------------------------------------------------------------
def _hf_cache_dir(cache_dir: Optional[str | Path]) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


#: The components whose weights a prior loads (the scheduler and tokenizer have no weights).
WEIGHT_COMPONENTS = ("text_encoder", "unet", "vae")
#: Weight file stems: diffusers models and transformers models.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def _weight_patterns(component: str, variant: Optional[str]) -> List[str]:
    """Safetensors weight files of one component, single or sharded, of exactly this variant (None:
    the plain files, not ``*.fp16.*``): diffusers names shards ``stem-00001-of-00002.fp16.safetensors``,
    transformers ``stem.fp16-00001-of-00002.safetensors``."""
    patterns = []
    for stem in _WEIGHT_STEMS:
        if variant:
            patterns += [f"{component}/{stem}.{variant}.safetensors", f"{component}/{stem}-*-of-*.{variant}.safetensors",
                         f"{component}/{stem}.{variant}-*-of-*.safetensors"]
        else:
            patterns += [f"{component}/{stem}.safetensors", f"{component}/{stem}-*-of-*.safetensors"]
    return patterns


def hub_allow_patterns(variant: Optional[str] = None) -> List[str]:
    """What a download of a hub pipeline fetches: ``model_index.json``, the scheduler and tokenizer
    files, and the configs and safetensors weights (of ``variant``, e.g. "fp16", or the plain ones)
    of the text encoder, UNet and VAE. No safety checker, feature extractor, other variants, ``.bin``
    duplicates or EMA copies."""
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*"]
    for component in WEIGHT_COMPONENTS:
        patterns += [f"{component}/*.json", *_weight_patterns(component, variant)]
    return patterns


def _component_weights_present(folder: Path, component: str, variant: Optional[str]) -> bool:
    sub = folder / component
    if not sub.is_dir():
        return False
    patterns = _weight_patterns(component, variant)
    return any(fnmatch.fnmatch(f"{component}/{p.name}", pat) for p in sub.iterdir() for pat in patterns)


def _missing_weights(folder: Path, variant: Optional[str]) -> Optional[List[str]]:
    """The weight components of ``folder``'s pipeline without weight files of ``variant``; None when
    the folder has no readable ``model_index.json`` (not a complete download)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(index, dict):
        return None
    return [c for c in WEIGHT_COMPONENTS if _component_entry(index, c)
            and not _component_weights_present(folder, c, variant)]


def hub_offline(offline: bool = False) -> bool:
    """Whether hub ids are looked up in the local cache only: ``prior.offline`` or ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    return bool(offline) or bool(constants.HF_HUB_OFFLINE)


def resolve_pipeline_path(name: str, revision: Optional[str] = None, cache_dir: Optional[str | Path] = None,
                          variant: Optional[str] = None, offline: bool = False,
                          download: bool = True) -> Optional[Path]:
    """The folder holding the diffusers pipeline called ``name``.

    ``name`` is (a) a local folder with a ``model_index.json``, or (b) a Hugging Face hub id: its
    snapshot in the local cache (``cache_dir``, default ``HF_HUB_CACHE``) when that has the weights
    (of ``variant``), else downloaded into the cache now, only the components a prior loads
    (:func:`hub_allow_patterns`, with a progress bar). Offline (``offline`` or ``HF_HUB_OFFLINE=1``)
    nothing is downloaded. With ``download=False`` (a check before the run) a hub id that would be
    downloaded returns None.

    Raises :class:`MissingWeightsError` (one line: what was looked for, where, and how to get it:
    offline, gated, missing repo or revision, no network) or :class:`UserError` for a folder that is
    not a pipeline.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        _check_model_index(local, name)
        return local
    if local.exists():
        raise UserError(f"prior '{name}' is a file, not a diffusers pipeline folder (a folder with model_index.json)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = _hf_cache_dir(cache_dir)
    where = f"no pipeline folder at '{local.absolute()}'"
    offline = hub_offline(offline)
    patterns = hub_allow_patterns(variant)
    try:
        snapshot: Optional[Path] = Path(snapshot_download(repo_id=name, revision=revision, cache_dir=str(cache),
                                                          local_files_only=True, allow_patterns=patterns))
    except HFValidationError:
        raise MissingWeightsError(
            f"prior '{name}' not found: {where}, and it is not a valid Hugging Face hub id, so the cache at "
            f"'{cache}' was not searched. Set prior.name to a local diffusers pipeline folder or a hub id "
            f"(e.g. stabilityai/stable-diffusion-2-1-base)."
        ) from None
    except OSError:  # LocalEntryNotFoundError: this repo / revision is not in the cache
        snapshot = None
    if snapshot is not None and (offline or _missing_weights(snapshot, variant) == []):
        _check_model_index(snapshot, name, from_hub_cache=True)
        return snapshot
    if offline:
        revision_note = f" (revision '{revision}')" if revision else ""
        revision_flag = f" --revision {revision}" if revision else ""
        raise MissingWeightsError(
            f"prior '{name}'{revision_note} not found: {where} and not in the Hugging Face cache at '{cache}' "
            f"(offline: HF_HUB_OFFLINE=1 or prior.offline=true, so nothing is downloaded). Download it on a machine "
            f"with network (`hf download {name}{revision_flag}`) and copy the cache, or set prior.name to a local "
            f"diffusers pipeline folder."
        ) from None
    if not download:
        return None
    snapshot = _download(name, revision, cache, variant, patterns, where)
    _check_model_index(snapshot, name, from_hub_cache=True)
    missing = _missing_weights(snapshot, variant)
    if missing:
        kind = f"'{variant}' variant" if variant else "plain (non-variant)"
        raise MissingWeightsError(
            f"prior '{name}': the repo has no {kind} safetensors weights for {', '.join(missing)}: check prior.variant "
            f"(e.g. prior.variant=fp16, or unset it) or use a pipeline saved with safetensors"
        )
    return snapshot


#: How to authenticate, for the gated / private messages.
_LOGIN_HINT = "log in with `hf auth login` (older versions: `huggingface-cli login`) or set HF_TOKEN"


def _download(name: str, revision: Optional[str], cache: Path, variant: Optional[str], patterns: List[str],
              where: str) -> Path:
    """``snapshot_download`` of the prior's components into ``cache``; hub errors become one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    what = f"prior '{name}'" + (f" revision '{revision}'" if revision else "") + (f" ({variant} weights)" if variant else "")
    logger.warning("%s is not in the Hugging Face cache at '%s': downloading its text encoder, tokenizer, UNet, VAE "
                   "and scheduler (once; offline: HF_HUB_OFFLINE=1 or prior.offline=true)", what, cache)
    try:
        return Path(snapshot_download(repo_id=name, revision=revision, cache_dir=str(cache), allow_patterns=patterns))
    except GatedRepoError:
        raise MissingWeightsError(
            f"prior '{name}' is a gated model: accept its license on https://huggingface.co/{name} with your account, "
            f"then {_LOGIN_HINT}"
        ) from None
    except RevisionNotFoundError:
        raise MissingWeightsError(
            f"prior '{name}': revision '{revision}' not found on the Hugging Face hub: check prior.revision (a branch, "
            f"tag or commit of the repo)"
        ) from None
    except RepositoryNotFoundError:
        raise MissingWeightsError(
            f"prior '{name}' not found: {where}, and the Hugging Face hub has no repo '{name}' that you can see: check "
            f"prior.name (a local pipeline folder or a hub id), or {_LOGIN_HINT} if it is private"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, Exception) as e:  # no network, hub errors, disk full
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingWeightsError(
            f"prior '{name}' could not be downloaded into '{cache}' ({first_line}): check the network and the disk, or "
            f"download it where there is network (`hf download {name}`) and copy the cache"
        ) from e


def _check_model_index(folder: Path, name: str, from_hub_cache: bool = False) -> Dict[str, Any]:
    """Read ``folder/model_index.json`` and check it names the components a prior needs."""
    index_path = folder / "model_index.json"
    if not index_path.is_file() and from_hub_cache:
        raise UserError(
            f"prior '{name}': the cached snapshot at '{folder}' has no model_index.json: the repo is not a diffusers "
            f"pipeline or was only partly downloaded (`hf download {name}` fetches all of it)"
        )
    if not index_path.is_file():
        raise UserError(
            f"prior '{name}': folder '{folder}' has no model_index.json, so it is not a diffusers pipeline folder "
            f"(write one with `pipeline.save_pretrained(folder)` or point prior.name at the pipeline's top folder)"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"prior '{name}': cannot read '{index_path}': {str(e).splitlines()[0]}") from None
    if not isinstance(index, dict):
        raise UserError(f"prior '{name}': '{index_path}' is not a JSON object")
    missing = [c for c in REQUIRED_COMPONENTS if not _component_entry(index, c)]
    if missing:
        raise UserError(
            f"prior '{name}': '{index_path}' has no {', '.join(missing)} component; a prior needs a text-conditioned "
            f"UNet pipeline with unet, text_encoder, tokenizer and scheduler (e.g. Stable Diffusion 1.x/2.x, DeepFloyd IF stage I)"
        )
    return index


def _component_entry(index: Dict[str, Any], component: str) -> Optional[tuple[str, str]]:
    """``(library, class_name)`` for a component of ``model_index.json``; None when absent or null."""
    entry = index.get(component)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None or entry[1] is None:
        return None
    return str(entry[0]), str(entry[1])


# ----------------------------------------------------------------------------------------------
# Loading helpers
# ----------------------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> fp16 on CUDA, fp32 elsewhere; fp16 on CPU falls back to fp32 (with a warning)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise UserError(f"prior dtype must be auto, fp32, fp16 or bf16, got '{dtype}'")
    if resolved == torch.float16 and device.type == "cpu":
        logger.warning("prior.dtype=fp16 is not supported on CPU; using fp32")
        resolved = torch.float32
    return resolved


def _import_component_class(library: str, class_name: str, component: str, name: str) -> type:
    if library == "diffusers":
        import diffusers as module
    elif library == "transformers":
        import transformers as module
    else:
        raise UserError(
            f"prior '{name}': component '{component}' comes from library '{library}'; only diffusers and "
            f"transformers components can be loaded"
        )
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(
            f"prior '{name}': component '{component}' is a {library}.{class_name}, which the installed {library} "
            f"{module.__version__} does not have (upgrade {library})"
        )
    return cls


def _weights_variant(folder: Path) -> Optional[str]:
    """The variant (e.g. ``"fp16"``) to load when a folder has only variant weight files, such as
    ``diffusion_pytorch_model.fp16.safetensors``; None when plain weights exist."""
    if not folder.is_dir():
        return None
    weights = [p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))]
    variants = set()
    for file_name in weights:
        parts = file_name.split(".")
        if len(parts) >= 3 and parts[1] not in ("safetensors", "bin"):
            variants.add(parts[1].split("-")[0])
        else:
            return None
    return sorted(variants)[0] if variants else None


def _load_component(folder: Path, component: str, library: str, class_name: str, name: str,
                    dtype: torch.dtype, variant: Optional[str] = None) -> Any:
    cls = _import_component_class(library, class_name, component, name)
    sub = folder / component
    kwargs: Dict[str, Any] = {"local_files_only": True}
    is_model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    if is_model:
        # diffusers calls it torch_dtype; transformers 5 renamed it to dtype.
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
        if library == "diffusers" and importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning
        if variant is not None and not _component_weights_present(folder, component, variant):
            logger.warning("prior '%s': no %s weights for %s in '%s'; loading the ones there", name, variant, component, sub)
            variant = None
        variant = variant if variant is not None else _weights_variant(sub)
        if variant is not None:
            kwargs["variant"] = variant
    try:
        with quiet_transformers_progress():
            obj = cls.from_pretrained(sub, **kwargs)
    except Exception as e:  # corrupt / partial files: report one line, keep the cause chained
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingWeightsError(
            f"prior '{name}': could not load component '{component}' ({class_name}) from '{sub}': {first_line} "
            f"(re-download or re-save the pipeline)"
        ) from e
    if is_model:
        obj.eval()
        obj.requires_grad_(False)
    return obj


@contextlib.contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """transformers 5 shows a progress bar on every save / load ("Writing model shards", "Loading
    weights"), even for tiny files; hide it inside this block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _square_size(sample_size: Any) -> int:
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise UserError(f"non-square UNet sample_size {tuple(sample_size)} is not supported")
        return int(sample_size[0])
    return int(sample_size)


# ----------------------------------------------------------------------------------------------
# The prior
# ----------------------------------------------------------------------------------------------
class DiffusersPrior(DiffusionPrior):
    """Frozen diffusers pipeline (latent SD-like or pixel IF-like) in epsilon form.

    ``path`` is a pipeline folder (see :func:`resolve_pipeline_path` for names and hub ids);
    ``dtype`` is "auto" | "fp32" | "fp16" | "bf16" or a ``torch.dtype``. The device is fixed at
    construction (``prior.to()`` does not move the frozen sub-models).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                 name: Optional[str] = None, variant: Optional[str] = None, channels_last: Any = "auto",
                 attention_slicing: Any = "off", offload: str = "auto", encoder_checkpointing: Any = "false") -> None:
        super().__init__()
        folder = Path(path)
        self.name = name if name is not None else str(path)
        index = _check_model_index(folder, self.name)
        device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)

        # A plain dict: the sub-models stay out of state_dict(), parameters() and .train().
        self._models: Dict[str, Any] = {}
        for component in REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS:
            entry = _component_entry(index, component)
            if entry is None:
                continue
            obj = _load_component(folder, component, entry[0], entry[1], self.name, self.dtype,
                                  variant if component in WEIGHT_COMPONENTS else None)
            if isinstance(obj, torch.nn.Module):
                obj.to(device)
            self._models[component] = obj

        unet_cfg = self.unet.config
        self.is_latent = self.vae is not None
        self.model_channels: int = int(unet_cfg.in_channels)
        self.model_size: int = _square_size(unet_cfg.sample_size)
        if self.is_latent:
            latent_channels = int(self.vae.config.latent_channels)
            if self.model_channels != latent_channels:
                raise UserError(
                    f"prior '{self.name}': UNet takes {self.model_channels} channels but the VAE has {latent_channels} "
                    f"latent channels (inpainting / depth-conditioned pipelines are not supported)"
                )
            self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.image_resolution = self.model_size * self.vae_scale_factor
        else:
            if self.model_channels != 3:
                raise UserError(
                    f"prior '{self.name}': a pixel-space UNet must take 3 channels, this one takes {self.model_channels} "
                    f"(super-resolution stages are not supported; use a stage I pipeline)"
                )
            self.vae_scale_factor = 1
            self.image_resolution = self.model_size
        out_channels = int(unet_cfg.out_channels)
        # Learned variance (IF, guided-diffusion): [eps, variance] along channels; keep eps.
        self.learned_variance: bool = out_channels == 2 * self.model_channels
        if out_channels not in (self.model_channels, 2 * self.model_channels):
            raise UserError(f"prior '{self.name}': UNet predicts {out_channels} channels for {self.model_channels} inputs")

        scheduler = self.scheduler
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            raise UserError(f"prior '{self.name}': scheduler {type(scheduler).__name__} has no alphas_cumprod (use a DDPM/DDIM-style scheduler)")
        self.alphas_cumprod = torch.as_tensor(abar, dtype=torch.float32).to(device)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type: str = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"prior '{self.name}': unsupported prediction_type '{self.prediction_type}' (epsilon, v_prediction or sample)")

        text_cfg = self.text_encoder.config
        # CLIP (SD) ignores padding by design (causal mask, EOS pooling); T5 (IF) needs the mask.
        self.uses_text_mask: bool = (not str(getattr(text_cfg, "model_type", "")).startswith("clip")
                                     or bool(getattr(text_cfg, "use_attention_mask", False)))
        max_len = int(getattr(self.tokenizer, "model_max_length", _DEFAULT_MAX_TOKENS))
        self.max_text_tokens: int = _DEFAULT_MAX_TOKENS if max_len > 4096 else max_len
        self._text_cache: Dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self._apply_efficiency(device, channels_last, attention_slicing, offload)
        flag = str(encoder_checkpointing).strip().lower()
        #: Gradient checkpointing of the VAE encoder (only acts when the encode runs with autograd).
        self.encoder_checkpointing: bool = self.is_latent and (
            flag == "true" or (flag == "auto" and device.type == "cuda" and self.image_resolution >= 256))
        if self.encoder_checkpointing:
            self.vae.enable_gradient_checkpointing()

    # -- speed and memory -------------------------------------------------------------------------
    def _apply_efficiency(self, device: torch.device, channels_last: Any, attention_slicing: Any, offload: str) -> None:
        """The ``prior`` group's speed and memory settings (see :class:`~threedistill.priors.base.PriorConfig`):
        attention slicing (else the fused SDPA processors diffusers picks on torch 2, checked and
        logged), channels_last UNet and VAE, and, on CUDA, the text encoder and VAE decoder resting
        in CPU memory between their rare uses."""
        slicing = attention_slice(attention_slicing)
        if slicing is not None:
            self.unet.set_attention_slice(slicing)
        #: Class names of the UNet's attention processors, e.g. ``["AttnProcessor2_0"]`` (SDPA).
        self.attention_processors: List[str] = sorted({type(p).__name__ for p in self.unet.attn_processors.values()})
        #: Whether every attention call of the UNet goes through torch's scaled_dot_product_attention.
        self.uses_sdpa: bool = self.attention_processors == ["AttnProcessor2_0"]
        flag = str(channels_last).strip().lower()
        self.channels_last: bool = flag == "true" or (flag == "auto" and device.type == "cuda")
        if self.channels_last:
            for model in (self.unet, self.vae):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        self.offload: bool = offload_setting(offload) == "auto" and device.type == "cuda"
        for module in self._offloaded_modules():
            module.to("cpu")
        logger.info("prior '%s' on %s (%s): attention %s%s, channels_last %s, text encoder and VAE decoder %s",
                    self.name, device, self.dtype, "/".join(self.attention_processors),
                    " (SDPA)" if self.uses_sdpa else (" (sliced)" if slicing is not None else " (not SDPA)"),
                    "on" if self.channels_last else "off",
                    "in CPU memory between uses" if self.offload else f"on {device}")
        if slicing is None and not self.uses_sdpa:
            logger.warning("prior '%s': the UNet's attention does not use torch's fused SDPA kernel (%s); it is "
                           "slower and needs more memory", self.name, ", ".join(self.attention_processors))

    def _offloaded_modules(self) -> List[torch.nn.Module]:
        """The sub-models that rest in CPU memory between uses (``prior.offload``): the text encoder
        and the VAE's decoder half."""
        if not self.offload:
            return []
        mods: List[torch.nn.Module] = [self.text_encoder]
        if self.vae is not None:
            mods += [m for m in (getattr(self.vae, "decoder", None), getattr(self.vae, "post_quant_conv", None))
                     if isinstance(m, torch.nn.Module)]
        return mods

    @contextlib.contextmanager
    def _on_device(self, *modules: Optional[torch.nn.Module]) -> Iterator[None]:
        """Offloaded ``modules`` on the prior's device for the block, back in CPU memory after it."""
        moved = [m for m in modules if m is not None and m in self._offloaded_modules()]
        for m in moved:
            m.to(self.device)
        try:
            yield
        finally:
            for m in moved:
                m.to("cpu")

    @classmethod
    def from_pretrained(cls, name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                        revision: Optional[str] = None, cache_dir: Optional[str | Path] = None,
                        variant: Optional[str] = None, offline: bool = False, **efficiency: Any) -> "DiffusersPrior":
        """Resolve ``name`` (a local folder, or a hub id from the cache or downloaded into it on first
        use unless offline, see :func:`resolve_pipeline_path`) and load it (``variant``: e.g. "fp16";
        ``efficiency``: the constructor's ``channels_last``, ``attention_slicing``, ``offload`` and
        ``encoder_checkpointing``)."""
        path = resolve_pipeline_path(name, revision=revision, cache_dir=cache_dir, variant=variant, offline=offline)
        return cls(path, device=device, dtype=dtype, name=name, variant=variant, **efficiency)

    # -- components ---------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        return self._models["unet"]

    @property
    def vae(self) -> Optional[torch.nn.Module]:
        return self._models.get("vae")

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self._models["text_encoder"]

    @property
    def tokenizer(self) -> Any:
        return self._models["tokenizer"]

    @property
    def scheduler(self) -> Any:
        return self._models["scheduler"]

    def extra_repr(self) -> str:
        kind = "latent" if self.is_latent else "pixel"
        return (f"name={self.name!r}, {kind}, resolution={self.image_resolution}, dtype={self.dtype}, "
                f"prediction_type={self.prediction_type}, device={self.device}")

    def model_space_shape(self, batch_size: int) -> tuple[int, ...]:
        """``(B, C, s, s)``: e.g. ``(B, 4, 64, 64)`` for SD at 512, ``(B, 3, 64, 64)`` for IF stage I."""
        return (batch_size, self.model_channels, self.model_size, self.model_size)

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: List[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``prompts`` (N strings) -> embeddings ``[N, L, D]`` (model dtype) and attention mask ``[N, L]``
        (long, 1 = token) for encoders that need one (T5), else None. ``L`` is the tokenizer's
        ``model_max_length`` (77 when it reports none). Each distinct string is encoded once and cached."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if todo:
            tokens = self.tokenizer(todo, padding="max_length", max_length=self.max_text_tokens,
                                    truncation=True, return_tensors="pt")
            ids = tokens.input_ids.to(self.device)
            mask = tokens.attention_mask.to(self.device) if "attention_mask" in tokens else torch.ones_like(ids)
            with self._on_device(self.text_encoder):
                emb = self.text_encoder(ids, attention_mask=mask if self.uses_text_mask else None)[0]
            emb = emb.to(self.dtype)
            for i, prompt in enumerate(todo):
                self._text_cache[prompt] = (emb[i : i + 1], mask[i : i + 1] if self.uses_text_mask else None)
        embs = torch.cat([self._text_cache[p][0] for p in prompts], dim=0)
        if not self.uses_text_mask:
            return embs, None
        return embs, torch.cat([self._text_cache[p][1] for p in prompts], dim=0)

    # -- images <-> model space ---------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> model space ``[B,C,s,s]`` float32, differentiable w.r.t. ``images``.

        Images are resized (bilinear) to :attr:`image_resolution` and mapped to [-1, 1]. Latent
        priors then take the VAE posterior **mean** (not a sample) times ``scaling_factor``: a sample
        would add fresh noise each call, so the same render would not give the same latent, and the
        guidance noise would no longer be fully controlled by the ``noise=`` argument."""
        x = images.to(device=self.device, dtype=torch.float32)
        if x.shape[-2:] != (self.image_resolution, self.image_resolution):
            x = F.interpolate(x, size=(self.image_resolution, self.image_resolution), mode="bilinear", align_corners=False)
        x = x * 2.0 - 1.0
        if not self.is_latent:
            return x
        vae = self.vae
        latents = vae.encode(x.to(self.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space ``[B,C,s,s]`` -> images ``[B,3,R,R]`` float32 in [0,1] (R = :attr:`image_resolution`).
        Gradients flow only if the caller enables them and ``x`` requires grad."""
        x = x.to(self.device)
        if self.is_latent:
            vae = self.vae
            z = x / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                z = z + shift
            with self._on_device(getattr(vae, "decoder", None), getattr(vae, "post_quant_conv", None)):
                x = vae.decode(z.to(self.dtype)).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- noise prediction -------------------------------------------------------------------------
    def _unet(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor],
              unet_kwargs: Dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's raw output (float32, variance channels dropped) and ``t`` as a ``[B]`` tensor."""
        x_t = x_t.to(self.device)
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if text_mask is not None and self.uses_text_mask:
            unet_kwargs.setdefault("encoder_attention_mask", text_mask.to(self.device))
        out = self.unet_forward(x_t.to(self.dtype), t, encoder_hidden_states=text.to(device=self.device, dtype=self.dtype),
                        return_dict=False, **unet_kwargs)[0].float()
        if self.learned_variance:
            out = out[:, : self.model_channels]
        return out, t

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      text_mask: Optional[torch.Tensor] = None, **unet_kwargs) -> torch.Tensor:
        """Epsilon ``[B,C,s,s]`` (float32) for ``x_t [B,C,s,s]`` at integer timesteps ``t [B]`` (or a
        scalar) with text embeddings ``text [B,L,D]``.

        ``text_mask [B,L]`` is passed to the UNet (as ``encoder_attention_mask``) only for encoders
        that use one (T5); extra keyword arguments (``cross_attention_kwargs``, ``added_cond_kwargs``,
        ...) go to the UNet unchanged. v-prediction and x0 ("sample") outputs are converted to
        epsilon; learned-variance outputs keep their first ``C`` channels."""
        out, t = self._unet(x_t, t, text, text_mask, unet_kwargs)
        x_t = x_t.to(self.device).float()
        if self.prediction_type == "v_prediction":
            return self.eps_from_v(out, x_t, t)
        if self.prediction_type == "sample":
            a = self._abar(t, x_t)
            return (x_t - a.sqrt() * out) / (1 - a).sqrt()
        return out

    def denoising_loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                       text_mask: Optional[torch.Tensor] = None, **unet_kwargs) -> torch.Tensor:
        """Mean squared error of the UNet's raw output against its own target (epsilon, v or x0),
        as the model was trained: for a v-prediction model an epsilon-space loss would weight step
        ``t`` by ``abar_t`` and all but ignore the high-noise steps."""
        x0 = x0.to(self.device).float()
        noise = noise.to(self.device).float()
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x0.shape[0])
        x_t = self.add_noise(x0, noise, t)
        out, t = self._unet(x_t, t, text, text_mask, unet_kwargs)
        if self.prediction_type == "v_prediction":
            a = self._abar(t, x0)
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        elif self.prediction_type == "sample":
            target = x0
        else:
            target = noise
        return (out - target).pow(2).mean()


__all__ = ["DiffusersPrior", "resolve_pipeline_path", "resolve_dtype"]
