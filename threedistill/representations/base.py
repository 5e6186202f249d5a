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
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from threedistill.cameras import CameraBatch
from threedistill.errors import UserError


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B,3,H,W] composited over the background, in [0,1]
    alpha: torch.Tensor  # [B,1,H,W] accumulated opacity
    depth: torch.Tensor  # [B,1,H,W] normalized depth
    normal: Optional[torch.Tensor] = None  # [B,3,H,W] world normals mapped to [0,1]
    # Extra tensors the representation's own regularizers need (not part of the image contract).
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RepresentationContext:
    """What a representation may know of its run besides its own config group: the ``prompt``,
    the ``seed`` (its own random streams, e.g. densification draws) and the number of ``steps``
    (schedules that default to a fraction of the run).

    ``from_checkpoint``: the whole state is loaded from a checkpoint right after construction
    (:meth:`threedistill.runs.RunFolder.load_representation`), so the representation reads no
    input (``init`` files) and starts from its cheapest initial state of the right kind instead.
    """

    prompt: str
    seed: int
    steps: int
    from_checkpoint: bool = False

    @classmethod
    def of_run(cls, run_cfg: Any, from_checkpoint: bool = False) -> "RepresentationContext":
        """The context of a run config group (``run.prompt``, ``run.seed``, ``run.steps``)."""
        return cls(prompt=str(run_cfg.prompt), seed=int(run_cfg.seed), steps=int(run_cfg.steps),
                   from_checkpoint=from_checkpoint)


class Representation(ABC, torch.nn.Module):
    """A differentiable 3D representation. Subclasses register themselves by name and are built
    as ``cls(group, context, device)`` (:func:`build_representation`).

    Generic code (the loop, export, the pipeline, front ends) asks a representation everything
    it needs through the methods below, never by its type, its name or private attributes.
    """

    #: Where its settings live (``representation.<name>``), named in error messages such as the
    #: one for an isosurface threshold that finds no surface.
    config_key: str = "representation.<name>"

    #: Whether it can start from another run's surface (``init=run:RUN_DIR``), as the refine stage
    #: of a coarse-to-fine chain needs (:mod:`threedistill.pipeline`).
    refines_surfaces: bool = False

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
        """Optimizer parameter groups: dicts with ``params``, ``name`` and ``lr_scale`` (a factor on
        ``optim.lr``), or ``lr_fixed`` (a rate of the group's own), optionally with ``lr_final`` and
        ``lr_decay_steps`` (decayed exponentially from ``lr_fixed`` to ``lr_final`` at that step;
        :func:`threedistill.groups.exponential_decay`). Every value is JSON (checkpoints hold them)."""

    def after_backward(self, out: RenderOutput, step: int) -> None:
        """After the backward pass of ``step``, before the optimizer step: read gradients the
        parameters' ``.grad`` does not hold (e.g. the Gaussians' view-space gradient)."""

    def update(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Per-step housekeeping after the optimizer step (e.g. occupancy-grid refresh,
        densification). A representation that changes its parameters' shapes must keep
        ``optimizer``'s per-parameter state consistent."""

    def set_step(self, step: int) -> None:
        """After loading the checkpoint of ``step`` (resume, export, evaluation): a representation
        whose field depends on the step (the NeRF's scheduled density blob) takes that step's."""

    def log_stats(self) -> Dict[str, object]:
        """Scalars added to each step's metrics (e.g. the number of Gaussians): Python numbers, or
        0-dim tensors left on the device (read in one batch every ``run.stats_every`` steps; never
        call ``float()``/``.item()`` here: each waits for the device)."""
        return {}

    # -- for export (implicit representations) --------------------------------------------------
    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Volume density at world points ``[N,3]`` -> ``[N]`` (implicit representations)."""
        raise NotImplementedError(f"{type(self).__name__} has no density field")

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Base color in [0,1] at world points ``[N,3]`` -> ``[N,3]``."""
        raise NotImplementedError(f"{type(self).__name__} has no color field")

    @property
    def isosurface_threshold(self) -> float:
        raise NotImplementedError

    @property
    def bounds(self) -> float:
        """Half side of the axis-aligned cube that contains the object."""
        return 1.0

    def explicit_surface(self) -> Optional[Any]:
        """The surface to export when the representation has its own triangles: a
        ``trimesh.Trimesh`` in the world frame (+Z up) with uint8 sRGB vertex colors. None (the
        default) means "extract the isosurface of :meth:`density` at :attr:`isosurface_threshold`"
        (marching cubes, :func:`threedistill.export.extract_mesh`)."""
        return None

    # -- extra outputs (files other than the mesh, the video and the previews) -------------------
    def extra_outputs(self) -> Tuple[str, ...]:
        """Names of the extra files this representation can write (e.g. ``("splat",)``, the 3DGS
        PLY of the Gaussians). The names are the keys in run.json's outputs and the CLI's
        ``export --format``; where the file goes is the run folder's business."""
        return ()

    def write_extra_output(self, name: str, path: Path) -> Path:
        """Write the extra output ``name`` (one of :meth:`extra_outputs`) to ``path`` (atomically);
        returns the written path."""
        raise UserError(f"{type(self).__name__} writes no '{name}' output")

    # -- evaluation (deterministic renders, ``training=False``) ----------------------------------
    def evaluation_ambient(self) -> Optional[float]:
        """How evaluation renders are lit: the ambient term of diffuse shading with the light at
        the camera (the NeRF and the mesh), or None when they show unlit colors (the default,
        e.g. the Gaussians). A reference to compare with (a ground truth, an exported mesh) is
        shaded the same way."""
        return None

    @torch.no_grad()
    def evaluation_background(self, cameras: CameraBatch) -> torch.Tensor:
        """``[B,3,H,W]`` (float, on the CPU) background of an evaluation render of ``cameras``:
        white by default."""
        return torch.ones(len(cameras), 3, cameras.height, cameras.width)

    def progress_stats(self) -> Dict[str, int]:
        """A few integers worth showing next to a progress bar (e.g. ``{"gaussians": 12345}``);
        none by default."""
        return {}


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


def representation_class(name: str) -> type:
    """The registered class of ``representation.name`` ``name`` (for its class-level answers, such
    as :attr:`Representation.refines_surfaces`, without building one)."""
    import threedistill.representations  # noqa: F401  (registers the built-ins)

    if name not in _REGISTRY:
        raise UserError(f"unknown representation.name '{name}' (available: {', '.join(representation_names())})")
    return _REGISTRY[name]


def build_representation(rep_cfg: Any, context: RepresentationContext, device: torch.device) -> Representation:
    """Build ``rep_cfg.name`` from its own group ``rep_cfg.<name>`` and the run's ``context``.

    ``rep_cfg`` is the ``representation`` config group. Its inputs must be plain files (or built-in
    shapes): inputs that come from elsewhere (``init=run:RUN_DIR``, ``init=shape``) are resolved
    before, by :func:`threedistill.inputs.resolve_inputs`."""
    name = str(rep_cfg.name)
    return representation_class(name)(rep_cfg[name], context, device=device)
