"""Noise-Free Score Distillation (Katzir et al. 2024).

    grad_theta L = E [ w(t) (delta_D + s delta_C) dx/dtheta ]
    delta_C = eps(x_t; y) - eps(x_t; empty)
    delta_D = eps(x_t; empty)                          if t < 200 (of 1000)
              eps(x_t; empty) - eps(x_t; negative)     otherwise

SDS's noise term is replaced by the domain correction delta_D, which needs a negative prompt
describing what renders look like and images should not. The paper fixes one (:data:`PAPER_NEGATIVE_PROMPT`), used when ``prior.negative_prompt``
is empty.
One batched UNet call for the three predictions.

With ``guidance.perp_neg`` the condition term ``delta_C`` is Perp-Neg's direction relative to the
same ``eps(x_t; empty)`` (the core's predict_guided): it is the part that carries the view prompt.
``delta_D`` (the domain correction: empty vs the fixed negative prompt) does not depend on the view
and is kept as it is.
"""

from __future__ import annotations

import torch

from threedistill.guidance.base import Guidance, GuidanceContext, register

#: The paper's fixed negative prompt p_neg (Katzir et al., "Noise-Free Score Distillation"; the same
#: string in threestudio's NFSD implementations).
PAPER_NEGATIVE_PROMPT = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                         "low-resolution, gloomy")

#: Below this fraction of the diffusion steps delta_D is the unconditional prediction alone.
SMALL_T_FRACTION = 0.2


@register("nfsd")
class NFSD(Guidance):
    default_negative_prompt = PAPER_NEGATIVE_PROMPT

    def gradient(self, ctx: GuidanceContext):
        B = ctx.x_t.shape[0]
        null, null_mask = self.null_embeddings(B)
        eps_empty, delta_c, (eps_neg,) = self.predict_guided(ctx.x_t, ctx.t, ctx.cond, null, ctx.cond_mask, null_mask,
                                                             [ctx.uncond], [ctx.uncond_mask], perp_neg=ctx.perp_neg)
        ctx.eps_uncond = eps_neg
        small_t = (ctx.t < SMALL_T_FRACTION * self.prior.num_train_timesteps).view(-1, 1, 1, 1)
        delta_d = torch.where(small_t, eps_empty, eps_empty - eps_neg)
        return delta_d + ctx.guidance_scale * delta_c, {}
