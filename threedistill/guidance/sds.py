"""Score Distillation Sampling (DreamFusion, Poole et al. 2022).

    grad_theta L = E_{t, eps} [ w(t) (eps_hat(x_t; y, t) - eps) dx/dtheta ]

with ``eps_hat = eps_u + s (eps_c - eps_u)`` (diffusers CFG form) and ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``.
With ``guidance.perp_neg`` the bracket ``(eps_c - eps_u)`` is Perp-Neg's direction (the core's
predict_cfg): the negatives are relative to the same ``eps_u`` (the negative prompt, "" by default).
"""

from __future__ import annotations

from threedistill.guidance.base import Guidance, GuidanceContext, register


@register("sds")
class SDS(Guidance):
    def gradient(self, ctx: GuidanceContext):
        eps_cfg, ctx.eps_uncond, _ = self.predict_cfg(ctx.x_t, ctx.t, ctx.cond, ctx.uncond, ctx.guidance_scale,
                                                      ctx.cond_mask, ctx.uncond_mask, ctx.perp_neg)
        return eps_cfg - ctx.noise, {}
