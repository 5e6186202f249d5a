"""3D Gaussian Splatting as a score-distillation representation (DreamGaussian / GaussianDreamer
style, colours only: no spherical harmonics, no lighting).

Parameters (all ``nn.Parameter``; N changes with densification)
---------------------------------------------------------------
``means [N,3]`` (world), ``log_scales [N,3]``, ``quats [N,4]`` (w, x, y, z; normalized when
used), ``opacity_logits [N]`` (opacity = sigmoid), ``color_logits [N,3]`` (RGB = sigmoid, in
[0, 1]). All of them are in ``state_dict()``, so checkpoints load as they are.

Initialization (``representation.gaussians.init``; random draws from torch's global RNG)
-----------------------------------------------------------------------------------------
* ``sphere``: ``num_points`` points uniform in the ball of radius ``init_radius``.
* ``file:PATH``: the vertices of a point cloud (or points sampled uniformly on a mesh) read
  with :func:`threedistill.meshio.read_mesh` (coordinates as stored), randomly subsampled to
  ``num_points`` if there are more; their vertex colours when present.
* ``shape`` (the shapes-world mesh that ``run.prompt`` names, ``"a red cube"``; any other
  prompt falls back to ``sphere`` with a logged warning) is resolved by the pipeline
  (:func:`threedistill.inputs.resolve_inputs`) into a ``file:`` of that mesh before the
  Gaussians are built, so they sample points on it as on any mesh file.

Scales start at the mean distance to the 3 nearest neighbours (isotropic), rotations at the
identity, opacities at ``init_opacity``, colours grey-ish (``0.5 +- 0.05``) unless read from a file.

Rendering
---------
CPU: :func:`threedistill.representations.gaussian_raster.rasterize` (pure torch, exact);
CUDA: ``gsplat.rasterization`` (same math). Outputs follow the :class:`RenderOutput` contract:

* ``rgb``: composited over the background (``white``/``black``/``random``, see the config);
  ``alpha = 1 - T_final``.
* ``depth``: ``(sum_i w_i t_i + (1 - alpha) * far) / far`` clamped to [0, 1], the NeRF's
  contract: ``t_i`` is the distance along the pixel's ray (camera-space z times the length of the
  pixel's ``(x/z, y/z, 1)`` direction) and ``far = |camera| + radius * sqrt(3)``.
* ``normal``: from the depth image: world points ``o + t d`` at the expected distance, normals
  ``cross`` of their finite differences (oriented towards the camera), composited as
  ``(alpha * n + 1) / 2`` over a 0.5 background. Computed without autograd (no loss uses them).
* ``extras["means2d"] [B,N,2]`` (the graph's projected means; ``retain_grad()`` them before the
  backward pass for densification) and ``extras["radii"] [B,N]`` (int32 pixels, 0 = culled).

Densification and pruning (3DGS adaptive density control)
---------------------------------------------------------
Every training render retains the gradient of ``means2d``; :meth:`after_backward` accumulates,
per Gaussian and per camera where it is visible (``radii > 0``), the norm of that gradient in NDC
units (pixels x ``W/2``, ``H/2``, times the number of cameras in the batch, as gsplat's default
strategy does). :meth:`update` then, every ``densify_every`` steps within
``[densify_from, densify_until]``:

* candidates: mean accumulated gradient > ``densify_grad_threshold``, not being pruned;
* **clone** the candidates whose largest scale is <= ``densify_scale_threshold x radius`` (an
  exact copy), **split** the others into two Gaussians drawn from the parent's own distribution
  (means ``mu + R diag(s) z``, ``z ~ N(0, I)``) with scales ``s / 1.6`` (the parent goes);
* **prune** opacity < ``prune_opacity`` or largest scale > ``prune_scale x radius``;
* keep at most ``max_gaussians`` (only the highest-gradient candidates grow when the budget is short).

Parameters are resized in place (``param.data`` is replaced, the ``nn.Parameter`` objects stay,
so optimizer groups keep pointing at them) and the optimizer's per-parameter state (Adam moments)
is gathered with the same indices, with zeros for new Gaussians. Every ``opacity_reset_every``
steps, opacities are clamped to ``2 x prune_opacity`` and their Adam moments zeroed. The
accumulators are buffers, so checkpoints carry them; :meth:`_load_from_state_dict` resizes the
module to a checkpoint's count before loading, so resume is exact. Split draws come from
``step_generator(run.seed, step, STREAM_DENSIFY)``.

Export
------
``density(x) = sum_i opacity_i exp(-0.5 d_i^T Sigma_i^-1 d_i)`` (``d_i = x - mu_i``), evaluated
by brute force, a chunk of points at a time, over the Gaussians within 5 standard deviations of
the chunk's bounding box (the rest add < 4e-6 x opacity), as one matrix product per chunk (the
quadratic form expanded into monomials of ``x``); ``albedo(x)`` is the mean colour weighted by
the same terms. :meth:`save_splat_ply` / :meth:`load_splat_ply` read and write the standard 3DGS
PLY layout (SH degree 0).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from threedistill.cameras import STREAM_DENSIFY, CameraBatch, step_generator
from threedistill.groups import plain_schedule, scheduled
from threedistill.errors import UserError
from threedistill.meshio import read_mesh
from threedistill.representations.base import RenderOutput, Representation, RepresentationContext, register
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


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1.0 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def solid_background(n_images: int, mode: str, random_prob: float, training: bool,
                     generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Solid background colour per image ``[B,3]`` for ``mode`` white / black / random (random:
    a colour per image while training, white at evaluation); while training, white/black are
    replaced by a random colour with probability ``random_prob`` per image. Random draws come from
    ``generator``, only while training (shared by the Gaussians and the mesh)."""
    if mode == "random":
        if not training:
            return torch.ones(n_images, 3, device=device)
        return torch.rand(n_images, 3, generator=generator).to(device)
    bg = torch.full((n_images, 3), 1.0 if mode == "white" else 0.0, device=device)
    if training and random_prob > 0:
        replace = (torch.rand(n_images, generator=generator) < random_prob).to(device)
        colours = torch.rand(n_images, 3, generator=generator).to(device)
        bg = torch.where(replace[:, None], colours, bg)
    return bg


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
    """Points ``[M,3]`` (M <= n) and colours ``[M,3]`` in [0,1] (or None) from a mesh or point-cloud
    file (:func:`threedistill.meshio.read_mesh`): ``n`` points sampled on a mesh's surface (colours:
    the mean of the sampled face's vertex colours), a point cloud's points (a random subset of
    ``n`` when it has more)."""
    import trimesh

    key = "representation.gaussians.init"
    data = read_mesh(path_str, key)
    colours = None
    if len(data.faces) > 0:
        mesh = trimesh.Trimesh(vertices=data.vertices, faces=data.faces, process=False)
        pts, face_idx = trimesh.sample.sample_surface(mesh, n, seed=_numpy_seed())
        if data.colors is not None:
            colours = data.colors[data.faces[face_idx]].mean(axis=1)
    else:
        pts, colours = data.vertices, data.colors
        if len(pts) > n:
            keep = torch.randperm(len(pts))[:n].numpy()
            pts = pts[keep]
            colours = colours[keep] if colours is not None else None
    pts_t = torch.as_tensor(np.asarray(pts, dtype=np.float32))
    if not torch.isfinite(pts_t).all():
        raise UserError(f"{key}: '{path_str}' has non-finite point coordinates")
    return pts_t, (torch.as_tensor(np.asarray(colours, dtype=np.float32)) if colours is not None else None)


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
class Gaussians(Representation):
    """3D Gaussians (see the module docstring). Built as ``Gaussians(c, context, device)`` from its
    config group ``representation.gaussians`` and the run's context (the seed of the
    densification draws, the steps that ``densify_until`` defaults to half of).

    ``use_gsplat`` (default: device is CUDA) picks the CUDA rasterizer; ``chunk_points`` and
    ``cutoff_sigmas`` set the chunking and culling of :meth:`density` / :meth:`albedo`.
    """

    config_key = "representation.gaussians"  # where its settings live (named in error messages)

    chunk_points: int = 2048
    cutoff_sigmas: float = 5.0

    def __init__(self, c, context: RepresentationContext, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.radius = float(c.radius)
        self.background_mode = str(c.background)
        self.random_background_prob = float(c.random_background_prob)
        self._lrs = {"means": float(c.lr_means), "scales": float(c.lr_scales), "quats": float(c.lr_quats),
                     "opacities": float(c.lr_opacities), "colors": float(c.lr_colors)}
        self._lambda_opacity = plain_schedule(c.lambda_opacity)
        self._lambda_scale = plain_schedule(c.lambda_scale)
        self._isosurface_threshold = float(c.isosurface_threshold)
        if self.background_mode not in ("white", "black", "random"):
            raise ValueError(f"unknown background '{self.background_mode}'")
        self._seed = int(context.seed)
        until = c.densify_until if c.densify_until is not None else int(context.steps) // 2
        self.densify = {"from": int(c.densify_from), "until": int(until), "every": int(c.densify_every),
                        "grad": float(c.densify_grad_threshold),
                        "clone_scale": float(c.densify_scale_threshold) * self.radius,
                        "prune_opacity": float(c.prune_opacity), "prune_scale": float(c.prune_scale) * self.radius,
                        "reset_every": int(c.opacity_reset_every), "max": int(c.max_gaussians)}

        means, colours = self._initial_points(c, context)
        n = means.shape[0]
        if colours is None:
            colours = 0.5 + 0.1 * (torch.rand(n, 3) - 0.5)
        scales = knn_mean_distance(means).clamp_min(1e-4)
        self.means = nn.Parameter(means.float())
        self.log_scales = nn.Parameter(torch.log(scales)[:, None].repeat(1, 3).float())
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        self.opacity_logits = nn.Parameter(_logit(torch.full((n,), float(c.init_opacity))))
        self.color_logits = nn.Parameter(_logit(colours.float()))
        # Densification statistics (see the module docstring); buffers, so checkpoints hold them.
        self.register_buffer("grad2d_sum", torch.zeros(n))
        self.register_buffer("grad2d_count", torch.zeros(n))

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
        if init == "shape":
            raise UserError("representation.gaussians.init=shape must be resolved into a file before the Gaussians "
                            "are built (threedistill.inputs.resolve_inputs)")
        if init != "sphere":
            raise UserError(f"config key 'representation.gaussians.init' must be sphere, shape or file:PATH, got '{init}'")
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
    def _background(self, n_images: int, training: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Background colour per image ``[B,3]`` (random draws from ``generator`` only while training)."""
        return solid_background(n_images, self.background_mode, self.random_background_prob, training, generator,
                                self.means.device)

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
        bg = self._background(B, training, generator)
        r = self._rasterize(cameras, bg)
        alpha = r["alpha"].clamp(0.0, 1.0)

        # camera-space z -> distance along the pixel's ray: times |(x/z, y/z, 1)| of the pixel.
        K = cameras.intrinsics().to(dev)
        ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
        xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
        u = (xs[None, None, :] - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]  # [B,1,W]
        v = (ys[None, :, None] - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]  # [B,H,1]
        ray_len = torch.sqrt(u * u + v * v + 1.0)[:, None]  # [B,1,H,W]
        dist_sum = r["zsum"] * ray_len
        far = (cameras.positions.norm(dim=-1) + self.radius * math.sqrt(3.0))[:, None, None, None]
        depth = ((dist_sum + (1.0 - alpha) * far) / far).clamp(0.0, 1.0)

        out = RenderOutput(rgb=r["rgb"].clamp(0.0, 1.0), alpha=alpha, depth=depth,
                           normal=self._normals_from_depth(cameras, dist_sum, alpha))
        if training and r["means2d"].requires_grad:
            r["means2d"].retain_grad()  # for after_backward's densification statistics
        out.extras["means2d"] = r["means2d"]
        out.extras["radii"] = r["radii"]
        return out

    @torch.no_grad()
    def _normals_from_depth(self, cameras: CameraBatch, dist_sum: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """World normals from the expected-distance image, mapped to [0,1] over a 0.5 background."""
        rays_o, rays_d = cameras.rays()  # [B,H,W,3]
        t = (dist_sum / alpha.clamp_min(1e-6)).permute(0, 2, 3, 1)  # [B,H,W,1]
        pts = rays_o + rays_d * t
        # central differences inside, one-sided at the borders
        pad = F.pad(pts.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
        dx = pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2]
        dy = pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1]
        n = F.normalize(torch.cross(dx, dy, dim=-1), dim=-1, eps=1e-12)
        n = torch.where((n * rays_d).sum(-1, keepdim=True) > 0, -n, n)  # face the camera
        n = n.permute(0, 3, 1, 2)
        return ((alpha * n + 1.0) * 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------
    # Densification and pruning
    # ------------------------------------------------------------------------------------------
    def _parameters_by_name(self) -> Dict[str, nn.Parameter]:
        return {"means": self.means, "scales": self.log_scales, "quats": self.quats,
                "opacities": self.opacity_logits, "colors": self.color_logits}

    def _densifying(self, step_done: int) -> bool:
        d = self.densify
        return d["every"] > 0 and d["from"] < step_done <= d["until"]

    @torch.no_grad()
    def after_backward(self, out: RenderOutput, step: int) -> None:
        """Accumulate the view-space positional gradient of this step's render (before the
        optimizer step; only while densification can still happen)."""
        if self.densify["every"] <= 0 or step + 1 > self.densify["until"]:
            return
        means2d = out.extras.get("means2d")
        if means2d is None or means2d.grad is None:
            return
        g = means2d.grad.detach()  # [B,N,2] pixels
        B, H, W = g.shape[0], out.rgb.shape[-2], out.rgb.shape[-1]
        g = g * torch.tensor([W / 2.0 * B, H / 2.0 * B], device=g.device, dtype=g.dtype)
        visible = out.extras["radii"] > 0  # [B,N]
        self.grad2d_sum += torch.where(visible, g.norm(dim=-1), torch.zeros((), device=g.device)).sum(0)
        self.grad2d_count += visible.sum(0).to(self.grad2d_count.dtype)

    def update(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """After the optimizer step of ``step`` (0-based): densify + prune, and reset opacities,
        on their schedules (see the module docstring)."""
        done, d = step + 1, self.densify
        if optimizer is None or d["every"] <= 0:
            return
        if self._densifying(done) and done % d["every"] == 0:
            self.densify_and_prune(optimizer, step_generator(self._seed, step, STREAM_DENSIFY))
        if d["reset_every"] > 0 and done <= d["until"] and done % d["reset_every"] == 0:
            self.reset_opacity(optimizer)

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer, generator: Optional[torch.Generator] = None) -> Dict[str, int]:
        """One round of clone / split / prune; returns the counts (``cloned``, ``split``,
        ``pruned``, ``total``) and resets the gradient statistics."""
        d = self.densify
        n = self.num_gaussians
        avg = self.grad2d_sum / self.grad2d_count.clamp_min(1.0)
        max_scale = self.scales.amax(dim=-1)
        prune = (self.opacities < d["prune_opacity"]) | (max_scale > d["prune_scale"])
        grow = (avg > d["grad"]) & ~prune
        budget = max(d["max"] - (n - int(prune.sum())), 0)  # every grown Gaussian adds one
        if int(grow.sum()) > budget:
            order = torch.argsort(torch.where(grow, avg, torch.full_like(avg, -1.0)), descending=True, stable=True)
            grow = torch.zeros_like(grow)
            grow[order[:budget]] = True
        clone = grow & (max_scale <= d["clone_scale"])
        split = grow & ~clone

        params = {k: p.detach() for k, p in self._parameters_by_name().items()}
        new: Dict[str, List[torch.Tensor]] = {k: [p[clone]] for k, p in params.items()}
        si = split.nonzero().squeeze(1)
        if si.numel():
            rot = quat_to_rotmat(params["quats"][si])  # [S,3,3]
            s = self.scales[si]
            z = torch.randn(2, si.numel(), 3, generator=generator).to(s.device)
            offsets = (rot[None] @ (z * s[None])[..., None])[..., 0]  # [2,S,3]
            new["means"].append((params["means"][si][None] + offsets).reshape(-1, 3))
            new["scales"].append((params["scales"][si] - math.log(1.6)).repeat(2, 1))
            for k in ("quats", "opacities", "colors"):
                new[k].append(params[k][si].repeat(2, *([1] * (params[k].dim() - 1))))
        keep = (~prune & ~split).nonzero().squeeze(1)
        added = int(clone.sum()) + 2 * si.numel()
        self._resize(optimizer, keep, {k: torch.cat(v) for k, v in new.items()})
        self.grad2d_sum = torch.zeros(self.num_gaussians, device=self.means.device)
        self.grad2d_count = torch.zeros(self.num_gaussians, device=self.means.device)
        stats = {"cloned": int(clone.sum()), "split": si.numel(), "pruned": int(prune.sum()), "total": self.num_gaussians}
        assert stats["total"] == keep.numel() + added
        log.debug("densify: %s", stats)
        return stats

    def _resize(self, optimizer: Optional[torch.optim.Optimizer], keep: torch.Tensor, new_rows: Dict[str, torch.Tensor]) -> None:
        """Each parameter becomes ``cat(param[keep], new_rows[name])`` in place (same Parameter
        objects); the optimizer's per-parameter tensors of matching leading size likewise, with
        zeros for the new rows."""
        state = optimizer.state if optimizer is not None else {}
        old_n = self.num_gaussians
        for name, p in self._parameters_by_name().items():
            rows = new_rows[name].to(p.dtype)
            p.data = torch.cat([p.data[keep], rows])
            p.grad = None
            st = state.get(p, {})
            for k, v in st.items():  # Adam's exp_avg / exp_avg_sq; its scalar "step" stays
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == old_n:
                    st[k] = torch.cat([v[keep], v.new_zeros((rows.shape[0],) + tuple(v.shape[1:]))])

    @torch.no_grad()
    def reset_opacity(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Clamp opacities to ``2 x prune_opacity`` and zero their optimizer moments."""
        self.opacity_logits.data = torch.minimum(
            self.opacity_logits.data, _logit(torch.tensor(2.0 * self.densify["prune_opacity"])).to(self.means.device))
        st = optimizer.state.get(self.opacity_logits) if optimizer is not None else None
        for k, v in (st or {}).items():
            if torch.is_tensor(v) and v.dim() > 0:
                v.zero_()

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
        return terms

    def param_groups(self, optim_cfg) -> List[dict]:
        """One group per attribute with a fixed learning rate (``lr_fixed``; ``optim.lr`` is unused)."""
        params = {"means": self.means, "scales": self.log_scales, "quats": self.quats,
                  "opacities": self.opacity_logits, "colors": self.color_logits}
        return [{"params": [p], "name": name, "lr_scale": 1.0, "lr_fixed": self._lrs[name]}
                for name, p in params.items()]

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

    def _kernel_fields(self, points: torch.Tensor, want_colour: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
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
            if want_colour:
                rgb.append(w @ cols[near])
        d = torch.cat(dens).to(points.dtype) if dens else points.new_zeros(0)
        return d, (torch.cat(rgb).to(points.dtype) if want_colour and rgb else
                   (points.new_zeros(0, 3) if want_colour else None))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """``sum_i opacity_i exp(-0.5 d_i^T Sigma_i^-1 d_i)`` at world points ``[P,3]`` -> ``[P]``
        (no autograd; chunked)."""
        return self._kernel_fields(points, want_colour=False)[0]

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian colour weighted by each Gaussian's density term at ``points [P,3]`` ->
        ``[P,3]`` in [0,1] (grey 0.5 where no Gaussian reaches)."""
        d, rgb = self._kernel_fields(points, want_colour=True)
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
        Means, log-scales, quaternions and opacity logits are restored exactly; colours up to the
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
                             (self.color_logits, _logit(rgb))):
                p.data = value
                p.grad = None
            self.grad2d_sum = torch.zeros(self.num_gaussians, device=dev)
            self.grad2d_count = torch.zeros(self.num_gaussians, device=dev)

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

    @torch.no_grad()
    def evaluation_background(self, cameras: CameraBatch) -> torch.Tensor:
        """The evaluation render's solid background (black, else white) as ``[B,3,H,W]`` (CPU).
        Evaluation renders are unlit (:meth:`evaluation_ambient` is None)."""
        bg = solid_background(len(cameras), self.background_mode, self.random_background_prob, False, None, "cpu")
        return bg[:, :, None, None].expand(-1, -1, cameras.height, cameras.width).contiguous()

    def progress_stats(self) -> Dict[str, int]:
        return {"gaussians": self.num_gaussians}


__all__ = ["Gaussians", "SH_C0", "SPLAT_PLY_PROPERTIES", "knn_mean_distance", "read_splat_ply"]
