"""The ``DiffusionPrior`` interface every guidance loss talks to.

A prior is frozen: eval mode, ``requires_grad=False`` on all weights, never saved in checkpoints.
Gradients flow *through* :meth:`encode_images` (render -> model space) but never into weights.

Model space: latents (VAE, scaled by ``scaling_factor``) for latent priors, pixels in [-1, 1] for
pixel-space priors. Noise predictions are always returned in **epsilon** form: v-prediction and
learned-variance outputs are converted inside :meth:`predict_noise`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from threedistill.cameras import VIEW_LABELS
from threedistill.errors import UserError
from threedistill.groups import check_choice, shown


#: ``prior.compile``'s modes (torch.compile's ``mode``; "default" is its None).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


#: Values of ``prior.view_prompt``.
VIEW_PROMPT_MODES = ("discrete", "interpolated")


@dataclass
class PriorConfig:
    """The ``prior`` config group: which frozen diffusion model :func:`~threedistill.priors.load_prior`
    loads, and how its prompts are built."""

    # A built-in name ("shapes": the shipped shapes-world prior, package data in
    # threedistill/assets/shapes-prior), a local diffusers pipeline folder, or a Hugging Face hub id
    # (downloaded into the cache on first use unless offline: HF_HUB_OFFLINE=1 or offline=true). The other defaults suit "shapes"; threedistill/presets/sd.yaml
    # holds the Stable Diffusion settings.
    name: str = "shapes"
    # A branch, tag or commit of a hub repo (None: main).
    revision: Optional[str] = None
    # Weights variant of a hub repo or folder, e.g. "fp16" (half the download; None: the plain weights).
    variant: Optional[str] = None
    # Never download: hub ids come from the local cache only (as with HF_HUB_OFFLINE=1).
    offline: bool = False
    # "auto": fp16 on CUDA, fp32 on CPU.
    dtype: str = "auto"
    # Append ", front view" / ", side view" / ", back view" / ", overhead view" to the prompt.
    view_dependent: bool = True
    # How a camera picks its view prompt (needs view_dependent: true):
    # "discrete": one label per camera from camera.front/back/overhead_threshold (DreamFusion);
    # "interpolated": the text embeddings blended linearly in azimuth, front/side for |azimuth| < 90
    # and side/back for |azimuth| >= 90, overhead still a label above camera.overhead_threshold
    # (nerfstudio Generfacto's positional_prompting: interpolated). Attention masks of T5-style
    # encoders (DeepFloyd IF) are the union of the blended prompts' masks. It lives here, beside
    # view_dependent, because it decides the conditioning text every loss sees (and perp-neg's positive).
    view_prompt: str = "discrete"
    negative_prompt: str = ""
    # Hugging Face cache folder to search; None means the default (HF_HOME / HF_HUB_CACHE).
    cache_dir: Optional[str] = None
    # -- speed and memory at Stable Diffusion scale (issue 19) -------------------------------------
    # Where the prior runs: "auto" = the run's device (run.device); or cpu, cuda, cuda:N, e.g.
    # cuda:1 to keep the UNet off the GPU that renders (the guidance moves renders over and the
    # gradient back). A device this machine does not have is a one-line error when the prior loads.
    device: str = "auto"
    # UNet and VAE in channels_last memory format (faster convolutions on CUDA tensor cores):
    # "auto" = on CUDA only, "true", "false". Results are the same up to float rounding.
    channels_last: str = "auto"
    # Attention slicing (diffusers' set_attention_slice): "off" keeps the fused SDPA kernel
    # (fastest, and memory-lean already); "auto" (half the heads at a time), "max" (one slice at
    # a time) or a whole number of slices trade speed for peak memory (it replaces SDPA).
    attention_slicing: str = "off"
    # "auto": on CUDA the text encoder and the VAE decoder rest in CPU memory between uses (the
    # text encoder runs once per new prompt, the decoder only for the 2D prompt check's samples):
    # they go to the GPU for the call and back (0.78 GB less GPU memory for SD 2.1 in fp16:
    # 340M + 49M parameters).
    # "off": every component stays on the prior's device. CPU priors are not affected.
    offload: str = "auto"
    # Gradient checkpointing of the VAE encoder: the backward through the encode of the renders
    # (every loss) recomputes the encoder's activations instead of keeping them (2.96 GiB per
    # 512 px render in fp32, measured: benchmarks/lora_memory.py), at the cost of a second encoder
    # forward. "false" (default), "true", or "auto" = on for a CUDA prior of >= 256 px. Same result.
    encoder_checkpointing: str = "false"
    # torch.compile the UNet call: false (off), "default", "reduce-overhead" (CUDA graphs: least
    # launch overhead, more memory) or "max-autotune" (longest compile). The first steps pay the
    # compile (tens of seconds to minutes on SD); worth it on CUDA for long runs; off by default.
    compile: Any = False

    def validate(self, key: str = "prior") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (``key``: this
        group's path in the whole config). Also called unbound on a structured config node:
        ``PriorConfig.validate(cfg.prior, "prior")``."""
        check_choice(self.dtype, f"{key}.dtype", ("auto", "fp32", "fp16", "bf16"))
        check_prior_device_name(self.device, f"{key}.device")
        check_choice(_flag(self.channels_last), f"{key}.channels_last", ("auto", "true", "false"))
        attention_slice(self.attention_slicing, f"{key}.attention_slicing")
        check_choice(offload_setting(self.offload), f"{key}.offload", ("auto", "off"))
        check_choice(_flag(self.encoder_checkpointing), f"{key}.encoder_checkpointing", ("auto", "true", "false"))
        if self.compile not in (False, None) and self.compile not in COMPILE_MODES:
            raise UserError(f"config key '{key}.compile' must be false, {', '.join(COMPILE_MODES[:-1])} or "
                            f"{COMPILE_MODES[-1]}, got {shown(self.compile)}")
        check_choice(self.view_prompt, f"{key}.view_prompt", VIEW_PROMPT_MODES)
        if self.view_prompt == "interpolated" and not self.view_dependent:
            raise UserError(f"config key '{key}.view_prompt' is 'interpolated' but '{key}.view_dependent' is false: "
                            f"set {key}.view_dependent=true or {key}.view_prompt=discrete")
        variant = self.variant
        if variant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", str(variant)):
            raise UserError(f"bad value for config key '{key}.variant': '{variant}' (a weights variant such as fp16, "
                            f"or null for the plain weights)")


