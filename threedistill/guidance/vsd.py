"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023).

    grad_theta L = E_{t, eps, c} [ w(t) (eps_cfg(x_t; y, t) - eps_lora(x_t; y, c, t)) dx/dtheta ]

``eps_lora`` is the prior with a LoRA and a camera embedding (:class:`CameraLoRA`), trained each step
on the detached render with the ordinary denoising loss, so it tracks the score of the current
scene's renders rather than the injected noise that SDS subtracts.

With ``guidance.perp_neg`` only the pretrained term ``eps_cfg`` goes through Perp-Neg (the core's
predict_cfg): it is the text-conditioned score the scene is pulled towards. ``eps_lora`` models the
scene's own renders (conditioned on the view prompt and the camera) and is trained on them, so it
is left as it is (ESD's camera-free term alike).
"""

from __future__ import annotations

import torch

from threedistill.guidance.base import Guidance, GuidanceContext, register
from threedistill.guidance.lora import CameraLoRA, use_gradient_checkpointing


@register("vsd")
class VSD(Guidance):
    def __init__(self, cfg, prior):
        super().__init__(cfg, prior)
        self.lora = CameraLoRA(prior, rank=cfg.lora_rank, camera_dropout=cfg.camera_dropout,
                               gradient_checkpointing=use_gradient_checkpointing(
                                   getattr(cfg, "gradient_checkpointing", "auto"), prior))

    def particle_score(self, ctx: GuidanceContext) -> torch.Tensor:
        """eps_lora(x_t; y, c): the LoRA model's estimate with this view's camera."""
        camera = self.lora.camera_condition(ctx.cameras.c2w)
        return self.lora.predict(ctx.x_t, ctx.t, ctx.cond, camera, ctx.cond_mask)

    def gradient(self, ctx: GuidanceContext):
        eps_cfg, ctx.eps_uncond, _ = self.predict_cfg(ctx.x_t, ctx.t, ctx.cond, ctx.uncond, ctx.guidance_scale,
                                                      ctx.cond_mask, ctx.uncond_mask, ctx.perp_neg)
        return eps_cfg - self.particle_score(ctx), {}

    def state_loss(self, ctx: GuidanceContext) -> torch.Tensor:
        return self.lora.training_loss(ctx.z, ctx.cond, ctx.cameras.c2w, ctx.cond_mask, ctx.generator)
