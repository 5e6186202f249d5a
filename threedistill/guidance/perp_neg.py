"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm: Transform 2D
Diffusion into 3D, alleviate Janus problem and Beyond", arXiv:2304.04968), as a guidance modifier.

For a camera at azimuth ``a`` the positive text is the view's own prompt; the negatives are the
neighbouring views' prompts. Each negative's guidance direction is made orthogonal to the
positive's (per sample, over all model-space dims), so pushing away from "side view" cannot undo
what "front view" asks for, and the guided prediction is

    eps = eps_base + s * [ d_pos - sum_i w_i * perp(d_neg_i, d_pos) ]
    d_pos = eps_pos - eps_base,  d_neg_i = eps_neg_i - eps_base
    perp(x, y) = x - (<x, y> / <y, y>) y

Negatives and weights per camera (the paper's Sec. 4 / threestudio's ``use_perp_neg``, whose
weight functions ``w(r) = a * exp(-b * r) + c`` and default (a, b, c) are used here):

* ``|a| < 90``: interpolation factor ``r = 1 - |a| / 90`` (1 front, 0 side); negatives
  front with ``f_fs(r)`` and side with ``f_sf(1 - r)``. At the front (r = 1) only "side" is
  pushed away (f_fs(1) = 0); at the side only "front" (f_sf(1) = 0).
* ``|a| >= 90``: ``r = 2 - |a| / 90`` (1 side, 0 back); negatives side with ``f_sb(r)`` and
  front with ``f_fsb(r)``. At the back both the side (0.39) and the front (1.97) are pushed away.
* above ``camera.overhead_threshold``: no negative (weights 0), the overhead prompt alone.

The weights depend only on the camera, never on the step, so checkpoints resume bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from threedistill.cameras import wrap_azimuth

#: threestudio's defaults (prompt_processors/base.py; a * exp(-b * r) + c with f(1) ~ 0 where a
#: negative must vanish).
DEFAULT_F_FS = (4.0, 0.5, -2.426)
DEFAULT_F_SF = (4.0, 0.5, -2.426)
DEFAULT_F_SB = (1.0, 0.5, -0.606)
DEFAULT_F_FSB = (1.0, 0.5, 0.967)

#: Number of negative texts per camera (one more UNet batch item each).
NUM_NEGATIVES = 2


def decay(abc: Sequence[float], r: torch.Tensor) -> torch.Tensor:
    """``a * exp(-b * r) + c``: the paper's / threestudio's shifted exponential weight function."""
    a, b, c = (float(v) for v in abc)
    return a * torch.exp(-b * r) + c


@dataclass
class PerpNegPlan:
    """Which view label each negative slot uses per camera, and its weight ``[B, K]``."""

    labels: List[List[str]]  # K lists of B labels (slot k of every camera)
    weights: torch.Tensor  # [B, K] float32


def plan(elevation: torch.Tensor, azimuth: torch.Tensor, overhead_threshold: float, f_fs: Sequence[float],
         f_sf: Sequence[float], f_sb: Sequence[float], f_fsb: Sequence[float]) -> PerpNegPlan:
    """The negatives of each camera (degrees) and their weights, as in the module docstring."""
    elevation = elevation.detach().float().reshape(-1).cpu()
    a = wrap_azimuth(azimuth.detach().float().reshape(-1).cpu()).abs()
    near = a < 90.0
    r_near = 1.0 - a / 90.0
    r_far = 2.0 - a / 90.0
    w0 = torch.where(near, decay(f_fs, r_near), decay(f_sb, r_far))
    w1 = torch.where(near, decay(f_sf, 1.0 - r_near), decay(f_fsb, r_far))
    weights = torch.stack([w0, w1], dim=1)
    over = elevation > overhead_threshold
    weights[over] = 0.0
    slot0 = ["front" if n else "side" for n in near.tolist()]
    slot1 = ["side" if n else "front" for n in near.tolist()]
    return PerpNegPlan(labels=[slot0, slot1], weights=weights)


@dataclass
class PerpNegTexts:
    """What the core's batched prediction needs: K negative embeddings ``[B,L,D]`` (and masks
    ``[B,L]`` for T5-style encoders) and the weights ``[B,K]``."""

    texts: List[torch.Tensor]
    masks: Optional[List[torch.Tensor]]
    weights: torch.Tensor


def perpendicular(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The component of ``x`` orthogonal to ``y``, per sample (dim 0) over all other dims."""
    xf, yf = x.flatten(1), y.flatten(1)
    coef = (xf * yf).sum(1) / (yf * yf).sum(1).clamp_min(eps)
    return x - coef.view(-1, *([1] * (x.dim() - 1))) * y


def combine(eps_base: torch.Tensor, eps_pos: torch.Tensor, eps_negs: Sequence[torch.Tensor],
            weights: torch.Tensor) -> torch.Tensor:
    """The Perp-Neg direction ``d_pos - sum_i w_i perp(d_neg_i, d_pos)`` (to be scaled by the CFG
    scale and added to ``eps_base``). ``weights [B, K]``."""
    d_pos = eps_pos - eps_base
    out = d_pos
    for i, eps_neg in enumerate(eps_negs):
        w = weights[:, i].to(device=d_pos.device, dtype=d_pos.dtype).view(-1, *([1] * (d_pos.dim() - 1)))
        out = out - w * perpendicular(eps_neg - eps_base, d_pos)
    return out
