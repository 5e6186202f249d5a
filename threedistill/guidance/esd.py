"""Entropic Score Distillation (Wang et al. 2024, "Taming Mode Collapse in Score Distillation").

    grad_theta L = E [ w(t) (eps_cfg(x_t; y) - [lambda eps_lora(x_t; y, no camera)
                                                + (1 - lambda) eps_lora(x_t; y, camera)]) dx/dtheta ]

VSD with part of the particle score taken without the camera: the camera-free score is the
score of the distribution of *all* views, whose entropy the loss then raises, against the
Janus (same-face-everywhere) collapse. lambda = 0 is VSD. Both LoRA predictions go in one call.
"""

from __future__ import annotations

import torch

from threedistill.guidance.base import GuidanceContext, register
from threedistill.guidance.vsd import VSD


@register("esd")
class ESD(VSD):
    def particle_score(self, ctx: GuidanceContext) -> torch.Tensor:
        lam = float(self.cfg.esd_lambda)
        if lam == 0.0:
            return super().particle_score(ctx)
        with_camera = self.lora.camera_condition(ctx.cameras.c2w)
        no_camera = torch.zeros_like(with_camera)
        mask = None if ctx.cond_mask is None else torch.cat([ctx.cond_mask, ctx.cond_mask])
        eps = self.lora.predict(torch.cat([ctx.x_t, ctx.x_t]), torch.cat([ctx.t, ctx.t]),
                                torch.cat([ctx.cond, ctx.cond]), torch.cat([no_camera, with_camera]), mask)
        eps_free, eps_cam = eps.chunk(2)
        return lam * eps_free + (1 - lam) * eps_cam
