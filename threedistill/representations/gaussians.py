"""3D Gaussian Splatting as a score-distillation representation (DreamGaussian / GaussianDreamer
style: one RGB color per Gaussian, no spherical harmonics), unlit or lit (``lit``).

Parameters (all ``nn.Parameter``; N changes with densification)
---------------------------------------------------------------
``means [N,3]`` (world), ``log_scales [N,3]``, ``quats [N,4]`` (w, x, y, z; normalized when
used), ``opacity_logits [N]`` (opacity = sigmoid), ``color_logits [N,3]`` (RGB = sigmoid, in
[0, 1]). All of them are in ``state_dict()``, so checkpoints load as they are.

Initialization (``representation.gaussians.init``; random draws from torch's global RNG)
-----------------------------------------------------------------------------------------
* ``sphere``: ``num_points`` points uniform in the ball of radius ``init_radius``.
* ``file:PATH``: the vertices of a point cloud (or points sampled uniformly on a mesh) read
  with :func:`threedistill.meshio.read_mesh`, randomly subsampled to ``num_points`` if there are
  more; their vertex colors when present. An exchange file (PLY, OBJ, GLB...) is brought into the
  world frame as the mesh's ``file:`` init brings it (:func:`threedistill.meshio.file_to_world`:
  the placement our exports record, else glTF's Y-up), so a file written by ``threedistill
  export`` comes back where it was trained; mesh arrays (``.npz``) are in the world frame.
* ``shape`` (the shapes-world mesh that ``run.prompt`` names, ``"a red cube"``; any other
  prompt falls back to ``sphere`` with a logged warning) and ``run:RUN_DIR`` (the surface of a
  finished NeRF, Gaussians or mesh run, at the density level whose silhouette matches its
  render, colors from its albedo: a 3D initialization as GaussianDreamer's, from a run of this
  project) are resolved by the pipeline (:func:`threedistill.inputs.resolve_inputs`) into a
  ``file:`` of that mesh before the Gaussians are built, so they sample points on it as on any
  mesh file.

Scales start at the mean distance to the 3 nearest neighbours (isotropic), rotations at the
identity, opacities at ``init_opacity``, colors grey-ish (``0.5 +- 0.05``) unless read from a file.

Rendering
---------
CPU: :func:`threedistill.representations.gaussian_raster.rasterize` (pure torch, exact);
CUDA: ``gsplat.rasterization`` (same math). Outputs follow the :class:`RenderOutput` contract:

* ``rgb``: composited over the background (``white``/``black``/``random``, see the config);
  ``alpha = 1 - T_final``.
* ``depth``: ``(sum_i w_i t_i + (1 - alpha) * far) / far`` clamped to [0, 1], the NeRF's
  contract: ``t_i`` is the distance along the pixel's ray (camera-space z times the length of the
  pixel's ``(x/z, y/z, 1)`` direction) and ``far = |camera| + radius * sqrt(3)``.
* ``normal``: from the depth image (:func:`depth_normals`): world points ``o + t d`` at the
  expected distance, normals ``cross`` of their one-sided differences (per axis the side with the
  smaller step, so a silhouette pixel does not take its slope from the background), oriented
  towards the camera, composited as ``(alpha * n + 1) / 2`` over a 0.5 background.

Shading (``lit``)
-----------------
Unlit (``lit: false``, the class default) the colors are what the prior sees, shading and all:
the prior's training images are mostly lit, so the colors learn a darkened, shading-averaged
version of the object's (a yellow cube came out olive). Lit (``lit: true``), the colors are an
albedo and the training render draws a shading mode per batch like the NeRF and the mesh
(``ambient_only_steps``, ``albedo_prob``, ``textureless_prob``, ``ambient_light``: DreamFusion's
random shading): deferred diffuse shading of the composited albedo ``C`` (premultiplied by
alpha) with the depth normals ``n`` and the batch's light, ``rgb = C * (ambient + (1 - ambient)
* max(0, n . l)) + (1 - alpha) * bg``, the gradient flowing through the normals into the
Gaussians' positions, scales and opacities. Evaluation renders are then diffuse with the light at
the camera, as the NeRF's. The depth behind a normal is ``sum w t / max(alpha, 0.1)``: below
alpha 0.1 a pixel's point is pulled towards the camera (so its neighbours take their slopes from
the other side) and its depth's gradient is bounded.
* ``extras["means2d"] [B,N,2]`` (the graph's projected means; ``retain_grad()`` them before the
  backward pass for densification) and ``extras["radii"] [B,N]`` (int32 pixels, 0 = culled).

Densification and pruning (3DGS adaptive density control)
---------------------------------------------------------
A strategy object, :class:`~threedistill.representations.densify.DensifyStrategy` (``strategy``,
from the ``densify_*`` / ``prune_*`` / ``opacity_reset_every`` / ``max_gaussians`` settings), with
its state :class:`~threedistill.representations.densify.DensifyState` (``densify_state``): the
training render calls its pre-backward hook, :meth:`after_backward` its post-backward hook (the
view-space gradient statistics), :meth:`update` its post-optimizer hook (clone / split / prune,
opacity reset). The statistics are the buffers ``grad2d_sum`` / ``grad2d_count``, so checkpoints
carry them; :meth:`_load_from_state_dict` resizes the module to a checkpoint's count before
loading, so resume is exact.

Export
------
``density(x) = sum_i opacity_i exp(-0.5 d_i^T Sigma_i^-1 d_i)`` (``d_i = x - mu_i``), evaluated
by brute force, a chunk of points at a time, over the Gaussians within 5 standard deviations of
the chunk's bounding box (the rest add < 4e-6 x opacity), as one matrix product per chunk (the
quadratic form expanded into monomials of ``x``); ``albedo(x)`` is the mean color weighted by
the same terms. :meth:`save_splat_ply` / :meth:`load_splat_ply` read and write the standard 3DGS
PLY layout (SH degree 0).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from threedistill.cameras import CameraBatch
from threedistill.groups import MAX_STEPS, Scheduled, check_bounds, check_positive, check_unit, parse_schedule, plain_schedule, scheduled, shown
from threedistill.errors import UserError
from threedistill.meshio import read_world_mesh
from threedistill.representations.base import RenderOutput, Representation, RepresentationContext, register
from threedistill.representations.common import (
    transmittance_term,
    Appearance,
    ShadingConfig,
    check_background,
    check_radius,
    check_shading,
    clamped_logit,
    far_distance,
    normalized_depth,
    shade_image,
)
from threedistill.representations.densify import DensifyState, DensifyStrategy
from threedistill.representations.gaussian_raster import quat_to_rotmat, rasterize

log = logging.getLogger(__name__)

#: Zeroth-order spherical-harmonic constant: ``rgb = 0.5 + SH_C0 * f_dc``.
SH_C0 = 0.28209479177387814

#: The 3DGS PLY vertex properties we write, in order (all float32).
SPLAT_PLY_PROPERTIES: Tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)

_PLY_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
              "char": "i1", "int8": "i1", "ushort": "u2", "uint16": "u2", "short": "i2", "int16": "i2",
              "uint": "u4", "uint32": "u4", "int": "i4", "int32": "i4"}


from threedistill.representations.common import LAMBDA_BOUNDS, LR_BOUNDS, SHADING_BOUNDS

#: Bounds of the Gaussians' numbers: up to 1e7 Gaussians (3DGS scenes hold 1-6 million; each
#: costs ~250 bytes with its optimizer state), cadences and step numbers within run.steps' bound.
GAUSSIANS_BOUNDS = {**SHADING_BOUNDS, "num_points": (1, 10_000_000), "init_radius": (1e-6, 1000.0),
                    "init_opacity": (0.0, 1.0), "lr_means": LR_BOUNDS, "lr_scales": LR_BOUNDS, "lr_quats": LR_BOUNDS,
                    "lr_opacities": LR_BOUNDS, "lr_colors": LR_BOUNDS, "lr_means_final": LR_BOUNDS,
                    "lr_means_decay_steps": (0, MAX_STEPS), "lambda_opacity": LAMBDA_BOUNDS,
                    "lambda_scale": LAMBDA_BOUNDS, "lambda_transmittance": LAMBDA_BOUNDS,
                    "transmittance_target": (0.0, 1.0), "isosurface_threshold": (0.0, 1e6), "densify_from": (0, MAX_STEPS),
                    "densify_until": (0, MAX_STEPS), "densify_every": (0, MAX_STEPS),
                    "densify_grad_threshold": (0.0, 1e6), "densify_scale_threshold": (0.0, 1000.0),
                    "prune_opacity": (0.0, 1.0), "prune_scale": (0.0, 1000.0), "opacity_reset_every": (0, MAX_STEPS),
                    "max_gaussians": (1, 10_000_000)}


#: ``representation.gaussians.init_inset``'s calibrated value (see :class:`GaussiansConfig`).
INSET_MATCH = "match"


@dataclass
class GaussiansConfig(ShadingConfig):
    """``representation.gaussians``. Radius, background and shading fields: :class:`ShadingConfig`
    (the shading ones apply with ``lit``)."""

    # Render the colors as an albedo under diffuse shading from the depth normals (the module
    # docstring's "Shading"), with the shading-mode draw of the NeRF and the mesh; false: the
    # colors are shown as they are (the old behaviour, and what a run saved before the key has).
    lit: bool = False

    # Initial number of Gaussians (densification changes it). A "file:" init uses the file's
    # points (randomly subsampled to num_points when it has more).
    num_points: int = 4096
    # "sphere": uniform in a ball of init_radius; "shape": on the shapes-world mesh named by the
    # prompt (falls back to "sphere" otherwise); "file:PATH": a point cloud / mesh read by trimesh
    # (placed as the mesh's file: init places it); "run:RUN_DIR": on the surface of a finished run.
    init: str = "sphere"
    # A mesh start (file:, shape, run:) moved this far inwards along its vertex normals before the
    # Gaussians are placed on it (world units), or "match": the inset at which the start's render
    # (alpha > 0.5) covers as many pixels as the mesh's own silhouette, from the views of
    # threedistill.export.mesh.matching_cameras (threedistill.inputs.matched_inset). Gaussians
    # centred on a surface reach past it by about their scale, so an inset of 0 starts larger than
    # the mesh. Point clouds and the sphere are used as they are.
    init_inset: Any = 0.0
    init_radius: float = 0.5
    init_opacity: float = 0.1
    # Fixed learning rates per group (DreamGaussian-style), independent of optim.lr.
    lr_means: float = 1.0e-3
    lr_scales: float = 5.0e-3
    lr_quats: float = 1.0e-3
    lr_opacities: float = 5.0e-2
    lr_colors: float = 1.0e-2
    # Position learning rate reached at step lr_means_decay_steps (and kept after): lr_means
    # decays exponentially (log-linearly) to it, as 3D Gaussian Splatting's position lr
    # (1.6e-4 -> 1.6e-6 over 30k steps there); null keeps lr_means constant. Must be > 0. The
    # decay's length is its own key, not run.steps, so that extending a run keeps its schedule.
    lr_means_final: Optional[float] = None
    lr_means_decay_steps: int = 800
    # Regularizer weights: mean opacity, mean linear scale (0 disables).
    lambda_opacity: Scheduled = 0.0
    lambda_scale: Scheduled = 0.0
    # Dream Fields' transmittance loss, as the NeRF's (representation.nerf.lambda_transmittance):
    # -min(transmittance_target, mean(1 - alpha)) per image; both scheduled; 0 = off (the default).
    lambda_transmittance: Scheduled = 0.0
    transmittance_target: Scheduled = 0.88
    # Marching-cubes level on the summed Gaussian density (export).
    isosurface_threshold: float = 0.5
    # Adaptive density control (3D Gaussian Splatting, Kerbl et al. 2023), on both back ends
    # (:mod:`threedistill.representations.densify`). Every densify_every steps from densify_from
    # to densify_until (null: half of run.steps), Gaussians whose view-space positional gradient,
    # averaged over the steps they were visible, exceeds densify_grad_threshold (in NDC units, as
    # gsplat; guidance losses have far larger gradients than 3DGS's photometric loss, whose
    # threshold is 2e-4: 1.0 keeps roughly the top 10% of SDS with the shapes prior) are cloned
    # (largest scale <= densify_scale_threshold x radius) or split in two (larger ones; scales /
    # 1.6); at the same time Gaussians with opacity < prune_opacity or largest scale > prune_scale
    # x radius are removed. Opacities are clamped to 2 x prune_opacity every opacity_reset_every
    # steps (0: never) up to densify_until. The count never exceeds max_gaussians (the
    # highest-gradient candidates win). densify_every = 0 turns all of this off.
    densify_from: int = 100
    densify_until: Optional[int] = None
    densify_every: int = 100
    densify_grad_threshold: float = 1.0
    densify_scale_threshold: float = 0.01
    prune_opacity: float = 0.005
    prune_scale: float = 0.1
    opacity_reset_every: int = 0
    max_gaussians: int = 20000

    def validate(self, key: str) -> None:
        """Checks types cannot express; ``key`` is this group's dotted path (for messages). Call
        as ``GaussiansConfig.validate(node, key)`` on an OmegaConf node."""
        for name in ("lambda_opacity", "lambda_scale", "lambda_transmittance", "transmittance_target"):
            parse_schedule(getattr(self, name), f"{key}.{name}")
        check_positive(self.lr_means_decay_steps, f"{key}.lr_means_decay_steps", allow_zero=True)
        for name in ("num_points", "init_radius"):
            check_positive(getattr(self, name), f"{key}.{name}")
        check_radius(self, key)
        for name in ("densify_from", "densify_every", "densify_grad_threshold", "densify_scale_threshold",
                     "prune_opacity", "prune_scale", "opacity_reset_every"):
            check_positive(getattr(self, name), f"{key}.{name}", allow_zero=True)
        check_positive(self.max_gaussians, f"{key}.max_gaussians")
        check_bounds(self, key, GAUSSIANS_BOUNDS, optional=("densify_until", "lr_means_final"))
        if self.lr_means_final is not None:  # an exponential decay needs positive rates at both ends
            for name in ("lr_means", "lr_means_final"):
                if not getattr(self, name) > 0:
                    raise UserError(f"config key '{key}.{name}' must be > 0 while lr_means_final is set (the decay "
                                    f"is exponential), got {getattr(self, name)}; or set lr_means_final=null")
        if self.densify_until is not None and self.densify_until < 0:
            raise UserError(f"config key '{key}.densify_until' must be >= 0 or null, got {self.densify_until}")
        if not 0.0 < self.init_opacity < 1.0:
            raise UserError(f"config key '{key}.init_opacity' must lie within (0, 1), got {self.init_opacity}")
        check_unit(self.random_background_prob, f"{key}.random_background_prob")
        check_shading(self, key)
        check_background(self, key)
        inset = self.init_inset
        if not (inset == INSET_MATCH or (isinstance(inset, (int, float)) and not isinstance(inset, bool)
                                         and 0.0 <= inset <= 1000.0)):
            raise UserError(f"config key '{key}.init_inset' must be a distance in [0, 1000] or '{INSET_MATCH}', "
                            f"got {shown(inset)}")
        init = str(self.init)
        if init not in ("sphere", "shape") and not (init.startswith(("file:", "run:")) and len(init.split(":", 1)[1]) > 0):
            raise UserError(f"config key '{key}.init' must be sphere, shape, file:PATH or run:RUN_DIR, got {shown(self.init)}")


def depth_normals(points: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
    """Unit world normals ``[B,3,H,W]`` of the surface through the per-pixel world ``points
    [B,3,H,W]``: the cross product of the pixel-to-pixel steps along x and y, each the one-sided
    difference with the smaller length (central differences would take a silhouette pixel's slope
    half from the background; the inner side at the image border), turned to face the camera (against
    the unit ray directions ``rays_d [B,3,H,W]``)."""
    pad = F.pad(points, (1, 1, 1, 1), value=1e10)  # beyond the border: a step no side prefers

    def shorter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a.norm(dim=1, keepdim=True) <= b.norm(dim=1, keepdim=True), a, b)

    dx = shorter(pad[:, :, 1:-1, 2:] - points, points - pad[:, :, 1:-1, :-2])
    dy = shorter(pad[:, :, 2:, 1:-1] - points, points - pad[:, :, :-2, 1:-1])
    n = F.normalize(torch.cross(dx, dy, dim=1), dim=1, eps=1e-12)
    return torch.where((n * rays_d).sum(1, keepdim=True) > 0, -n, n)


def knn_mean_distance(points: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Mean distance from each of ``points [N,3]`` to its ``k`` nearest other points -> ``[N]``
    (brute force in chunks; fewer neighbours when N <= k; 0.01 for a lone point)."""
    n = points.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return torch.full((n,), 0.01, dtype=points.dtype, device=points.device)
    out = []
    for s in range(0, n, chunk):
        d = torch.cdist(points[s:s + chunk], points)  # [c, N]
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = math.inf  # not itself
        out.append(d.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out)


