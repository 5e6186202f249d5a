"""Classifier Score Distillation (Yu et al. 2023).

    grad_theta L = E [ w(t) (eps(x_t; y) - eps(x_t; empty)) dx/dtheta ]

the implicit classifier's score alone, without SDS's denoising term and without a CFG scale. With
a negative prompt the classifier score towards it is subtracted:

    w(t) [ (eps_y - eps_empty) - w_neg (eps_neg - eps_empty) ],   w_neg = guidance.negative_weight

(annealed 0 -> 1 by default). All predictions go in one batched UNet call.

With ``guidance.perp_neg`` the classifier score ``eps_y - eps_empty`` is Perp-Neg's direction
relative to the same unconditional ``eps_empty`` (the other views' classifier scores, made orthogonal
to this view's and subtracted; the core's predict_guided). The negative-prompt term is a separate,
user-chosen negative and is kept as it is (not orthogonalised: CSD's paper subtracts it whole).
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
            _, classifier, _ = self.predict_guided(ctx.x_t, ctx.t, ctx.cond, null, ctx.cond_mask, null_mask,
                                                   perp_neg=ctx.perp_neg)
            return classifier, {}
        eps_empty, classifier, (eps_neg,) = self.predict_guided(ctx.x_t, ctx.t, ctx.cond, null, ctx.cond_mask,
                                                                null_mask, [ctx.uncond], [ctx.uncond_mask],
                                                                perp_neg=ctx.perp_neg)
        ctx.eps_uncond = eps_neg
        w_neg = float(scheduled(self.cfg.negative_weight, ctx.step, "guidance.negative_weight"))
        return classifier - w_neg * (eps_neg - eps_empty), {"negative_weight": w_neg}
