"""The shared core of every score-distillation loss.

A loss file subclasses :class:`Guidance` and writes only its update rule in :meth:`Guidance.gradient`
(the direction ``g`` in model space); the core does the rest:

* render -> model space (``prior.encode_images``), differentiable;
* the timestep draw in ``[t_min, t_max]`` (both schedulable), or a caller's ``t=``;
* the noise draw, or a caller's ``noise=``;
* classifier-free guidance in the diffusers form ``eps_u + s * (eps_c - eps_u)`` with one batched
  UNet call (:meth:`Guidance.predict_cfg`);
* the weighting ``w(t)``;
* ``nan_to_num`` and optional elementwise clipping of ``g``;
* gradient injection through the reparameterized MSE
  ``loss = 0.5 * ||z - sg(z - g)||^2 / B``, whose gradient w.r.t. the model-space ``z`` is ``g / B``.
  The logged loss therefore tracks ``||g||^2``;
* trainable guidance state (VSD/ESD's LoRA): a loss returns its own training loss from
  :meth:`Guidance.state_loss`, computed on the detached render; it is added to ``loss`` so the
  distiller's one backward pass and one optimizer step train the representation and the state
  together (the state's parameters form their own optimizer group with a fixed learning rate).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from omegaconf import ListConfig

from threedistill.cameras import CameraBatch, view_weights
from threedistill.devices import to_device
from threedistill.errors import UserError
from threedistill.groups import (Scheduled, check_bounds, check_choice, check_positive, check_schedule_min, check_unit,
                                 parse_schedule, scheduled, shown)
from threedistill.guidance import perp_neg as perp_neg_math
from threedistill.guidance.perp_neg import DEFAULT_F_FS, DEFAULT_F_FSB, DEFAULT_F_SB, DEFAULT_F_SF, PerpNegTexts
from threedistill.priors.base import DiffusionPrior, PromptEmbeddings

log = logging.getLogger(__name__)


#: Bounds of the ``guidance`` numbers (schedules: their values). CFG scales above 1000 are 10x
#: DreamFusion's 100; LoRA ranks above 256 are full-rank for SD's attention; an inversion step
#: or a delta_t beyond 1000 leaves the diffusion's 1000 training timesteps; weights and clips
#: are bounded so a typo cannot turn the loss into inf.
GUIDANCE_BOUNDS = {"guidance_scale": (0.0, 1000.0), "t_min": (0.0, 1.0), "t_max": (0.0, 1.0),
                   "grad_clip": (0.0, 1e6), "weight": (0.0, 1e6), "lora_rank": (1, 256), "state_lr": (0.0, 1.0),
                   "camera_dropout": (0.0, 1.0), "esd_lambda": (0.0, 1.0), "delta_t": (0.0, 1000.0),
                   "xs_delta_t": (1, 1000), "xs_inv_steps": (1, 1000), "negative_weight": (-1000.0, 1000.0),
                   "t_jitter": (0.0, 1.0), "denoise_weight": (0.0, 100.0)}


#: ``guidance.t_schedule`` choices (see :class:`GuidanceConfig`).
T_SCHEDULES = ("random", "linear", "sqrt")


@dataclass
class GuidanceConfig:
    """The ``guidance`` config group: which loss (:func:`build_guidance`) and its settings."""

    name: str = "sds"
    # Classifier-free guidance scale in the diffusers form eps_u + s * (eps_c - eps_u).
    # 20 suits the shapes prior's 300-step default (IoU +0.013, size 0.81 -> 0.84 against 15 on four
    # off-benchmark prompts; 30 and 100 grow the object past its true size: IoU 0.49 at 30 vs 0.59
    # at 15 on "a red cube" in an older measurement). For Stable Diffusion use DreamFusion's 100 (threestudio
    # form; 101 here, the difference is negligible): `-c sds-nerf -c sd guidance.guidance_scale=100`
    # (threedistill/presets/sds-nerf.yaml; threedistill/presets/sd.yaml holds the other Stable Diffusion settings).
    guidance_scale: Scheduled = 20.0
    # Timestep range as fractions of num_train_timesteps. The default t_max anneals from 0.98 to 0.5
    # over the default 300 steps (shape first, then detail).
    t_min: Scheduled = 0.02
    t_max: Scheduled = field(default_factory=lambda: [0.98, 0.5, 0, 300])
    # How t is drawn at each step (fraction f = step / run.steps):
    # "random": t ~ U[t_min, t_max] at the step (DreamFusion; t_min/t_max may be schedules);
    # "linear": t = t_max - (t_max - t_min) * f, decreasing deterministically over the run
    #   (DreamTime, Huang et al. 2023, "DreamTime: An Improved Optimization Strategy for
    #   Diffusion-Guided 3D Generation", argues for monotonically non-increasing t; its TP-SDS
    #   shapes the decrease by a weight over t, this is the plain linear variant);
    # "sqrt": t = t_max - (t_max - t_min) * sqrt(f) (HiFA, Zhu & Zhuang 2023, "HiFA: High-fidelity
    #   Text-to-3D Generation with Advanced Diffusion Guidance", its square-root annealing).
    # The deterministic ones anneal from t_max's value at step 0 to t_min's value at run.steps
    # (they replace t_max's own schedule), plus t_jitter.
    t_schedule: str = "random"
    # "linear" / "sqrt": each view's t moves by U[-t_jitter, t_jitter] (a fraction of the diffusion
    # steps, like t_min/t_max), clamped to [t_min, t_max]; 0: exactly the closed form.
    t_jitter: float = 0.02
    # w(t): "auto" = the loss's own (sqrt((1 - abar) / abar) for ism, "sds" for the others);
    # "sds" = 1 - alphas_cumprod[t], "uniform" = 1, "fantasia3d" = sqrt(abar) * (1 - abar), "ism".
    weighting: str = "auto"
    # Clamp the injected gradient elementwise to +-grad_clip (None or 0 disables).
    grad_clip: Scheduled = None
    weight: Scheduled = 1.0
    # SDS's denoising term added to any loss: g += denoise_weight * (eps(x_t; negative prompt) - eps),
    # the one-step-noised render and its noise (the loss's own eps(x_t; negative prompt) where it has
    # one, GuidanceContext.eps_uncond, else one more UNet batch item per render). SDS's update
    # is this term plus the classifier direction (CSD, Yu et al. 2023, and NFSD, Katzir et al. 2024,
    # split it so); the term pulls the render towards the prior's likely images, which holds an
    # object's size. VSD, ESD, CSD and ISM replace it by a difference of two predictions and, without
    # it, grow their objects (issue 18): a weight between 0 (the loss as published) and 1 (the
    # term at SDS's strength) restores that pull. 0 for SDS, whose update already has it once.
    denoise_weight: Scheduled = 0.0
    # -- trainable guidance state (vsd, esd): a LoRA on the prior's UNet plus a camera embedding --
    lora_rank: int = 4
    # Learning rate of the LoRA and camera embedding (fixed; ProlificDreamer's 1e-4).
    state_lr: float = 1.0e-4
    # Fraction of LoRA training samples whose camera condition is dropped (zeroed).
    camera_dropout: float = 0.1
    # esd: weight of the camera-free LoRA prediction (0 is VSD).
    esd_lambda: float = 0.5
    # -- ism: x_s = DDIM inversion of x with the empty prompt, s = t - delta_t ----------------------
    delta_t: Scheduled = field(default_factory=lambda: [100, 50, 0, 800])
    # Inversion to s in at most xs_inv_steps steps of stride xs_delta_t (integer timesteps).
    xs_delta_t: int = 200
    xs_inv_steps: int = 5
    # -- csd: weight of the negative-prompt term, annealed 0 -> 1 (no effect without a negative prompt)
    negative_weight: Scheduled = field(default_factory=lambda: [0.0, 1.0, 0, 400])
    # -- memory (issue 19) ---------------------------------------------------------------------------
    # Gradient checkpointing of the UNet in the LoRA training forward of vsd/esd (recompute the
    # activations in the backward instead of keeping them: VSD at 512 px in 24 GB). "auto" = on for
    # a prior on CUDA whose images are >= 256 px (Stable Diffusion), "true", "false". Same
    # gradients either way; other losses train nothing through the UNet and ignore it.
    gradient_checkpointing: str = "auto"
    # -- Perp-Neg (Armandpour et al. 2023), every loss: the other views' prompts as negatives whose
    # directions are made orthogonal to the view's own (guidance/perp_neg.py). Needs
    # prior.view_dependent: true; costs 2 more UNet batch items per render.
    perp_neg: bool = False
    # Weight functions w(r) = a * exp(-b * r) + c as [a, b, c] of the interpolation factor r
    # (threestudio's defaults): f_fs / f_sf weigh the front / side negatives for |azimuth| < 90
    # (r = 1 - |a|/90), f_sb / f_fsb the side / front negatives for |azimuth| >= 90 (r = 2 - |a|/90).
    perp_neg_f_fs: List[float] = field(default_factory=lambda: list(DEFAULT_F_FS))
    perp_neg_f_sf: List[float] = field(default_factory=lambda: list(DEFAULT_F_SF))
    perp_neg_f_sb: List[float] = field(default_factory=lambda: list(DEFAULT_F_SB))
    perp_neg_f_fsb: List[float] = field(default_factory=lambda: list(DEFAULT_F_FSB))

    def validate(self, key: str = "guidance") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (``key``: this
        group's path in the whole config). Also called unbound on a structured config node:
        ``GuidanceConfig.validate(cfg.guidance, "guidance")``. The loss name is checked where it is
        looked up (:func:`build_guidance`)."""
        for name in ("guidance_scale", "t_min", "t_max", "grad_clip", "weight", "delta_t", "negative_weight",
                     "denoise_weight"):
            parse_schedule(getattr(self, name), f"{key}.{name}")
        check_bounds(self, key, GUIDANCE_BOUNDS, optional=("grad_clip",))  # first: nulls and non-numbers
        for name in ("t_min", "t_max"):
            for v in parse_schedule(getattr(self, name), f"{key}.{name}").values:  # type: ignore[union-attr]
                if not 0.0 <= v <= 1.0:
                    raise UserError(f"config key '{key}.{name}' is a fraction of the diffusion steps in [0, 1], "
                                    f"got {v}")
        check_choice(self.weighting, f"{key}.weighting", ("auto", "sds", "uniform", "fantasia3d", "ism"))
        check_choice(self.t_schedule, f"{key}.t_schedule", T_SCHEDULES)
        for name in ("lora_rank", "xs_delta_t", "xs_inv_steps", "state_lr"):
            check_positive(getattr(self, name), f"{key}.{name}")
        for name in ("camera_dropout", "esd_lambda"):
            check_unit(getattr(self, name), f"{key}.{name}")
        check_schedule_min(self.guidance_scale, f"{key}.guidance_scale")
        check_choice(str(self.gradient_checkpointing).strip().lower(), f"{key}.gradient_checkpointing",
                     ("auto", "true", "false"))
        if min(parse_schedule(self.delta_t, f"{key}.delta_t").values) < 0:  # type: ignore[union-attr]
            raise UserError(f"config key '{key}.delta_t' must be >= 0 (integer timesteps), got {self.delta_t}")
        if not isinstance(self.perp_neg, bool):
            raise UserError(f"config key '{key}.perp_neg' must be true or false, got {shown(self.perp_neg)}")
        for name in PERP_NEG_KEYS:
            _check_decay(getattr(self, name), f"{key}.{name}")