def _ball_points(n: int, radius: float) -> torch.Tensor:
    direction = F.normalize(torch.randn(n, 3), dim=-1)
    return direction * radius * torch.rand(n, 1).pow(1.0 / 3.0)


def _numpy_seed() -> int:
    """A seed for numpy-based samplers (trimesh) drawn from torch's global RNG."""
    return int(torch.randint(0, 2**31 - 1, (1,)))


def _load_init_file(path_str: str, n: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Points ``[M,3]`` (M <= n) and colors ``[M,3]`` in [0,1] (or None) from a mesh or point-cloud
    file (:func:`threedistill.meshio.read_mesh`): ``n`` points sampled on a mesh's surface (colors:
    the mean of the sampled face's vertex colors), a point cloud's points (a random subset of
    ``n`` when it has more)."""
    import trimesh

    key = "representation.gaussians.init"
    data = read_world_mesh(path_str, key)  # an exchange file: back into the world frame, as the mesh's file: init
    colors = None
    if len(data.faces) > 0:
        mesh = trimesh.Trimesh(vertices=data.vertices, faces=data.faces, process=False)
        pts, face_idx = trimesh.sample.sample_surface(mesh, n, seed=_numpy_seed())
        if data.colors is not None:
            colors = data.colors[data.faces[face_idx]].mean(axis=1)
    else:
        pts, colors = data.vertices, data.colors
        if len(pts) > n:
            keep = torch.randperm(len(pts))[:n].numpy()
            pts = pts[keep]
            colors = colors[keep] if colors is not None else None
    pts_t = torch.as_tensor(np.asarray(pts, dtype=np.float32))
    if not torch.isfinite(pts_t).all():
        raise UserError(f"{key}: '{path_str}' has non-finite point coordinates")
    return pts_t, (torch.as_tensor(np.asarray(colors, dtype=np.float32)) if colors is not None else None)


def read_splat_ply(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The vertex properties of a binary little-endian 3DGS PLY as float32 arrays by name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"splat PLY '{path}' not found")
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise UserError(f"'{path}' is not a PLY file")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise UserError(f"'{path}': only binary little-endian splat PLY files are supported")
    count, props, in_vertex = 0, [], False
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                count = int(parts[2])
            elif count:
                break  # other elements after the vertices are ignored
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list" or parts[1] not in _PLY_TYPES:
                raise UserError(f"'{path}': unsupported vertex property '{line}'")
            props.append((parts[2], "<" + _PLY_TYPES[parts[1]]))
    missing = [p for p in SPLAT_PLY_PROPERTIES if p not in dict(props) and p not in ("nx", "ny", "nz")]
    if missing:
        raise UserError(f"'{path}' is not a 3DGS splat PLY (missing {', '.join(missing)})")
    arr = np.frombuffer(data, dtype=np.dtype(props), count=count, offset=end + len(b"end_header\n"))
    return {name: arr[name].astype(np.float32) for name, _ in props}


@register("gaussians")
class Gaussians(Representation, Appearance):
    """3D Gaussians (see the module docstring). Built as ``Gaussians(c, context, device)`` from its
    config group ``representation.gaussians`` and the run's context (the seed of the
    densification draws, the steps that ``densify_until`` defaults to half of).

    ``use_gsplat`` (default: device is CUDA) picks the CUDA rasterizer; ``chunk_points`` and
    ``cutoff_sigmas`` set the chunking and culling of :meth:`density` / :meth:`albedo`.
    """

    config_key = "representation.gaussians"  # where its settings live (named in error messages)
    refines_surfaces = True  # init=run:RUN_DIR: a refine stage's representation (a NeRF -> Gaussians chain)

    chunk_points: int = 2048
    cutoff_sigmas: float = 5.0

    def __init__(self, c, context: RepresentationContext, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.lit = bool(c.lit)
        self._read_appearance(c, lit=True)
        self._lrs = {"means": float(c.lr_means), "scales": float(c.lr_scales), "quats": float(c.lr_quats),
                     "opacities": float(c.lr_opacities), "colors": float(c.lr_colors)}
        self._lr_means_final = None if c.lr_means_final is None else float(c.lr_means_final)
        self._lr_means_decay_steps = int(c.lr_means_decay_steps)
        self._lambda_opacity = plain_schedule(c.lambda_opacity)
        self._lambda_scale = plain_schedule(c.lambda_scale)
        self._lambda_transmittance = plain_schedule(c.lambda_transmittance)
        self._transmittance_target = plain_schedule(c.transmittance_target)
        self._isosurface_threshold = float(c.isosurface_threshold)
        self.strategy = DensifyStrategy.from_group(c, seed=int(context.seed), steps=int(context.steps))

        means, colors = self._initial_points(c, context)
        n = means.shape[0]
        if colors is None:
            colors = 0.5 + 0.1 * (torch.rand(n, 3) - 0.5)
        scales = knn_mean_distance(means).clamp_min(1e-4)
        self.means = nn.Parameter(means.float())
        self.log_scales = nn.Parameter(torch.log(scales)[:, None].repeat(1, 3).float())
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        self.opacity_logits = nn.Parameter(clamped_logit(torch.full((n,), float(c.init_opacity))))
        self.color_logits = nn.Parameter(clamped_logit(colors.float()))
        # Densification statistics (see the module docstring); buffers, so checkpoints hold them.
        state = DensifyState.zeros(n)
        self.register_buffer("grad2d_sum", state.grad2d_sum)
        self.register_buffer("grad2d_count", state.grad2d_count)

        device = torch.device(device)
        self.use_gsplat = device.type == "cuda"
        self.to(device)

    # ------------------------------------------------------------------------------------------
    # Initialization
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _initial_points(c, context: RepresentationContext) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n, init = int(c.num_points), str(c.init)
        if context.from_checkpoint:
            init = "sphere"  # the checkpoint replaces every Gaussian: read no input
        if init.startswith("file:"):
            return _load_init_file(init[len("file:"):], n)
        if init == "shape" or init.startswith("run:"):
            raise UserError(f"representation.gaussians.init={init} must be resolved into a file before the Gaussians "
                            "are built (threedistill.inputs.resolve_inputs)")
        if init != "sphere":
            raise UserError(f"config key 'representation.gaussians.init' must be sphere, shape, file:PATH or run:RUN_DIR, "
                            f"got {shown(init)}")
        return _ball_points(n, float(c.init_radius)), None

    # ------------------------------------------------------------------------------------------
    # Activated parameters
    # ------------------------------------------------------------------------------------------
    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def colors(self) -> torch.Tensor:
        return torch.sigmoid(self.color_logits)

    # ------------------------------------------------------------------------------------------
    # Rendering
    # ------------------------------------------------------------------------------------------
    def _rasterize(self, cameras: CameraBatch, bg: torch.Tensor) -> Dict[str, torch.Tensor]:
        """rgb ``[B,3,H,W]``, alpha ``[B,1,H,W]``, z-depth sum ``[B,1,H,W]``, means2d, radii ``[B,N]``."""
        means, quats, scales = self.means, self.quats, self.scales
        opac, cols = self.opacities, self.colors
        if not self.use_gsplat:
            r = rasterize(means, quats, scales, opac, cols, cameras, bg)
            return {"rgb": r.rgb, "alpha": r.alpha, "zsum": r.depth, "means2d": r.means2d, "radii": r.radii}
        import gsplat  # CUDA only; imported lazily so nothing CUDA-only runs at import time

        colors, alphas, meta = gsplat.rasterization(
            means, quats, scales, opac, cols,
            viewmats=cameras.w2c_opencv().float(), Ks=cameras.intrinsics().float(),
            width=cameras.width, height=cameras.height, backgrounds=bg,
            render_mode="RGB+ED", packed=False)
        # colors [B,H,W,4] (RGB + expected z = sum w z / alpha), alphas [B,H,W,1]
        colors, alphas = colors.permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)
        radii = meta["radii"]
        if radii.dim() == 3:  # gsplat >= 1.5: per-axis radii [B,N,2]
            radii = radii.amax(dim=-1)
        return {"rgb": colors[:, :3], "alpha": alphas, "zsum": colors[:, 3:4] * alphas,
                "means2d": meta["means2d"], "radii": radii.int()}

    def render(self, cameras: CameraBatch, step: int = 0, generator: Optional[torch.Generator] = None,
               training: bool = True) -> RenderOutput:
        """Render ``cameras`` (see the module docstring for the outputs); the only random draw is
        the training background, from ``generator``."""
        dev = self.means.device
        cameras = cameras.to(dev)
        B, H, W = len(cameras), cameras.height, cameras.width
        mode = self._draw_shading(step, training, generator) if self.lit else "albedo"
        bg = self._solid_background(B, training, generator, dev)
        # lit: the albedo composited over black, shaded below, then the background
        r = self._rasterize(cameras, bg if mode == "albedo" else torch.zeros_like(bg))
        alpha = r["alpha"].clamp(0.0, 1.0)

        # camera-space z -> distance along the pixel's ray: times |(x/z, y/z, 1)| of the pixel.
        K = cameras.intrinsics().to(dev)
        ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
        xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
        u = (xs[None, None, :] - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]  # [B,1,W]
        v = (ys[None, :, None] - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]  # [B,H,1]
        ray_len = torch.sqrt(u * u + v * v + 1.0)[:, None]  # [B,1,H,W]
        dist_sum = r["zsum"] * ray_len
        far = far_distance(cameras.positions, self.radius)[:, None, None, None]
        depth = normalized_depth(dist_sum, alpha, far)

        rays_o, rays_d = cameras.rays()  # [B,H,W,3]
        # differentiable only where the shading uses them
        with torch.set_grad_enabled(torch.is_grad_enabled() and mode != "albedo"):
            points = rays_o.permute(0, 3, 1, 2) + rays_d.permute(0, 3, 1, 2) * (dist_sum / alpha.clamp_min(0.1))
            n = depth_normals(points, rays_d.permute(0, 3, 1, 2))
        rgb = r["rgb"]
        if mode != "albedo":  # the NeRF's and the mesh's shading, per pixel
            lights = cameras.light_positions if training else cameras.positions
            lit = shade_image(rgb, n, points, lights, mode, self.ambient_light)
            fg = alpha * lit if mode == "textureless" else lit  # textureless: white albedo, also premultiplied
            rgb = fg + (1.0 - alpha) * bg[:, :, None, None]
        out = RenderOutput(rgb=rgb.clamp(0.0, 1.0), alpha=alpha, depth=depth,
                           normal=((alpha * n.detach() + 1.0) * 0.5).clamp(0.0, 1.0))
        if training:
            self.strategy.step_pre_backward(r["means2d"])  # for after_backward's statistics
        out.extras["means2d"] = r["means2d"]
        out.extras["radii"] = r["radii"]
        return out

    # ------------------------------------------------------------------------------------------
    # Densification and pruning
    # ------------------------------------------------------------------------------------------
    def _parameters_by_name(self) -> Dict[str, nn.Parameter]:
        return {"means": self.means, "scales": self.log_scales, "quats": self.quats,
                "opacities": self.opacity_logits, "colors": self.color_logits}

    @property
    def densify_state(self) -> DensifyState:
        """The densification statistics: this module's buffers, which the strategy changes in place."""
        return DensifyState(self.grad2d_sum, self.grad2d_count)

    def after_backward(self, out: RenderOutput, step: int) -> None:
        """Accumulate the view-space positional gradient of this step's render (before the
        optimizer step): the strategy's post-backward hook."""
        self.strategy.step_post_backward(self.densify_state, out, step)

    def update(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """After the optimizer step of ``step`` (0-based): densify + prune, and reset opacities,
        on the strategy's schedules."""
        self.strategy.step_post_optimizer(self._parameters_by_name(), optimizer, self.densify_state, step)

    def log_stats(self) -> Dict[str, float]:
        return {"num_gaussians": float(self.num_gaussians)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Resize to the checkpoint's Gaussian count first (densification changes it)."""
        saved = state_dict.get(prefix + "means")
        if saved is not None and saved.shape[0] != self.num_gaussians:
            with torch.no_grad():
                for name in [*self._parameters, *self._buffers]:  # every per-Gaussian tensor
                    t = getattr(self, name)
                    src = state_dict.get(prefix + name)
                    shape = tuple(src.shape) if src is not None else (saved.shape[0],) + tuple(t.shape[1:])
                    t.data = t.data.new_zeros(shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Losses and optimizer groups
    # ------------------------------------------------------------------------------------------
    def regularizers(self, out: RenderOutput, step: int) -> Dict[str, torch.Tensor]:
        """``opacity``: ``lambda_opacity * mean opacity``; ``scale``: ``lambda_scale * mean scale``
        (zero weights, the default, are left out)."""
        terms: Dict[str, torch.Tensor] = {}
        w = float(scheduled(self._lambda_opacity, step, "lambda_opacity") or 0.0)
        if w != 0.0:
            terms["opacity"] = w * self.opacities.mean()
        w = float(scheduled(self._lambda_scale, step, "lambda_scale") or 0.0)
        if w != 0.0:
            terms["scale"] = w * self.scales.mean()
        # transmittance: lambda_transmittance * mean_images -min(target, mean_pixels(1 - alpha)).
        terms.update(transmittance_term(out, step, self._lambda_transmittance, self._transmittance_target))
        return terms

    def param_groups(self, optim_cfg) -> List[dict]:
        """One group per attribute with a fixed learning rate (``lr_fixed``; ``optim.lr`` is unused);
        the means' decays exponentially to ``lr_means_final`` at step ``lr_means_decay_steps`` when that is set."""
        params = self._parameters_by_name()
        groups = [{"params": [p], "name": name, "lr_scale": 1.0, "lr_fixed": self._lrs[name]}
                  for name, p in params.items()]
        if self._lr_means_final is not None:
            groups[0].update(lr_final=self._lr_means_final, lr_decay_steps=self._lr_means_decay_steps)
        return groups

    # ------------------------------------------------------------------------------------------
    # Export: density / albedo fields
    # ------------------------------------------------------------------------------------------
    def _quadratic_coeffs(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``d^T A d`` with ``d = x - mu`` written as ``[x monomials] @ coeffs + const``:
        returns ``(A6 [6,N], b [3,N], c [N])`` in float64 so that
        ``q(x) = m(x) @ A6 - 2 x @ b + c`` with ``m = (xx, yy, zz, 2xy, 2xz, 2yz)``."""
        R = quat_to_rotmat(self.quats.detach().double())  # [N,3,3]
        inv_s2 = torch.exp(-2.0 * self.log_scales.detach().double())  # [N,3]
        A = (R * inv_s2[:, None, :]) @ R.transpose(-1, -2)  # Sigma^-1 = R diag(1/s^2) R^T
        A6 = torch.stack([A[:, 0, 0], A[:, 1, 1], A[:, 2, 2], A[:, 0, 1], A[:, 0, 2], A[:, 1, 2]])
        mu = self.means.detach().double()
        b = (A @ mu[:, :, None])[:, :, 0]  # [N,3]
        c = (mu * b).sum(-1)
        return A6, b.T.contiguous(), c

    def _kernel_fields(self, points: torch.Tensor, want_color: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``sum_i w_i`` ``[P]`` and ``sum_i w_i c_i`` ``[P,3]`` with ``w_i = o_i exp(-q_i(x)/2)``.

        Points go ``chunk_points`` at a time; per chunk, Gaussians whose ``cutoff_sigmas`` x
        (largest standard deviation) sphere misses the chunk's bounding box are skipped (their
        terms are below ``exp(-cutoff_sigmas^2 / 2)`` times their opacity). Export grids hand in
        points in grid order, so chunks are compact and most Gaussians are skipped."""
        A6, b, c = self._quadratic_coeffs()
        opac = self.opacities.detach().double()
        cols = self.colors.detach().double()
        mu = self.means.detach().double()
        reach = self.cutoff_sigmas * self.scales.detach().double().amax(dim=-1)  # [N]
        dens, rgb = [], []
        for x in points.detach().double().split(self.chunk_points):
            lo, hi = x.amin(dim=0), x.amax(dim=0)
            gap = (lo - mu).clamp_min(0) + (mu - hi).clamp_min(0)  # distance to the box per axis
            near = (gap.square().sum(-1) <= reach.square()).nonzero().squeeze(1)
            if near.numel() == 0:
                dens.append(x.new_zeros(x.shape[0]))
                rgb.append(x.new_zeros(x.shape[0], 3))
                continue
            mono = torch.stack([x[:, 0] ** 2, x[:, 1] ** 2, x[:, 2] ** 2,
                                2 * x[:, 0] * x[:, 1], 2 * x[:, 0] * x[:, 2], 2 * x[:, 1] * x[:, 2]], dim=-1)
            q = (mono @ A6[:, near] - 2.0 * (x @ b[:, near]) + c[near]).clamp_min(0.0)  # [P,n]
            w = torch.exp(-0.5 * q) * opac[near]
            dens.append(w.sum(-1))
            if want_color:
                rgb.append(w @ cols[near])
        d = torch.cat(dens).to(points.dtype) if dens else points.new_zeros(0)
        return d, (torch.cat(rgb).to(points.dtype) if want_color and rgb else
                   (points.new_zeros(0, 3) if want_color else None))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """``sum_i opacity_i exp(-0.5 d_i^T Sigma_i^-1 d_i)`` at world points ``[P,3]`` -> ``[P]``
        (no autograd; chunked)."""
        return self._kernel_fields(points, want_color=False)[0]

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian color weighted by each Gaussian's density term at ``points [P,3]`` ->
        ``[P,3]`` in [0,1] (grey 0.5 where no Gaussian reaches)."""
        d, rgb = self._kernel_fields(points, want_color=True)
        assert rgb is not None
        grey = torch.full_like(rgb, 0.5)
        return torch.where(d[:, None] > 1e-12, rgb / d.clamp_min(1e-12)[:, None], grey).clamp(0.0, 1.0)

    @property
    def isosurface_threshold(self) -> float:
        return self._isosurface_threshold

    @property
    def bounds(self) -> float:
        """Half side of a cube holding every mean plus 3 of its largest standard deviations
        (capped at 4x the largest mean coordinate, so a stray huge Gaussian cannot blow up the grid)."""
        with torch.no_grad():
            extent = self.means.abs().amax(dim=-1)
            reach = float((extent + 3.0 * self.scales.amax(dim=-1)).amax())
            return max(min(reach, 4.0 * float(extent.amax()) + 1e-3), 1e-3)

    # ------------------------------------------------------------------------------------------
    # 3DGS PLY
    # ------------------------------------------------------------------------------------------
    def save_splat_ply(self, path: Union[str, Path]) -> Path:
        """Write the standard 3DGS PLY (binary little endian, SH degree 0) atomically:
        ``x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3`` with ``f_dc = (rgb - 0.5) / SH_C0``,
        ``opacity`` the logit, ``scale`` the log and ``rot`` the quaternion (w, x, y, z)."""
        from threedistill.atomic import atomic_write_bytes

        with torch.no_grad():
            n = self.num_gaussians
            cols = [self.means, torch.zeros(n, 3, device=self.means.device), (self.colors - 0.5) / SH_C0,
                    self.opacity_logits[:, None], self.log_scales, self.quats]
            table = torch.cat([c.float() for c in cols], dim=1).cpu().numpy()
        rec = np.empty(n, dtype=[(p, "<f4") for p in SPLAT_PLY_PROPERTIES])
        for i, p in enumerate(SPLAT_PLY_PROPERTIES):
            rec[p] = table[:, i]
        header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {n}",
                            *[f"property float {p}" for p in SPLAT_PLY_PROPERTIES], "end_header"]) + "\n"
        return atomic_write_bytes(path, header.encode("ascii") + rec.tobytes())

    def load_splat_ply(self, path: Union[str, Path]) -> None:
        """Replace every parameter with a splat PLY's in place (N may change: build the optimizer after).
        Means, log-scales, quaternions and opacity logits are restored exactly; colors up to the
        float32 rounding of ``logit(0.5 + SH_C0 f_dc)``."""
        a = read_splat_ply(path)
        dev = self.means.device

        def col(*names: str) -> torch.Tensor:
            return torch.as_tensor(np.stack([a[k] for k in names], axis=1), device=dev)

        rgb = col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5
        with torch.no_grad():
            for p, value in ((self.means, col("x", "y", "z")),
                             (self.log_scales, col("scale_0", "scale_1", "scale_2")),
                             (self.quats, col("rot_0", "rot_1", "rot_2", "rot_3")),
                             (self.opacity_logits, col("opacity")[:, 0].contiguous()),
                             (self.color_logits, clamped_logit(rgb))):
                p.data = value
                p.grad = None
            self.densify_state.reset(self.num_gaussians, dev)

    # ------------------------------------------------------------------------------------------
    # Extra outputs, evaluation, progress (see Representation)
    # ------------------------------------------------------------------------------------------
    def extra_outputs(self) -> Tuple[str, ...]:
        """``splat``: the 3DGS PLY (:meth:`save_splat_ply`)."""
        return ("splat",)

    def write_extra_output(self, name: str, path: Path) -> Path:
        if name != "splat":
            return super().write_extra_output(name, path)
        return self.save_splat_ply(path)

    def evaluation_ambient(self) -> Optional[float]:
        """Lit: evaluation renders are diffuse with the light at the camera, ambient
        ``ambient_light``; unlit: None (the colors as they are)."""
        return self.ambient_light if self.lit else None

    @torch.no_grad()
    def evaluation_background(self, cameras: CameraBatch) -> torch.Tensor:
        """The evaluation render's solid background (black, else white) as ``[B,3,H,W]`` (CPU)."""
        bg = self._solid_background(len(cameras), False, None, "cpu")
        return bg[:, :, None, None].expand(-1, -1, cameras.height, cameras.width).contiguous()

    def progress_stats(self) -> Dict[str, int]:
        return {"gaussians": self.num_gaussians}


__all__ = ["Gaussians", "SH_C0", "SPLAT_PLY_PROPERTIES", "depth_normals", "knn_mean_distance", "read_splat_ply"]
