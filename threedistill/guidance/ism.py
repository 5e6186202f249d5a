"""Interval Score Matching (LucidDreamer, Liang et al. 2024).

    grad_theta L = E [ w(t) (eps_cfg(x_t; y, t) - eps(x_s; empty, s)) dx/dtheta ],  s = t - delta_t
    w(t) = sqrt((1 - abar_t) / abar_t)

Instead of a one-step noising, ``x_s`` and ``x_t`` come from deterministic DDIM inversion of the
render with the empty prompt: from ``x`` (noised to ``start = max(s - n * stride, 0)``) up to ``s``
in at most ``n = guidance.xs_inv_steps`` steps of ``stride = guidance.xs_delta_t``, then one step
``s -> t``. The epsilon predicted at ``x_s`` for that last step is the target, so the loss costs the
inversion steps plus one guided batch.

With ``guidance.perp_neg`` the guided ``eps_cfg`` at ``x_t`` goes through Perp-Neg (the core's
predict_cfg); the inversion target ``eps(x_s; empty)`` is the unconditional trajectory and is not
guided, so it stays as it is.
"""

from __future__ import annotations

from typing import Optional

import torch

from threedistill.groups import scheduled
from threedistill.guidance.base import Guidance, GuidanceContext, register


@register("ism")
class ISM(Guidance):
    default_weighting = "ism"

    def interval(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """``s = max(t - delta_t, 0)`` with the (scheduled) ``guidance.delta_t``."""
        delta = int(round(scheduled(self.cfg.delta_t, step, "guidance.delta_t")))
        return (t - delta).clamp_min(0)

    def ddim_invert(self, z: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                    text: torch.Tensor, text_mask: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Deterministic DDIM inversion of clean ``z`` with ``text`` to ``s`` and then one step to ``t``.

        Returns ``(x_s, x_t, eps_s, unet_calls)``: ``eps_s`` is the prediction at ``(x_s, s)`` that
        moved ``x_s`` to ``x_t``. Items of the batch with fewer inversion steps sit still while the
        others catch up (one batched UNet call per step)."""
        prior = self.prior
        stride, n = int(self.cfg.xs_delta_t), int(self.cfg.xs_inv_steps)
        cur = (s - stride * n).clamp_min(0)
        x = prior.add_noise(z, noise, cur)
        calls = 0
        while bool((cur < s).any()):
            nxt = torch.minimum(cur + stride, s)
            moving = (cur < s).view(-1, 1, 1, 1)
            eps = prior.predict_noise(x, cur, text, text_mask)
            x = torch.where(moving, prior.ddim_step(x, eps, cur, nxt), x)
            cur = torch.where(cur < s, nxt, cur)
            calls += 1
        eps_s = prior.predict_noise(x, s, text, text_mask)
        x_t = prior.ddim_step(x, eps_s, s, t)
        return x, x_t, eps_s, calls + 1

    def gradient(self, ctx: GuidanceContext):
        s = self.interval(ctx.t, ctx.step)
        null, null_mask = self.null_embeddings(ctx.z.shape[0])
        _, x_t, eps_s, calls = self.ddim_invert(ctx.z, ctx.noise, s, ctx.t, null, null_mask)
        eps_cfg, _, _ = self.predict_cfg(x_t, ctx.t, ctx.cond, ctx.uncond, ctx.guidance_scale,
                                         ctx.cond_mask, ctx.uncond_mask, ctx.perp_neg)
        return eps_cfg - eps_s, {"ism_s": s.float().mean(), "ism_inversion_calls": float(calls)}