#: The Perp-Neg weight-function keys of ``guidance``: each [a, b, c] of a * exp(-b * r) + c.
PERP_NEG_KEYS = ("perp_neg_f_fs", "perp_neg_f_sf", "perp_neg_f_sb", "perp_neg_f_fsb")


def _check_decay(value, key: str) -> None:
    """Three finite numbers [a, b, c] with |a|, |c| <= 100 and 0 <= b <= 100 (r lies in [0, 1], so
    this bounds the weight to a few hundred; b < 0 would make the weight grow instead of decay)."""
    fix = "three numbers [a, b, c] of the weight a * exp(-b * r) + c, e.g. [4.0, 0.5, -2.426]"
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if items is None or len(items) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in items):
        raise UserError(f"config key '{key}' must be {fix}, got {shown(value)}")
    a, b, c = (float(v) for v in items)
    if not all(math.isfinite(v) for v in (a, b, c)) or abs(a) > 100 or abs(c) > 100 or not 0.0 <= b <= 100.0:
        raise UserError(f"config key '{key}' must be {fix} with |a|, |c| <= 100 and 0 <= b <= 100, "
                        f"got {shown(list(items))}")


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar to backpropagate: the injection loss plus any state loss
    grad: torch.Tensor  # injected gradient g in model space [B,C,h,w] (before the 1/B of the loss)
    t: torch.Tensor  # integer timesteps [B]
    #: Scalars: Python numbers or 0-dim tensors (read later, see :func:`threedistill.distill.read_stats`).
    stats: Dict[str, object] = field(default_factory=dict)


