"""Adaptive density control of 3D Gaussians (3D Gaussian Splatting, Kerbl et al. 2023) as a
strategy object, in the manner of gsplat's ``strategy/default.py``: the settings are a dataclass
(:class:`DensifyStrategy`), the running statistics an explicit state (:class:`DensifyState`), and
the training loop reaches it through three hooks:

* :meth:`~DensifyStrategy.step_pre_backward` (in the training render): keep the gradient of the
  projected means ``means2d``;
* :meth:`~DensifyStrategy.step_post_backward` (after the backward pass, before the optimizer
  step): accumulate, per Gaussian and per camera where it is visible (``radii > 0``), the norm of
  that gradient in NDC units (pixels x ``W/2``, ``H/2``, times the number of cameras in the batch,
  as gsplat's default strategy does), and count the visible cameras;
* :meth:`~DensifyStrategy.step_post_optimizer` (after the optimizer step of ``step``, 0-based):
  every ``every`` steps done within ``(start, stop]`` one round of :meth:`densify_and_prune`, and
  every ``reset_every`` steps done up to ``stop`` :meth:`reset_opacity`.

One round of densification:

* candidates: mean accumulated gradient > ``grad_threshold``, not being pruned;
* **clone** the candidates whose largest scale is <= ``clone_scale`` (an exact copy), **split** the
  others into two Gaussians drawn from the parent's own distribution (means ``mu + R diag(s) z``,
  ``z ~ N(0, I)`` from the generator) with scales ``s / 1.6`` (the parent goes);
* **prune** opacity < ``prune_opacity`` or largest scale > ``prune_scale``;
* keep at most ``max_gaussians`` (only the highest-gradient candidates grow when the budget is short).

The parameters (gsplat's convention: a dict ``means``, ``scales`` (log), ``quats``, ``opacities``
(logits), ``colors`` (logits) of ``nn.Parameter``) are resized in place (``param.data`` is
replaced, the Parameter objects stay, so optimizer groups keep pointing at them) and the
optimizer's per-parameter state (Adam moments) is gathered with the same indices, with zeros for
new Gaussians. The reset clamps opacities to ``2 x prune_opacity`` and zeroes their moments.
Split draws come from ``step_generator(seed, step, STREAM_DENSIFY)``, so a resumed run draws what
the uninterrupted one did.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from threedistill.cameras import STREAM_DENSIFY, step_generator
from threedistill.representations.base import RenderOutput
from threedistill.representations.common import clamped_logit
from threedistill.representations.gaussian_raster import quat_to_rotmat

log = logging.getLogger(__name__)


@dataclass
class DensifyState:
    """The running statistics, one entry per Gaussian. The owner keeps the tensors (the Gaussians
    hold them as the buffers ``grad2d_sum`` / ``grad2d_count``, so checkpoints carry them); the
    strategy changes them in place only, never rebinding them."""

    grad2d_sum: torch.Tensor  # [N] accumulated NDC norm of the means2d gradient
    grad2d_count: torch.Tensor  # [N] number of cameras that saw each Gaussian

    @staticmethod
    def zeros(n: int, device: Any = "cpu") -> "DensifyState":
        return DensifyState(torch.zeros(n, device=device), torch.zeros(n, device=device))

    def reset(self, n: int, device: Any) -> None:
        """Zero statistics for ``n`` Gaussians (in place: the tensors are resized)."""
        self.grad2d_sum.data = torch.zeros(n, device=device)
        self.grad2d_count.data = torch.zeros(n, device=device)


@dataclass
class DensifyStrategy:
    """Settings of the adaptive density control (module docstring). Scales are absolute (world
    units); :meth:`from_group` derives them from ``representation.gaussians``."""

    start: int = 100  # densify after steps done > start ...
    stop: int = 400  # ... and <= stop
    every: int = 100  # every this many steps done; 0 turns densification and the reset off
    grad_threshold: float = 1.0
    clone_scale: float = 0.01
    prune_opacity: float = 0.005
    prune_scale: float = 0.1
    reset_every: int = 0  # 0: never
    max_gaussians: int = 20000
    seed: int = 0  # run.seed: the split draws' generator

    @classmethod
    def from_group(cls, c: Any, seed: int, steps: int) -> "DensifyStrategy":
        """From the ``representation.gaussians`` group ``c`` of a run of ``steps`` steps with
        ``seed`` (``densify_until`` null: half of the steps)."""
        radius = float(c.radius)
        until = c.densify_until if c.densify_until is not None else int(steps) // 2
        return cls(start=int(c.densify_from), stop=int(until), every=int(c.densify_every),
                   grad_threshold=float(c.densify_grad_threshold),
                   clone_scale=float(c.densify_scale_threshold) * radius,
                   prune_opacity=float(c.prune_opacity), prune_scale=float(c.prune_scale) * radius,
                   reset_every=int(c.opacity_reset_every), max_gaussians=int(c.max_gaussians), seed=int(seed))

    # ------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------
    def step_pre_backward(self, means2d: torch.Tensor) -> None:
        """In a training render: keep the gradient of ``means2d [B,N,2]`` for the statistics."""
        if means2d.requires_grad:
            means2d.retain_grad()

    @torch.no_grad()
    def step_post_backward(self, state: DensifyState, out: RenderOutput, step: int) -> None:
        """Accumulate the view-space positional gradient of the render ``out`` of ``step`` (only
        while densification can still happen)."""
        if self.every <= 0 or step + 1 > self.stop:
            return
        means2d = out.extras.get("means2d")
        if means2d is None or means2d.grad is None:
            return
        g = means2d.grad.detach()  # [B,N,2] pixels
        B, H, W = g.shape[0], out.rgb.shape[-2], out.rgb.shape[-1]
        g = g * torch.tensor([W / 2.0 * B, H / 2.0 * B], device=g.device, dtype=g.dtype)
        visible = out.extras["radii"] > 0  # [B,N]
        state.grad2d_sum += torch.where(visible, g.norm(dim=-1), torch.zeros((), device=g.device)).sum(0)
        state.grad2d_count += visible.sum(0).to(state.grad2d_count.dtype)

    def step_post_optimizer(self, params: Dict[str, nn.Parameter], optimizer: Optional[torch.optim.Optimizer],
                            state: DensifyState, step: int) -> None:
        """After the optimizer step of ``step`` (0-based): densify + prune, and reset opacities,
        on their schedules."""
        done = step + 1
        if optimizer is None or self.every <= 0:
            return
        if self.start < done <= self.stop and done % self.every == 0:
            self.densify_and_prune(params, optimizer, state, step_generator(self.seed, step, STREAM_DENSIFY))
        if self.reset_every > 0 and done <= self.stop and done % self.reset_every == 0:
            self.reset_opacity(params, optimizer)

    # ------------------------------------------------------------------------------------------
    # Operations
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def densify_and_prune(self, params: Dict[str, nn.Parameter], optimizer: Optional[torch.optim.Optimizer],
                          state: DensifyState, generator: Optional[torch.Generator] = None) -> Dict[str, int]:
        """One round of clone / split / prune; returns the counts (``cloned``, ``split``,
        ``pruned``, ``total``) and resets the statistics."""
        n = int(params["means"].shape[0])
        avg = state.grad2d_sum / state.grad2d_count.clamp_min(1.0)
        scales = torch.exp(params["scales"])
        max_scale = scales.amax(dim=-1)
        prune = (torch.sigmoid(params["opacities"]) < self.prune_opacity) | (max_scale > self.prune_scale)
        grow = (avg > self.grad_threshold) & ~prune
        budget = max(self.max_gaussians - (n - int(prune.sum())), 0)  # every grown Gaussian adds one
        if int(grow.sum()) > budget:
            order = torch.argsort(torch.where(grow, avg, torch.full_like(avg, -1.0)), descending=True, stable=True)
            grow = torch.zeros_like(grow)
            grow[order[:budget]] = True
        clone = grow & (max_scale <= self.clone_scale)
        split = grow & ~clone

        values = {k: p.detach() for k, p in params.items()}
        new: Dict[str, List[torch.Tensor]] = {k: [p[clone]] for k, p in values.items()}
        si = split.nonzero().squeeze(1)
        if si.numel():
            rot = quat_to_rotmat(values["quats"][si])  # [S,3,3]
            s = scales[si]
            z = torch.randn(2, si.numel(), 3, generator=generator).to(s.device)
            offsets = (rot[None] @ (z * s[None])[..., None])[..., 0]  # [2,S,3]
            new["means"].append((values["means"][si][None] + offsets).reshape(-1, 3))
            new["scales"].append((values["scales"][si] - math.log(1.6)).repeat(2, 1))
            for k in ("quats", "opacities", "colors"):
                new[k].append(values[k][si].repeat(2, *([1] * (values[k].dim() - 1))))
        keep = (~prune & ~split).nonzero().squeeze(1)
        added = int(clone.sum()) + 2 * si.numel()
        resize_parameters(params, optimizer, keep, {k: torch.cat(v) for k, v in new.items()})
        total = int(params["means"].shape[0])
        state.reset(total, params["means"].device)
        stats = {"cloned": int(clone.sum()), "split": si.numel(), "pruned": int(prune.sum()), "total": total}
        assert stats["total"] == keep.numel() + added
        log.debug("densify: %s", stats)
        return stats

    @torch.no_grad()
    def reset_opacity(self, params: Dict[str, nn.Parameter], optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Clamp opacities to ``2 x prune_opacity`` and zero their optimizer moments."""
        p = params["opacities"]
        p.data = torch.minimum(p.data, clamped_logit(torch.tensor(2.0 * self.prune_opacity)).to(params["means"].device))
        st = optimizer.state.get(p) if optimizer is not None else None
        for v in (st or {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                v.zero_()


def resize_parameters(params: Dict[str, nn.Parameter], optimizer: Optional[torch.optim.Optimizer],
                      keep: torch.Tensor, new_rows: Dict[str, torch.Tensor]) -> None:
    """Each parameter becomes ``cat(param[keep], new_rows[name])`` in place (same Parameter
    objects); the optimizer's per-parameter tensors of matching leading size likewise, with zeros
    for the new rows."""
    state = optimizer.state if optimizer is not None else {}
    old_n = int(params["means"].shape[0])
    for name, p in params.items():
        rows = new_rows[name].to(p.dtype)
        p.data = torch.cat([p.data[keep], rows])
        p.grad = None
        st = state.get(p, {})
        for k, v in st.items():  # Adam's exp_avg / exp_avg_sq; its scalar "step" stays
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == old_n:
                st[k] = torch.cat([v[keep], v.new_zeros((rows.shape[0],) + tuple(v.shape[1:]))])


__all__ = ["DensifyState", "DensifyStrategy", "resize_parameters"]
