"""Classifier Score Distillation (Yu et al. 2023).

    grad_theta L = E [ w(t) (eps(x_t; y) - eps(x_t; empty)) dx/dtheta ]

the implicit classifier's score alone, without SDS's denoising term and without a CFG scale. With
a negative prompt the classifier score towards it is subtracted:

    w(t) [ (eps_y - eps_empty) - w_neg (eps_neg - eps_empty) ],   w_neg = guidance.negative_weight

(annealed 0 -> 1 by default). All predictions go in one batched UNet call.
"""

from __future__ import annotations

from threedistill.groups import scheduled
from threedistill.guidance.base import Guidance, GuidanceContext, register


@register("csd")
class CSD(Guidance):
    def gradient(self, ctx: GuidanceContext):
        B = ctx.x_t.shape[0]
        null, null_mask = self.null_embeddings(B)
        if not self.has_negative_prompt:
            eps_y, eps_empty = self.predict_batch(ctx.x_t, ctx.t, [ctx.cond, null], [ctx.cond_mask, null_mask])
            return eps_y - eps_empty, {}
        eps_y, eps_empty, eps_neg = self.predict_batch(ctx.x_t, ctx.t, [ctx.cond, null, ctx.uncond],
                                                       [ctx.cond_mask, null_mask, ctx.uncond_mask])
        w_neg = float(scheduled(self.cfg.negative_weight, ctx.step, "guidance.negative_weight"))
        return (eps_y - eps_empty) - w_neg * (eps_neg - eps_empty), {"negative_weight": w_neg}