@dataclass
class GuidanceContext:
    """What a loss's update rule sees at one step."""

    z: torch.Tensor  # clean model-space renders [B,C,h,w] (detached)
    x_t: torch.Tensor  # noised [B,C,h,w]
    t: torch.Tensor  # [B]
    noise: torch.Tensor  # [B,C,h,w]
    cond: torch.Tensor  # view-dependent prompt embeddings [B,L,D]
    uncond: torch.Tensor  # negative-prompt embeddings [B,L,D]
    cameras: CameraBatch
    step: int
    guidance_scale: float
    generator: Optional[torch.Generator]
    cond_mask: Optional[torch.Tensor] = None  # [B,L] for T5-style text encoders, else None
    uncond_mask: Optional[torch.Tensor] = None
    # guidance.perp_neg: the negatives' texts and weights; a loss passes it to predict_cfg /
    # predict_guided wherever it forms its conditional direction (None: plain CFG).
    perp_neg: Optional[PerpNegTexts] = None
    # eps(x_t; negative prompt, t) at this x_t, when the loss's update already predicted it (SDS,
    # VSD/ESD, CSD/NFSD with a negative prompt): guidance.denoise_weight's term reuses it instead of
    # a UNet call of its own.
    eps_uncond: Optional[torch.Tensor] = None


