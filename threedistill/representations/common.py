"""What the representations share: the shading / background settings (a config base class and a
mixin that reads them), the shading of surface points, the per-batch shading-mode draw, solid
backgrounds, and the normalisation of depth.

Shading
-------
Training: albedo only before ``ambient_only_steps``; afterwards one mode per batch, drawn from the
render ``generator``: ``albedo`` (p = albedo_prob), ``textureless`` (white albedo, lit,
p = textureless_prob), else ``diffuse``: ``albedo * (ambient + (1 - ambient) * max(0, n . l))`` with
``l`` the unit vector from the point to its light. Evaluation renders are ``diffuse``.

Backgrounds
-----------
``white`` / ``black``: solid; ``random``: a random solid color per image while training, white at
evaluation. While training, a background may be replaced, with probability
``random_background_prob`` per image, by a random solid color (:func:`random_replacement`).

Depth
-----
``depth = (sum_i w_i t_i + (1 - alpha) * far) / far`` clamped to ``[0, 1]``, ``t_i`` the distance
along the ray and ``far = |camera| + radius * sqrt(3)`` the farthest any point of the cube
``[-radius, radius]^3`` can be from the camera; empty pixels read 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from threedistill.errors import UserError
from threedistill.groups import MAX_STEPS, check_choice, check_positive, check_unit, scheduled

SHADING_MODES = ("albedo", "textureless", "diffuse")
#: Background modes every representation renders (the NeRF adds its learned ``mlp``).
SOLID_BACKGROUNDS = ("white", "black", "random")


# ----------------------------------------------------------------------------------------------
# Config: the fields the representation groups share
# ----------------------------------------------------------------------------------------------
@dataclass
class BackgroundConfig:
    """Scene size and background, shared by every representation group (a group re-declares a
    field where its default differs)."""

    # Scene radius: depth is normalized by |camera| + radius * sqrt(3) (:func:`far_distance`).
    radius: float = 1.0
    # "white", "black" or "random" (random solid color per training image, white at evaluation).
    # White is the shapes world's background (the default prior's).
    background: str = "white"
    # While training, the background is replaced by a random solid color with this probability
    # per image.
    random_background_prob: float = 0.0


@dataclass
class ShadingConfig(BackgroundConfig):
    """Lit representations (NeRF, mesh): the shading-mode draw and the ambient term (module
    docstring). The defaults suit the shapes prior, which never saw untextured objects;
    threedistill/presets/sd.yaml sets DreamFusion's 1000 / 0.2 / 0.2 for the NeRF with Stable Diffusion."""

    # Albedo only before this step, then random among albedo / textureless / diffuse.

    ambient_only_steps: int = 100
    albedo_prob: float = 0.5
    textureless_prob: float = 0.0
    ambient_light: float = 0.1


#: Bounds of the shared numbers (:func:`~threedistill.groups.check_bounds`): the scene radius in
#: scene units (the shapes world lies within 0.5, Stable Diffusion scenes within ~2), probabilities.
BACKGROUND_BOUNDS = {"radius": (1e-3, 1000.0), "random_background_prob": (0.0, 1.0)}
SHADING_BOUNDS = {**BACKGROUND_BOUNDS, "ambient_only_steps": (0, MAX_STEPS), "albedo_prob": (0.0, 1.0),
                  "textureless_prob": (0.0, 1.0), "ambient_light": (0.0, 1.0)}
#: Fixed per-group learning rates (the Gaussians', the mesh's): above 10 only diverges.
LR_BOUNDS = (0.0, 10.0)
#: Regularizer weights (schedules: their values); the presets use up to 1e4.
LAMBDA_BOUNDS = (0.0, 1e8)


def check_background(node: Any, key: str, choices: Sequence[str] = SOLID_BACKGROUNDS) -> None:
    """``node.background`` (a group's dotted path ``key``) is one of ``choices``."""
    check_choice(node.background, f"{key}.background", choices)


def check_radius(node: Any, key: str) -> None:
    check_positive(node.radius, f"{key}.radius")


def check_shading(node: Any, key: str) -> None:
    """The shading-mode draw's probabilities (a :class:`ShadingConfig` group ``key``; their ranges
    are in :data:`SHADING_BOUNDS`) add up to at most 1: the rest is ``diffuse``."""
    if node.albedo_prob + node.textureless_prob > 1.0:
        raise UserError(f"config keys '{key}.albedo_prob' + 'textureless_prob' must be <= 1, "
                        f"got {node.albedo_prob} + {node.textureless_prob}")


