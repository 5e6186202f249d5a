"""The ``Representation`` interface: something that renders cameras and can be regularized,
checkpointed and exported.

Every representation (NeRF, Gaussians, mesh) returns a :class:`RenderOutput` whose images follow
the design contract: rgb ``[B,3,H,W]``, alpha/depth ``[B,1,H,W]``, normal ``[B,3,H,W]``, all in
``[0,1]`` (normals are mapped from [-1,1] by ``(n + 1) / 2``; depth is distance along the ray
divided by a representation-specific far value and clamped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from threedistill.cameras import CameraBatch


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B,3,H,W] composited over the background, in [0,1]
    alpha: torch.Tensor  # [B,1,H,W] accumulated opacity
    depth: torch.Tensor  # [B,1,H,W] normalized depth
    normal: Optional[torch.Tensor] = None  # [B,3,H,W] world normals mapped to [0,1]
    # Extra tensors the representation's own regularizers need (not part of the image contract).
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


class Representation(ABC, torch.nn.Module):
    """A differentiable 3D representation. Subclasses register themselves by name."""

    @abstractmethod
    def render(self, cameras: CameraBatch, step: int = 0, generator: Optional[torch.Generator] = None,
               training: bool = True) -> RenderOutput:
        """Render ``cameras`` (at ``cameras.height x cameras.width``). ``training`` enables random
        shading/background augmentation drawn from ``generator``; evaluation renders are
        deterministic (diffuse shading with a headlight, the learned background)."""

    @abstractmethod
    def regularizers(self, out: RenderOutput, step: int) -> Dict[str, torch.Tensor]:
        """Weighted regularizer terms (scalars) to add to the guidance loss; names are logged."""

    @abstractmethod
    def param_groups(self, optim_cfg) -> List[dict]:
        """Optimizer parameter groups: dicts with ``params``, ``name`` and ``lr_scale``."""

    def after_backward(self, out: RenderOutput, step: int) -> None:
        """After the backward pass of ``step``, before the optimizer step: read gradients the
        parameters' ``.grad`` does not hold (e.g. the Gaussians' view-space gradient)."""

    def update(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Per-step housekeeping after the optimizer step (e.g. occupancy-grid refresh,
        densification). A representation that changes its parameters' shapes must keep
        ``optimizer``'s per-parameter state consistent."""

    def log_stats(self) -> Dict[str, float]:
        """Scalars added to each step's metrics (e.g. the number of Gaussians)."""
        return {}

    # -- for export (implicit representations) --------------------------------------------------
    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Volume density at world points ``[N,3]`` -> ``[N]`` (implicit representations)."""
        raise NotImplementedError(f"{type(self).__name__} has no density field")

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Base colour in [0,1] at world points ``[N,3]`` -> ``[N,3]``."""
        raise NotImplementedError(f"{type(self).__name__} has no colour field")

    @property
    def isosurface_threshold(self) -> float:
        raise NotImplementedError

    @property
    def bounds(self) -> float:
        """Half side of the axis-aligned cube that contains the object."""
        return 1.0


_REGISTRY: Dict[str, type] = {}


def register(name: str):
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"representation {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls
    return deco


def representation_names() -> List[str]:
    return sorted(_REGISTRY)


def build_representation(cfg, device: torch.device) -> Representation:
    """Build ``cfg.representation.name`` with its sub-config (``cfg.representation.<name>``)."""
    from threedistill.errors import UserError
    import threedistill.representations  # noqa: F401  (registers the built-ins)

    name = cfg.representation.name
    if name not in _REGISTRY:
        raise UserError(f"unknown representation.name '{name}' (available: {', '.join(representation_names())})")
    return _REGISTRY[name](cfg, device=device)