class Guidance(torch.nn.Module):
    """Base class: subclasses implement :meth:`gradient`. Trainable state (LoRA etc.) lives in
    submodules of the subclass and is returned by :meth:`param_groups`; the prior is never a
    submodule (it is stored outside the module tree, so it is never checkpointed)."""

    name = "base"
    #: w(t) when ``guidance.weighting`` is "auto".
    default_weighting = "sds"
    #: The negative prompt a loss uses when ``prior.negative_prompt`` is empty: None for the losses
    #: that work without one; NFSD sets its paper's fixed prompt (it needs one).
    default_negative_prompt: Optional[str] = None

    def __init__(self, cfg, prior: DiffusionPrior):
        super().__init__()
        self.cfg = cfg  # the guidance group
        object.__setattr__(self, "prior", prior)  # not a submodule: frozen, never saved
        self._embeddings: Optional[PromptEmbeddings] = None
        self._view_dependent = True
        self._camera_cfg = None
        self._view_prompt = "discrete"
        self.has_negative_prompt = False
        #: Time the encode (``time_encode``), waiting for the device around it; the distiller sets it
        #: from ``run.profile``. Off, no stat is timed (no wait on CUDA).
        self.profile = True
        #: The run's number of steps (``run.steps``): the deterministic ``t_schedule``s anneal over it.
        self.total_steps: Optional[int] = None

    # -- prompt -----------------------------------------------------------------------------------
    def set_prompt(self, prompt: str, negative_prompt: str = "", view_dependent: bool = True,
                   camera_cfg=None, view_prompt: str = "discrete") -> None:
        """``view_prompt``: ``prior.view_prompt`` ("discrete" labels or "interpolated" embeddings);
        ``camera_cfg``: the ``camera`` group, whose thresholds place the views."""
        check_choice(view_prompt, "prior.view_prompt", ("discrete", "interpolated"))
        if bool(getattr(self.cfg, "perp_neg", False)) and not view_dependent:
            raise UserError("config key 'guidance.perp_neg' needs view-dependent prompts (its negatives are the other "
                            "views' prompts): set prior.view_dependent=true or guidance.perp_neg=false")
        if view_prompt == "interpolated" and not view_dependent:
            raise UserError("config key 'prior.view_prompt' is 'interpolated' but 'prior.view_dependent' is false: "
                            "set prior.view_dependent=true or prior.view_prompt=discrete")
        self._view_prompt = view_prompt
        negative_prompt = negative_prompt or ""
        if self.default_negative_prompt is not None and not negative_prompt.strip():
            negative_prompt = self.default_negative_prompt
            log.warning("guidance '%s': no prior.negative_prompt set, using the paper's: \"%s\"",
                        self.name, negative_prompt)
        self._embeddings = self.prior.prompt_embeddings(prompt, negative_prompt, view_dependent)
        self._view_dependent = view_dependent
        self._camera_cfg = camera_cfg
        self.has_negative_prompt = bool(negative_prompt.strip())

    @property
    def embeddings(self) -> PromptEmbeddings:
        if self._embeddings is None:
            raise RuntimeError("call set_prompt() before using the guidance")
        return self._embeddings

    def view_labels(self, cameras: CameraBatch) -> List[str]:
        return cameras.view_labels(*self._thresholds())

    def _thresholds(self) -> tuple[float, float, float]:
        """camera.front_threshold, back_threshold, overhead_threshold (the defaults without a camera group)."""
        c = self._camera_cfg
        if c is None:
            return 45.0, 45.0, 60.0
        return float(c.front_threshold), float(c.back_threshold), float(c.overhead_threshold)

    def conditioning(self, cameras: CameraBatch, batch_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(cond, uncond, cond_mask, uncond_mask)`` for the cameras: the view prompt per camera
        (a label's, or the azimuth blend with ``prior.view_prompt: interpolated``), the negative
        prompt, and the T5-style masks (None for CLIP-style encoders)."""
        emb = self.embeddings
        if self._view_dependent and self._view_prompt == "interpolated":
            weights = view_weights(*cameras.angles_on_host(), *self._thresholds(), interpolated=True)
            cond, cond_mask = emb.blend(weights)
            _, uncond = emb.for_views(None, batch_size)
            uncond_mask = None if emb.uncond_mask is None else emb.uncond_mask.expand(batch_size, -1)
            return cond, uncond, cond_mask, uncond_mask
        labels = self.view_labels(cameras) if self._view_dependent else None
        cond, uncond = emb.for_views(labels, batch_size)
        masks = emb.masks_for_views(labels, batch_size)
        cond_mask, uncond_mask = masks if masks is not None else (None, None)
        return cond, uncond, cond_mask, uncond_mask

    def perp_neg_texts(self, cameras: CameraBatch) -> Optional[PerpNegTexts]:
        """The Perp-Neg negatives of the cameras (``guidance.perp_neg``), or None when it is off."""
        if not bool(getattr(self.cfg, "perp_neg", False)):
            return None
        c = self.cfg
        p = perp_neg_math.plan(*cameras.angles_on_host(), self._thresholds()[2], c.perp_neg_f_fs,
                               c.perp_neg_f_sf, c.perp_neg_f_sb, c.perp_neg_f_fsb)
        emb = self.embeddings
        texts = [emb.for_views(labels, len(labels))[0] for labels in p.labels]
        masks = None
        if emb.cond_mask is not None:
            masks = [emb.masks_for_views(labels, len(labels))[0] for labels in p.labels]  # type: ignore[index]
        return PerpNegTexts(texts=texts, masks=masks, weights=p.weights.to(self.prior.device))

    # -- shared pieces ----------------------------------------------------------------------------
    def timestep_range(self, step: int) -> tuple[int, int]:
        T = self.prior.num_train_timesteps
        lo = scheduled(self.cfg.t_min, step, "guidance.t_min")
        hi = scheduled(self.cfg.t_max, step, "guidance.t_max")
        t_lo = int(round(lo * T))
        t_hi = int(round(hi * T))
        t_lo = min(max(t_lo, 0), T - 1)
        t_hi = min(max(t_hi, t_lo), T - 1)
        return t_lo, t_hi

    def sample_timesteps(self, batch_size: int, step: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Integer timesteps ``[batch_size]`` at ``step`` by ``guidance.t_schedule``: "random" draws
        t ~ U{t_min*T, ..., t_max*T} per batch item; "linear" and "sqrt" follow
        :meth:`annealed_fraction` plus each item's jitter."""
        kind = str(getattr(self.cfg, "t_schedule", "random"))
        if kind == "random":
            lo, hi = self.timestep_range(step)
            return torch.randint(lo, hi + 1, (batch_size,), generator=generator, dtype=torch.long)
        T = self.prior.num_train_timesteps
        frac, lo, hi = self.annealed_fraction(step)
        fracs = torch.full((batch_size,), frac, dtype=torch.float64)
        jitter = float(self.cfg.t_jitter)
        if jitter > 0:
            fracs = fracs + jitter * (2.0 * torch.rand(batch_size, generator=generator, dtype=torch.float64) - 1.0)
        fracs = fracs.clamp(lo, hi)
        return (fracs * T).round().long().clamp(0, T - 1)

    def annealed_fraction(self, step: int) -> tuple[float, float, float]:
        """The deterministic ``t_schedule``s at ``step``, as fractions of the diffusion steps:
        ``(t, t_min, t_max)`` with t_max its value at step 0, t_min its value at ``run.steps``, and
        ``t = t_max - (t_max - t_min) * g(step / run.steps)``, ``g(f) = f`` ("linear", DreamTime)
        or ``sqrt(f)`` ("sqrt", HiFA)."""
        if not self.total_steps:
            raise UserError(f"guidance.t_schedule={self.cfg.t_schedule} needs the run's steps: "
                            f"build the guidance with build_guidance(cfg.guidance, prior, steps=cfg.run.steps)")
        steps = int(self.total_steps)
        hi = float(scheduled(self.cfg.t_max, 0, "guidance.t_max"))
        lo = min(float(scheduled(self.cfg.t_min, steps, "guidance.t_min")), hi)
        f = min(max(step / steps, 0.0), 1.0)
        g = math.sqrt(f) if self.cfg.t_schedule == "sqrt" else f
        return hi - (hi - lo) * g, lo, hi

    def weighting(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) ``[B,1,1,1]``."""
        abar = self.prior.alphas_cumprod.to(t.device)[t].float()
        kind = self.cfg.weighting
        if kind == "auto":
            kind = self.default_weighting
        if kind == "sds":
            w = 1 - abar
        elif kind == "uniform":
            w = torch.ones_like(abar)
        elif kind == "fantasia3d":
            w = abar.sqrt() * (1 - abar)
        elif kind == "ism":  # LucidDreamer: sqrt((1 - abar) / abar)
            w = ((1 - abar) / abar).sqrt()
        else:  # validated in config
            raise ValueError(f"unknown weighting {kind!r}")
        return w.view(-1, 1, 1, 1)

    def predict_cfg(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                    scale: float, cond_mask: Optional[torch.Tensor] = None,
                    uncond_mask: Optional[torch.Tensor] = None,
                    perp_neg: Optional[PerpNegTexts] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched UNet call; returns ``(eps_cfg, eps_uncond, eps_cond)``. With ``perp_neg``
        (the step's :attr:`GuidanceContext.perp_neg`) the negatives join the same call and
        ``eps_cond`` is the effective conditional ``eps_u + d`` of the Perp-Neg direction ``d``, so
        ``eps_cfg = eps_u + scale * (eps_cond - eps_u)`` still holds."""
        if perp_neg is None:
            eps_u, eps_c = self.predict_batch(x_t, t, [uncond, cond], [uncond_mask, cond_mask])
            return eps_u + scale * (eps_c - eps_u), eps_u, eps_c
        eps_u, d, _ = self.predict_guided(x_t, t, cond, uncond, cond_mask, uncond_mask, perp_neg=perp_neg)
        return eps_u + scale * d, eps_u, eps_u + d

    def predict_guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, base: torch.Tensor,
                       cond_mask: Optional[torch.Tensor] = None, base_mask: Optional[torch.Tensor] = None,
                       extra: Sequence[torch.Tensor] = (), extra_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       perp_neg: Optional[PerpNegTexts] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """The conditional direction of a loss, in one batched UNet call: ``(eps_base, d, eps_extra)``
        with ``d = eps(cond) - eps(base)``, or Perp-Neg's ``d_pos - sum_i w_i perp(d_neg_i, d_pos)``
        relative to the same ``base`` when ``perp_neg`` is given (:mod:`~threedistill.guidance.perp_neg`),
        and the predictions for the ``extra`` texts (a loss's other prompts) from the same call.
        Batch items: ``B * (2 + len(extra) + K)``."""
        extra = list(extra)
        masks: List[Optional[torch.Tensor]] = [base_mask, cond_mask]
        masks += list(extra_masks) if extra_masks is not None else [None] * len(extra)
        texts = [base, cond] + extra
        if perp_neg is not None:
            texts += list(perp_neg.texts)
            masks += list(perp_neg.masks) if perp_neg.masks is not None else [None] * len(perp_neg.texts)
        eps = self.predict_batch(x_t, t, texts, masks)
        eps_base, eps_cond = eps[0], eps[1]
        eps_extra = eps[2:2 + len(extra)]
        if perp_neg is None:
            return eps_base, eps_cond - eps_base, eps_extra
        d = perp_neg_math.combine(eps_base, eps_cond, eps[2 + len(extra):], perp_neg.weights)
        return eps_base, d, eps_extra

    def predict_batch(self, x_t: torch.Tensor, t: torch.Tensor, texts: List[torch.Tensor],
                      masks: Optional[List[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
        """Epsilon for the same ``x_t``, ``t`` under each text embedding ``[B,L,D]`` of ``texts``, in
        one batched UNet call (the cost of one guided batch for two texts)."""
        k = len(texts)
        mask = None
        if masks is not None and all(m is not None for m in masks):
            mask = torch.cat(list(masks))
        eps = self.prior.predict_noise(torch.cat([x_t] * k), torch.cat([t] * k), torch.cat(texts), text_mask=mask)
        return list(eps.chunk(k))

    def null_embeddings(self, batch_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The empty prompt's embedding (the "unconditional" of CSD, NFSD and ISM's inversion)."""
        return self.embeddings.null_for(batch_size)

    def denoising_term(self, ctx: GuidanceContext) -> torch.Tensor:
        """SDS's denoising term ``eps(x_t; negative prompt, t) - noise`` of the one-step-noised render
        (``guidance.denoise_weight``): the loss's own prediction (:attr:`GuidanceContext.eps_uncond`)
        where it made one, else one batched UNet call."""
        eps_u = ctx.eps_uncond
        if eps_u is None:
            (eps_u,) = self.predict_batch(ctx.x_t, ctx.t, [ctx.uncond], [ctx.uncond_mask])
        return eps_u - ctx.noise

    def gradient(self, ctx: GuidanceContext) -> tuple[torch.Tensor, Dict[str, float]]:
        """The loss's update direction ``g`` in model space (without w(t)), and extra stats."""
        raise NotImplementedError

    def state_loss(self, ctx: GuidanceContext) -> Optional[torch.Tensor]:
        """Training loss of the loss's own trainable state on this step's detached renders (VSD/ESD
        LoRA), or None. Runs with autograd enabled; its gradient reaches only the state."""
        return None

    # -- the call -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, cameras: CameraBatch, step: int,
                t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> GuidanceOutput:
        """Score the renders ``images [B,3,H,W]`` in [0,1]. ``t`` ([B] ints) and ``noise``
        (model-space shaped) override the random draws so a result can be reproduced exactly."""
        prior = self.prior
        B = images.shape[0]
        device = prior.device
        t_start = _now(device) if self.profile else 0.0
        z = prior.encode_images(images.to(device))
        time_encode = _now(device) - t_start if self.profile else None
        if t is None:
            t = self.sample_timesteps(B, step, generator)
        # drawn on the CPU (reproducible), moved without waiting for the device (to_device)
        t = to_device(torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(B).contiguous(), device)
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, dtype=torch.float32)
        noise = to_device(noise, device).to(dtype=z.dtype)
        cond, uncond, cond_mask, uncond_mask = self.conditioning(cameras, B)
        perp = self.perp_neg_texts(cameras)
        scale = float(scheduled(self.cfg.guidance_scale, step, "guidance.guidance_scale"))
        with torch.no_grad():
            z_detached = z.detach()
            x_t = prior.add_noise(z_detached, noise, t)
            ctx = GuidanceContext(z=z_detached, x_t=x_t, t=t, noise=noise, cond=cond, uncond=uncond,
                                  cameras=cameras, step=step, guidance_scale=scale, generator=generator,
                                  cond_mask=cond_mask, uncond_mask=uncond_mask, perp_neg=perp)
            direction, extra = self.gradient(ctx)
            denoise = float(scheduled(getattr(self.cfg, "denoise_weight", 0.0), step, "guidance.denoise_weight"))
            if denoise > 0:
                direction = direction + denoise * self.denoising_term(ctx)
                extra = {**extra, "denoise_weight": denoise}
            g = self.weighting(ctx.t) * direction
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            clip = scheduled(self.cfg.grad_clip, step, "guidance.grad_clip")
            if clip is not None and clip > 0:
                g = g.clamp(-clip, clip)
        weight = float(scheduled(self.cfg.weight, step, "guidance.weight"))
        target = (z - g).detach()
        loss = weight * 0.5 * F.mse_loss(z, target, reduction="sum") / B
        # Stats stay tensors on the device (reading one waits for the device); the distiller reads
        # them all at once every run.stats_every steps.
        stats: Dict[str, object] = {
            "t": t.float().mean(),
            "guidance_scale": scale,
            "grad_norm": g.flatten(1).norm(dim=1).mean(),
        }
        if time_encode is not None:
            stats["time_encode"] = time_encode
        stats.update(extra)
        state_loss = self.state_loss(ctx)
        if state_loss is not None:
            stats[f"loss_{self.name}_state"] = state_loss.detach()
            loss = loss + state_loss
        # On the renders' device (prior.device may differ): the gradient flows back through the .to.
        return GuidanceOutput(loss=loss.to(images.device), grad=g, t=t, stats=stats)

    def to(self, *args, **kwargs) -> "Guidance":
        """Trainable state (VSD/ESD's LoRA sits inside the prior's UNet) lives on the prior's device,
        whatever device is asked (``prior.device`` may differ from the representation's); a dtype is
        applied as usual."""
        _, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        return super().to(device=self.prior.device, dtype=dtype, non_blocking=non_blocking)

    # -- trainable state ------------------------------------------------------------------------
    def param_groups(self, optim_cfg) -> List[dict]:
        """Optimizer groups for trainable guidance state (none for SDS): one group at the fixed
        learning rate ``guidance.state_lr`` (``lr_fixed``: not scaled by ``optim.lr``'s schedule)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        return [{"params": params, "name": "guidance", "lr_scale": 1.0, "lr_fixed": float(self.cfg.state_lr)}]


def _now(device: torch.device) -> float:
    """Wall clock after the device's queued work (for the encode/UNet time split in metrics)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


_REGISTRY: Dict[str, type] = {}


def register(name: str):
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"guidance {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def guidance_names() -> List[str]:
    return sorted(_REGISTRY)


def build_guidance(cfg_guidance, prior: DiffusionPrior, steps: Optional[int] = None) -> Guidance:
    """The loss named by ``guidance.name``; ``steps`` (``run.steps``) is what the deterministic
    ``guidance.t_schedule``s anneal over."""
    name = cfg_guidance.name
    if name not in _REGISTRY:
        raise UserError(f"unknown guidance.name '{name}' (available: {', '.join(guidance_names())})")
    guidance = _REGISTRY[name](cfg_guidance, prior)
    guidance.total_steps = None if steps is None else int(steps)
    return guidance