def _flag(value) -> str:
    """``auto`` / ``true`` / ``false`` from a string or a YAML boolean."""
    return str(value).strip().lower()


def offload_setting(value) -> str:
    """``prior.offload`` as ``auto`` / ``off`` (YAML reads a bare off as false)."""
    text = _flag(value)
    return "off" if text in ("off", "false") else text


def check_prior_device_name(value, key: str = "prior.device") -> None:
    """``prior.device`` is auto, cpu, cuda or cuda:N (whether this machine has it is checked when the
    prior loads: :func:`resolve_prior_device`)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,2})?", value):
        raise UserError(f"bad value for config key '{key}': '{value}' (auto for the run's device, cpu, cuda or "
                        f"cuda:N)")


def resolve_prior_device(value: Optional[str], run_device: torch.device, key: str = "prior.device") -> torch.device:
    """The device the prior loads on: ``run_device`` for auto (or None), else ``value``, which must exist
    here: a CUDA device without a GPU, or an index past the GPU count, is a one-line error."""
    if value is None or str(value) == "auto":
        return torch.device(run_device)
    check_prior_device_name(str(value), key)
    dev = torch.device(str(value))
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{key}={value} but no CUDA GPU is available here; use {key}=auto (the run's device) "
                            f"or cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{key}={value} but this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); "
                            f"use {key}=auto or one of those")
    return dev


def attention_slice(value, key: str = "prior.attention_slicing"):
    """``prior.attention_slicing`` as diffusers' ``set_attention_slice`` argument: None (off), "auto",
    "max" or a positive whole number of slices; anything else is a one-line error."""
    text = str(value).strip().lower()
    if text in ("off", "false", "none"):
        return None
    if text in ("auto", "max"):
        return text
    if text.isdigit() and 0 < int(text) <= 1024 and not isinstance(value, bool):
        return int(text)
    raise UserError(f"bad value for config key '{key}': '{value}' (off, auto, max or a whole number of slices "
                    f"from 1 to 1024)")


@dataclass
class PromptEmbeddings:
    """Text embeddings for one prompt: ``cond[view]`` per view label (or ``cond["none"]`` for the
    view-independent prompt) and ``uncond`` (the negative prompt, "" by default), each ``[1,L,D]``
    (plus optional attention masks ``[1,L]``)."""

    cond: Dict[str, torch.Tensor]
    uncond: torch.Tensor
    cond_mask: Optional[Dict[str, torch.Tensor]] = None
    uncond_mask: Optional[torch.Tensor] = None
    null: Optional[torch.Tensor] = None  # literal "" embedding (differs from uncond when a negative prompt is set)
    null_mask: Optional[torch.Tensor] = None

    def null_for(self, batch_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The empty-prompt embedding ``[B,L,D]`` and its mask ``[B,L]`` (None for CLIP-style encoders)."""
        if self.null is None:
            raise RuntimeError("these prompt embeddings were built without the empty prompt")
        mask = None if self.null_mask is None else self.null_mask.expand(batch_size, -1)
        return self.null.expand(batch_size, *self.null.shape[1:]), mask

    def for_views(self, labels: Optional[Sequence[str]], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond [B,L,D], uncond [B,L,D])``; view-independent ``cond["none"]`` when labels is None."""
        return _pick(self.cond, labels, batch_size), self.uncond.expand(batch_size, *self.uncond.shape[1:])

    def masks_for_views(self, labels: Optional[Sequence[str]], batch_size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Attention masks ``[B,L]`` matching :meth:`for_views` (T5-style encoders), or None."""
        if self.cond_mask is None or self.uncond_mask is None:
            return None
        return _pick(self.cond_mask, labels, batch_size), self.uncond_mask.expand(batch_size, -1)


    def blend(self, weights: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Conditional embeddings ``[B,L,D]`` mixed per row by ``weights [B,4]`` over
        :data:`~threedistill.cameras.VIEW_LABELS` (see :func:`~threedistill.cameras.view_weights`),
        and their attention masks ``[B,L]`` (T5-style encoders; else None): the union of the masks
        of the labels with a non-zero weight, so every token any blended prompt attends to stays
        visible. A one-hot row gives that label's embedding exactly."""
        rows = []
        masks = [] if self.cond_mask is not None else None
        for w in weights:
            emb = None
            mask = None
            for k, lab in enumerate(VIEW_LABELS):
                wk = float(w[k])
                if wk == 0.0:
                    continue
                term = self.cond[lab] if wk == 1.0 else self.cond[lab] * wk
                emb = term if emb is None else emb + term
                if masks is not None:
                    m = self.cond_mask[lab].bool()  # type: ignore[index]
                    mask = m if mask is None else mask | m
            if emb is None:
                raise ValueError("view weights row is all zero")
            rows.append(emb)
            if masks is not None:
                masks.append(mask.to(self.cond_mask[VIEW_LABELS[0]].dtype))  # type: ignore[union-attr,index]
        return torch.cat(rows, dim=0), (None if masks is None else torch.cat(masks, dim=0))


def _pick(table: Dict[str, torch.Tensor], labels: Optional[Sequence[str]], batch_size: int) -> torch.Tensor:
    """Rows ``[1,...]`` of ``table`` per view label, batched; ``table["none"]`` for every row when
    labels is None."""
    if labels is None:
        row = table["none"]
        return row.expand(batch_size, *row.shape[1:])
    return torch.cat([table[lab] for lab in labels], dim=0)


def view_prompt(prompt: str, label: str) -> str:
    """The view-dependent prompt exactly as the prior encodes it: ``"<prompt>, <label> view"``."""
    if label == "none":
        return prompt
    if label not in VIEW_LABELS:
        raise ValueError(f"unknown view label {label!r}")
    return f"{prompt}, {label} view"


class DiffusionPrior(ABC, torch.nn.Module):
    """Frozen 2D diffusion model, in epsilon form, with its noise schedule and text encoder."""

    #: ``[T]`` float32 cumulative products of alphas, on the prior's device.
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    #: True when model space is a VAE latent space.
    is_latent: bool
    #: Side length (pixels) of images the model was trained on, e.g. 512 for SD, 64 for IF stage I.
    image_resolution: int
    #: Name for logs / run metadata.
    name: str

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # -- the UNet call, optionally compiled (prior.compile) -----------------------------------------
    def compile_unet(self, mode: Any, backend: str = "inductor") -> None:
        """Route :meth:`unet_forward` through ``torch.compile(self.unet)`` (``mode``: one of
        :data:`COMPILE_MODES`; false/None: the plain module again). Kept outside the module tree
        (never a submodule, never saved); compiled once per (mode, backend)."""
        if mode in (False, None):
            object.__setattr__(self, "_compiled_unet", None)
            return
        current = getattr(self, "_compiled_unet", None)
        if current is not None and current[:2] == (mode, backend):
            return
        fn = torch.compile(self.unet, mode=None if mode == "default" else mode, backend=backend)
        object.__setattr__(self, "_compiled_unet", (mode, backend, fn))

    def unet_forward(self, *args, **kwargs):
        """``self.unet(*args, **kwargs)``, through the compiled UNet when :meth:`compile_unet` set one.
        With CUDA graphs ("reduce-overhead") the outputs are copied: the graph's next replay
        overwrites its output buffers, and a loss may call the UNet twice per step (VSD)."""
        compiled = getattr(self, "_compiled_unet", None)
        if compiled is None:
            return self.unet(*args, **kwargs)
        out = compiled[2](*args, **kwargs)
        if compiled[0] == "reduce-overhead":
            out = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
        return out

    # -- text ---------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, prompts: List[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Embeddings ``[N,L,D]`` (model dtype) and optional attention mask ``[N,L]``; cached."""

    def prompt_embeddings(self, prompt: str, negative_prompt: str = "", view_dependent: bool = True) -> PromptEmbeddings:
        labels = list(VIEW_LABELS) if view_dependent else []
        texts = [view_prompt(prompt, lab) for lab in labels] + [prompt, negative_prompt, ""]
        emb, mask = self.encode_text(texts)
        cond = {lab: emb[i : i + 1] for i, lab in enumerate(labels)}
        cond["none"] = emb[len(labels) : len(labels) + 1]
        cond_mask = None
        uncond_mask = None
        null_mask = None
        if mask is not None:
            cond_mask = {lab: mask[i : i + 1] for i, lab in enumerate(labels)}
            cond_mask["none"] = mask[len(labels) : len(labels) + 1]
            uncond_mask = mask[len(labels) + 1 : len(labels) + 2]
            null_mask = mask[len(labels) + 2 : len(labels) + 3]
        if not view_dependent:
            # Every view maps to the plain prompt (embedding and mask alike).
            for lab in VIEW_LABELS:
                cond[lab] = cond["none"]
                if cond_mask is not None:
                    cond_mask[lab] = cond_mask["none"]
        return PromptEmbeddings(
            cond=cond, uncond=emb[len(labels) + 1 : len(labels) + 2], cond_mask=cond_mask,
            uncond_mask=uncond_mask, null=emb[len(labels) + 2 : len(labels) + 3], null_mask=null_mask,
        )

    # -- images <-> model space ---------------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> model space ``[B,C,h,w]``; differentiable w.r.t. images."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images ``[B,3,H,W]`` in [0,1] (no gradient needed)."""

    # -- noise prediction -------------------------------------------------------------------------
    @abstractmethod
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      text_mask: Optional[torch.Tensor] = None, **unet_kwargs) -> torch.Tensor:
        """Epsilon prediction ``[B,C,h,w]`` (float32) for noisy ``x_t`` at integer timesteps ``t [B]``."""

    # -- schedule helpers (shared by every prior) -----------------------------------------------
    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                  clip_x0: bool = False) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) move from ``t`` to ``t_next`` (either direction; ``t_next``
        may be -1 for the clean image). Used for sampling (t_next < t) and inversion (t_next > t).
        ``clip_x0`` clamps the predicted clean image to [-1, 1] (pixel-space priors) and re-derives
        epsilon from it, as guided-diffusion does: near t = T, where abar ~ 0, an unclamped x0
        prediction is dominated by epsilon's error and sampling diverges."""
        x0 = self.predict_x0(x_t, eps, t)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            a = self._abar(t, x_t)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt().clamp_min(1e-8)
        t_next = t_next.long()
        a_next = torch.where(
            t_next >= 0,
            self.alphas_cumprod.to(x_t.device)[t_next.clamp_min(0)],
            torch.ones((), device=x_t.device),
        ).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def eps_from_v(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v-prediction to epsilon: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``."""
        a = self._abar(t, x_t)
        return a.sqrt() * v + (1 - a).sqrt() * x_t

    def denoising_loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                       text_mask: Optional[torch.Tensor] = None, **unet_kwargs) -> torch.Tensor:
        """The ordinary diffusion training loss (mean squared error of the noise prediction) at ``t``,
        differentiable w.r.t. whatever trainable state the UNet call uses (a LoRA). Priors whose
        network predicts something else than epsilon override this to use their own target."""
        x_t = self.add_noise(x0, noise, t)
        eps = self.predict_noise(x_t, t, text, text_mask, **unet_kwargs)
        return (eps - noise).pow(2).mean()

    def ddim_timesteps(self, steps: int) -> torch.Tensor:
        """The ``steps`` integer timesteps ``[steps]`` a DDIM sampler visits, from ``T - 1`` down to 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return torch.linspace(self.num_train_timesteps - 1, 0, steps).round().long().to(self.device)

    @torch.no_grad()
    def ddim_sample(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
                    guidance_scale: float, cond_mask: Optional[torch.Tensor] = None,
                    uncond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Deterministic DDIM from model-space noise ``x [B,C,h,w]`` to images ``[B,3,H,W]`` in [0,1],
        with classifier-free guidance (diffusers form) between the text embeddings ``cond`` and
        ``uncond`` ``[B,L,D]`` (and their masks ``[B,L]`` for T5-style encoders): one batched UNet
        call per step, ``steps`` steps on :meth:`ddim_timesteps`."""
        n = x.shape[0]
        x = x.to(self.device)
        text = torch.cat([uncond, cond])
        mask = None if cond_mask is None or uncond_mask is None else torch.cat([uncond_mask, cond_mask])
        ts = self.ddim_timesteps(steps)
        for i, t in enumerate(ts):
            tt = t.expand(n)
            e = self.predict_noise(torch.cat([x, x]), torch.cat([tt, tt]), text, text_mask=mask)
            eu, ec = e.chunk(2)
            eps = eu + guidance_scale * (ec - eu)
            t_next = ts[i + 1].expand(n) if i + 1 < len(ts) else torch.full_like(tt, -1)
            x = self.ddim_step(x, eps, tt, t_next, clip_x0=not self.is_latent)
        return self.decode(x)

    @torch.no_grad()
    def sample(self, prompt: str, n: int = 1, steps: int = 50, guidance_scale: float = 7.5,
               negative_prompt: str = "", generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDIM samples ``[n,3,H,W]`` in [0,1] from the prior itself (for checks and evaluation)."""
        emb = self.prompt_embeddings(prompt, negative_prompt, view_dependent=False)
        cond, uncond = emb.for_views(None, n)
        masks = emb.masks_for_views(None, n)
        x = torch.randn(self.model_space_shape(n), generator=generator)
        return self.ddim_sample(x, cond, uncond, steps, guidance_scale, *(masks or (None, None)))

    @torch.no_grad()
    def sample_views(self, prompt: str, labels: Sequence[str], n: int = 1, steps: int = 20,
                     guidance_scale: float = 7.5, negative_prompt: str = "", view_dependent: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDIM samples ``[len(labels), n, 3, H, W]`` in [0,1] of the prompt as the guidance conditions
        on it: row ``i`` under view label ``labels[i]`` (``"<prompt>, <label> view"``, see
        :func:`view_prompt`; the plain prompt for every row when not ``view_dependent``), against the
        negative prompt, at ``guidance_scale``. Column ``j`` starts from the same noise in every row,
        so the rows differ only by their text. All rows are sampled in one batch."""
        labels = list(labels)
        emb = self.prompt_embeddings(prompt, negative_prompt, view_dependent)
        rows = [lab for lab in labels for _ in range(n)]
        cond, uncond = emb.for_views(rows, len(rows))
        masks = emb.masks_for_views(rows, len(rows))
        noise = torch.randn(self.model_space_shape(n), generator=generator)
        x = noise.repeat(len(labels), *([1] * (noise.dim() - 1)))
        images = self.ddim_sample(x, cond, uncond, steps, guidance_scale, *(masks or (None, None)))
        return images.reshape(len(labels), n, *images.shape[1:])

    @abstractmethod
    def model_space_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of model-space tensors for a batch, e.g. ``(B,4,64,64)`` for SD at 512."""