def check_unit_keys(node: Any, key: str, names: Sequence[str]) -> None:
    """Each of ``node.<name>`` lies within [0, 1]."""
    for name in names:
        check_unit(getattr(node, name), f"{key}.{name}")


# ----------------------------------------------------------------------------------------------
# Shading
# ----------------------------------------------------------------------------------------------
def shade(albedo: torch.Tensor, normal: Optional[torch.Tensor], x: torch.Tensor, light: torch.Tensor,
          mode: str, ambient_light: float) -> torch.Tensor:
    """Color ``[N,3]`` of surface points ``x [N,3]`` with ``albedo [N,3]``, unit ``normal [N,3]``
    and ``light [N,3]`` (each point's light position) in shading ``mode`` (:data:`SHADING_MODES`):
    ``albedo``; ``textureless``: white, lit; ``diffuse``:
    ``albedo * (ambient + (1 - ambient) * max(0, n . l))`` with ``l`` the unit vector to the light."""
    if mode == "albedo":
        return albedo
    assert normal is not None
    l_dir = F.normalize(light - x.detach(), dim=-1, eps=1e-12)
    lambert = (normal * l_dir).sum(dim=-1, keepdim=True).clamp_min(0.0)
    shading = ambient_light + (1.0 - ambient_light) * lambert
    if mode == "textureless":
        return shading.expand(-1, 3)
    return albedo * shading


def shade_image(albedo: torch.Tensor, normal: torch.Tensor, points: torch.Tensor, lights: torch.Tensor,
                mode: str, ambient_light: float) -> torch.Tensor:
    """:func:`shade` per pixel of images (deferred shading): ``albedo``, unit ``normal`` and surface
    ``points`` ``[B,3,H,W]``, one light position per image ``lights [B,3]`` -> ``[B,3,H,W]``."""
    B, _, H, W = albedo.shape
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731  [B,3,H,W] -> [BHW,3]
    light = lights.to(points.dtype)[:, :, None, None].expand_as(points)
    out = shade(flat(albedo), flat(normal), flat(points), flat(light), mode, ambient_light)
    return out.reshape(B, H, W, 3).permute(0, 3, 1, 2)


def draw_shading_mode(step: int, training: bool, generator: Optional[torch.Generator], ambient_only_steps: int,
                      albedo_prob: float, textureless_prob: float) -> str:
    """The shading mode of one training batch (module docstring): ``diffuse`` at evaluation,
    ``albedo`` before ``ambient_only_steps``, then one uniform draw from ``generator``."""
    if not training:
        return "diffuse"
    if step < ambient_only_steps:
        return "albedo"
    u = float(torch.rand(1, generator=generator))
    if u < albedo_prob:
        return "albedo"
    if u < albedo_prob + textureless_prob:
        return "textureless"
    return "diffuse"


# ----------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------
def random_replacement(n_images: int, prob: float, generator: Optional[torch.Generator], device
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which images get a random solid background (``[B]`` bool, each with probability ``prob``)
    and their colors ``[B,3]``; drawn from ``generator`` in that order."""
    replace = (torch.rand(n_images, generator=generator) < prob).to(device)
    colors = torch.rand(n_images, 3, generator=generator).to(device)
    return replace, colors


def solid_background(n_images: int, mode: str, random_prob: float, training: bool,
                     generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Solid background color per image ``[B,3]`` for ``mode`` white / black / random (random:
    a color per image while training, white at evaluation); while training, white/black are
    replaced by a random color with probability ``random_prob`` per image. Random draws come from
    ``generator``, only while training."""
    if mode == "random":
        if not training:
            return torch.ones(n_images, 3, device=device)
        return torch.rand(n_images, 3, generator=generator).to(device)
    bg = torch.full((n_images, 3), 1.0 if mode == "white" else 0.0, device=device)
    if training and random_prob > 0:
        replace, colors = random_replacement(n_images, random_prob, generator, device)
        bg = torch.where(replace[:, None], colors, bg)
    return bg


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------
def far_distance(camera_positions: torch.Tensor, radius: float) -> torch.Tensor:
    """``|camera| + radius * sqrt(3)`` per camera (``[B,3]`` -> ``[B]``): the farthest any point of
    the cube ``[-radius, radius]^3`` can be."""
    return camera_positions.norm(dim=-1) + radius * math.sqrt(3.0)


def normalized_depth(distance_sum: torch.Tensor, alpha: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """``(distance_sum + (1 - alpha) * far) / far`` clamped to ``[0, 1]`` (module docstring):
    ``distance_sum`` is the alpha-weighted distance along the ray, ``far`` broadcasts against it."""
    return ((distance_sum + (1.0 - alpha) * far) / far).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Opacity
# ----------------------------------------------------------------------------------------------
def transmittance_term(out: Any, step: int, weight: Any, target: Any) -> dict:
    """Dream Fields' transmittance loss (Jain et al. 2022, "Zero-Shot Text-Guided Object Generation
    with Dream Fields", eq. 3): ``weight * mean_images -min(target, mean_pixels(1 - alpha))``, both
    scheduled scalars at ``step``. Each image whose mean transmittance is below ``target`` is
    pushed towards transparency; one at or above it gets no gradient. ``{}`` when the weight is 0,
    else ``{"transmittance": term}``."""
    w = float(scheduled(weight, step, "lambda_transmittance") or 0.0)
    if w == 0.0:
        return {}
    tau = float(scheduled(target, step, "transmittance_target"))
    mean_t = (1.0 - out.alpha).flatten(1).mean(dim=1)
    return {"transmittance": w * (-mean_t.clamp(max=tau)).mean()}


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def clamped_logit(p: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p`` clamped to ``[1e-6, 1 - 1e-6]`` (finite at 0 and 1)."""
    p = p.clamp(1e-6, 1.0 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


# ----------------------------------------------------------------------------------------------
# The representations' side
# ----------------------------------------------------------------------------------------------
class Appearance:
    """Mixin of the representations: the shared settings of their config group as plain values
    (``radius``, ``background_mode``, ``random_background_prob`` and, for lit ones,
    ``ambient_only_steps``, ``albedo_prob``, ``textureless_prob``, ``ambient_light``) and the
    operations on them."""

    radius: float
    background_mode: str
    random_background_prob: float
    ambient_only_steps: int
    albedo_prob: float
    textureless_prob: float
    ambient_light: float

    def _read_appearance(self, c: Any, backgrounds: Sequence[str] = SOLID_BACKGROUNDS, lit: bool = True) -> None:
        """Copy the settings of group ``c`` (a :class:`ShadingConfig`, or a
        :class:`BackgroundConfig` when not ``lit``)."""
        self.radius = float(c.radius)
        self.background_mode = str(c.background)
        self.random_background_prob = float(c.random_background_prob)
        if self.background_mode not in backgrounds:
            raise ValueError(f"unknown background '{self.background_mode}'")
        if lit:
            self.ambient_only_steps = int(c.ambient_only_steps)
            self.albedo_prob = float(c.albedo_prob)
            self.textureless_prob = float(c.textureless_prob)
            self.ambient_light = float(c.ambient_light)

    def _draw_shading(self, step: int, training: bool, generator: Optional[torch.Generator]) -> str:
        return draw_shading_mode(step, training, generator, self.ambient_only_steps, self.albedo_prob,
                                 self.textureless_prob)

    def _shade(self, albedo: torch.Tensor, normal: Optional[torch.Tensor], x: torch.Tensor,
               light: torch.Tensor, mode: str) -> torch.Tensor:
        """Per-point color ``[N,3]``; ``light [N,3]`` is the light position of each point."""
        return shade(albedo, normal, x, light, mode, self.ambient_light)

    def _solid_background(self, n_images: int, training: bool, generator: Optional[torch.Generator],
                          device) -> torch.Tensor:
        """Background color per image ``[B,3]`` (random draws from ``generator`` only while training)."""
        return solid_background(n_images, self.background_mode, self.random_background_prob, training, generator,
                                device)


__all__ = [
    "SHADING_MODES", "SOLID_BACKGROUNDS", "Appearance", "BackgroundConfig", "ShadingConfig", "check_background",
    "check_radius", "check_shading", "check_unit_keys", "clamped_logit", "draw_shading_mode", "far_distance", "normalized_depth",
    "random_replacement", "shade", "shade_image", "solid_background", "transmittance_term",
]
