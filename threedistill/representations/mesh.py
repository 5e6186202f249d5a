"""An explicit triangle mesh as a score-distillation representation (Magic3D / Fantasia3D-style
refinement stage, vertex colors only: no UV texture, no remeshing).

Parameters (``nn.Parameter``; the topology is fixed)
---------------------------------------------------
``offsets [V,3]`` (zero at the start) added to the buffer ``base_vertices [V,3]`` (world), and
``color_logits [V,3]`` (RGB = sigmoid). The buffers ``base_vertices`` and ``faces [F,3]`` (int64)
are in ``state_dict()``, so a checkpoint holds the whole mesh; :meth:`_load_from_state_dict`
resizes the module to a checkpoint's vertex and face counts before loading.

Initialization (``representation.mesh.init``)
---------------------------------------------
* ``sphere``: ``trimesh.creation.icosphere(init_subdivisions, radius=init_radius)``.
* ``cube``: a box of half side ``init_radius``, subdivided ``init_subdivisions`` times (so it
  has vertices to move).
* ``file:PATH``: a mesh read with :func:`threedistill.meshio.read_mesh` (a scene is flattened
  with its transforms). Exchange files are Y-up (:func:`threedistill.export.mesh.save_mesh`): the
  inverse of the placement the file records (:func:`threedistill.meshio.file_to_world`; else of
  ``Z_UP_TO_Y_UP``) brings them back to the Z-up world, so a mesh exported by ``save_mesh`` (any
  ``export.up_axis``/``origin``/``size``) comes back in place, and positions are welded (files split vertices along seams).
  Vertex colors (sRGB) are kept when the file has them (GLB ``COLOR_0``, stored linear, is
  converted back). Mesh arrays (``.npz``) are taken exactly as they are.
* ``run:RUN_DIR`` (a previous NeRF / Gaussians / mesh run's surface: ``init_mesh_resolution``,
  else the run's ``export.mesh_resolution``; the level set ``init_surface`` names) is resolved by the pipeline
  (:func:`threedistill.inputs.resolve_inputs`) into mesh arrays before the mesh is built.

Colors start grey (0.5) unless the source has colors.

Rendering
---------
:func:`threedistill.representations.mesh_raster.render_mesh` (antialiased) with per-camera vertex
colors composited over a solid background
(:func:`threedistill.representations.common.solid_background`: white / black / random, random
draws from the render generator while training). Shading follows the NeRF
(:func:`threedistill.representations.common.draw_shading_mode` and
:func:`~threedistill.representations.common.shade`): the mode (``albedo`` / ``textureless`` /
``diffuse``) is drawn per batch while training and lit from ``cameras.light_positions``;
evaluation renders (``training=False``) are deterministic: ``diffuse`` with the light at the
camera. Shading is evaluated at the vertices (area-weighted vertex normals, light direction per
vertex) and interpolated across the triangles (Gouraud). Random draws, in order: shading mode,
background.

Outputs (:class:`RenderOutput`):

* ``rgb`` composited over the background, ``alpha`` the antialiased coverage.
* ``depth``: ``(hit * d + (1 - hit) * far) / far`` clamped to [0, 1], ``d`` the distance along the
  pixel's ray (camera-space z over the cosine between the ray and the optical axis), ``hit`` the
  (hard) coverage and ``far = |camera| + radius * sqrt(3)`` as for the NeRF.
* ``normal``: the visible triangle's world face normal ``n`` (as wound), ``(hit * n + 1) / 2``.

Regularizers
------------
* ``laplacian``: ``lambda_laplacian * mean_i |mean_{j in N(i)} v_j - v_i|^2`` (uniform Laplacian of
  the current vertices ``v = base + offsets``; ``N(i)`` the vertices sharing an edge with ``i``).
* ``normal_consistency``: ``lambda_normal_consistency * mean_e (1 - n_a . n_b)`` over the interior
  edges ``e`` (shared by two faces ``a, b``; at a non-manifold edge each consecutive pair of its faces).

Export
------
:meth:`export_mesh` (the :meth:`explicit_surface`) returns the current triangles (world frame) with vertex colors;
:func:`threedistill.export.export_run_meshes` and ``threedistill export`` use it instead of marching
cubes. There is no density field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from threedistill.cameras import CameraBatch
from threedistill.groups import Scheduled, check_bounds, check_positive, check_schedule_min, parse_schedule, plain_schedule, scheduled, shown
from threedistill.errors import UserError
from threedistill.meshio import apply_transform, file_to_world, read_mesh
from threedistill.representations.base import RenderOutput, Representation, RepresentationContext, register
from threedistill.representations.common import (
    Appearance,
    ShadingConfig,
    check_background,
    check_radius,
    check_shading,
    check_unit_keys,
    clamped_logit,
    far_distance,
    normalized_depth,
)
from threedistill.representations.mesh_raster import face_normals, render_mesh


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
from threedistill.representations.common import LAMBDA_BOUNDS, LR_BOUNDS, SHADING_BOUNDS

#: Bounds of the mesh's numbers: icospheres up to 7 subdivisions (~330k faces), "run:" inits
#: extracted on grids up to 1024^3 (as export.mesh_resolution).
MESH_BOUNDS = {**SHADING_BOUNDS, "init_radius": (1e-6, 1000.0), "init_subdivisions": (0, 7),
               "init_mesh_resolution": (2, 1024), "init_smooth_passes": (0, 1000), "lr_offsets": LR_BOUNDS, "lr_colors": LR_BOUNDS,
               "lambda_laplacian": LAMBDA_BOUNDS, "lambda_normal_consistency": LAMBDA_BOUNDS}

#: Values of ``representation.mesh.init_surface`` (see :class:`MeshConfig`).
INIT_SURFACES = ("silhouette", "isosurface")


@dataclass
class MeshConfig(ShadingConfig):
    """``representation.mesh``. Shading (the NeRF's conventions: albedo only before
    ambient_only_steps, then per batch albedo, textureless or diffuse, lit from the batch's light),
    background and radius (depth normalization only): :class:`ShadingConfig`."""

    # Starting mesh: "sphere" (an icosphere of init_radius, init_subdivisions), "cube" (a box of
    # half side init_radius, subdivided init_subdivisions times), "file:PATH" (any mesh trimesh
    # reads, Y-up as written by `threedistill export`; its vertex colors when present) or
    # "run:RUN_DIR" (the surface of a previous NeRF / Gaussians run, extracted as `export` does,
    # with its albedo as vertex colors).
    init: str = "sphere"
    init_radius: float = 0.5
    init_subdivisions: int = 4
    # "run:" init: marching-cubes grid size (null: the source run's export.mesh_resolution).
    init_mesh_resolution: Optional[int] = None
    # "run:" init of a density field (NeRF, Gaussians): which level set becomes the mesh.
    # "silhouette": the density level whose silhouette matches what the run renders (alpha > 0.5)
    # from rings of views (a fixed iso level can be far inside or outside the rendered object);
    # "isosurface": the run's own isosurface_threshold, as `threedistill export` extracts.
    init_surface: str = "silhouette"
    # "run:" init: passes of Taubin smoothing (Taubin 1995: a shrinking step lambda = 0.5, then an
    # inflating step mu = -0.53, so the volume is kept) applied to the extracted surface; 0 keeps
    # the marching-cubes surface as it is. A pass is the pair of steps.
    init_smooth_passes: int = 0
    # Fixed learning rates: vertex offsets, color logits (independent of optim.lr).
    lr_offsets: float = 1.0e-3
    lr_colors: float = 1.0e-2
    # Regularizer weights: uniform Laplacian smoothing of the vertices (mean squared norm of
    # mean-of-neighbours minus vertex) and normal consistency (mean 1 - cos between adjacent face
    # normals over interior edges); 0 disables.
    lambda_laplacian: Scheduled = 1000.0
    lambda_normal_consistency: Scheduled = 1000.0

    def validate(self, key: str) -> None:
        """Checks types cannot express; ``key`` is this group's dotted path (for messages). Call
        as ``MeshConfig.validate(node, key)`` on an OmegaConf node."""
        for name in ("lambda_laplacian", "lambda_normal_consistency"):
            parse_schedule(getattr(self, name), f"{key}.{name}")
        check_positive(self.init_radius, f"{key}.init_radius")
        check_bounds(self, key, MESH_BOUNDS, optional=("init_mesh_resolution",))
        check_radius(self, key)
        for name in ("lr_offsets", "lr_colors", "ambient_only_steps"):
            check_positive(getattr(self, name), f"{key}.{name}", allow_zero=True)
        if not 0 <= self.init_subdivisions <= 7:
            raise UserError(f"config key '{key}.init_subdivisions' must be between 0 and 7, "
                            f"got {self.init_subdivisions}")
        if self.init_mesh_resolution is not None and self.init_mesh_resolution < 2:
            raise UserError(f"config key '{key}.init_mesh_resolution' must be >= 2 or null, "
                            f"got {self.init_mesh_resolution}")
        check_unit_keys(self, key, ("albedo_prob", "textureless_prob", "ambient_light", "random_background_prob"))
        check_shading(self, key)
        check_background(self, key)
        if str(self.init_surface) not in INIT_SURFACES:
            raise UserError(f"config key '{key}.init_surface' must be {' or '.join(INIT_SURFACES)}, "
                            f"got '{self.init_surface}'")
        init = str(self.init)
        if init not in ("sphere", "cube") and not (init.startswith(("file:", "run:")) and len(init.split(":", 1)[1]) > 0):
            raise UserError(f"config key '{key}.init' must be sphere, cube, file:PATH or run:RUN_DIR, "
                            f"got {shown(self.init)}")
        for name in ("lambda_laplacian", "lambda_normal_consistency"):
            check_schedule_min(getattr(self, name), f"{key}.{name}")


# ----------------------------------------------------------------------------------------------
# Topology and regularizers (pure functions, tested against hand-computed values)
# ----------------------------------------------------------------------------------------------
def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    """Unique undirected edges ``[E,2]`` (int64, ``a < b``) of ``faces [F,3]``."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).long()
    e = torch.sort(e, dim=1).values
    return torch.unique(e, dim=0)


def adjacent_face_pairs(faces: torch.Tensor) -> torch.Tensor:
    """``[P,2]`` face index pairs sharing an edge: for each edge, each consecutive pair of the faces
    that hold it (one pair per interior manifold edge, none for boundary edges)."""
    F = faces.shape[0]
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).long()
    e = torch.sort(e, dim=1).values
    n = int(faces.max()) + 1 if F else 1
    key = e[:, 0] * n + e[:, 1]
    face = torch.arange(F, device=faces.device).repeat(3)
    order = torch.argsort(key, stable=True)
    key, face = key[order], face[order]
    same = key[1:] == key[:-1]
    return torch.stack([face[:-1][same], face[1:][same]], dim=1)


def laplacian_loss(verts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``mean_i |mean_{j in N(i)} v_j - v_i|^2`` (uniform Laplacian; isolated vertices count 0)."""
    V = verts.shape[0]
    a, b = edges[:, 0], edges[:, 1]
    nb = torch.zeros_like(verts).index_add(0, a, verts[b]).index_add(0, b, verts[a])
    ones = torch.ones(edges.shape[0], device=verts.device, dtype=verts.dtype)
    deg = torch.zeros(V, device=verts.device, dtype=verts.dtype).index_add(0, a, ones).index_add(0, b, ones)
    lap = nb / deg.clamp_min(1.0)[:, None] - verts
    lap = torch.where(deg[:, None] > 0, lap, torch.zeros_like(lap))
    return lap.square().sum(-1).mean()


def normal_consistency_loss(verts: torch.Tensor, faces: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``mean (1 - n_a . n_b)`` over the face pairs ``pairs [P,2]`` (0 when there are none)."""
    if pairs.shape[0] == 0:
        return verts.sum() * 0.0
    n = face_normals(verts, faces)
    return (1.0 - (n[pairs[:, 0]] * n[pairs[:, 1]]).sum(-1)).mean()


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit area-weighted vertex normals ``[V,3]`` (sum of the adjacent faces' cross products)."""
    v = verts[faces]
    fn = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)  # |fn| = 2 x area
    vn = torch.zeros_like(verts)
    for k in range(3):
        vn = vn.index_add(0, faces[:, k], fn)
    return vn / vn.norm(dim=-1, keepdim=True).clamp_min(1e-20)


# ----------------------------------------------------------------------------------------------
# Initialization
# ----------------------------------------------------------------------------------------------
def _load_file(path_str: str, key: str) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    data = read_mesh(path_str, key)
    if len(data.faces) == 0:
        raise UserError(f"{key}: '{path_str}' holds no triangles")
    if not data.y_up:  # mesh arrays: exact, in the world frame
        return data.vertices, data.faces, data.colors
    verts, faces, cols = data.vertices, data.faces, data.colors
    # Weld duplicate positions (files split vertices along seams) so the mesh moves as one piece.
    uniq, inverse = np.unique(np.round(verts, 8), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if cols is not None:
        summed = np.zeros((len(uniq), 3))
        np.add.at(summed, inverse, cols)
        cols = summed / np.bincount(inverse, minlength=len(uniq))[:, None]
    verts = apply_transform(uniq, file_to_world(Path(path_str).expanduser()))
    faces = inverse[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return verts, faces[keep], cols


def initial_mesh(c, from_checkpoint: bool = False) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """World vertices ``[V,3]``, faces ``[F,3]`` and colors ``[V,3]`` in [0,1] (or None) for the
    ``representation.mesh`` config ``c`` (module docstring). ``from_checkpoint``: the sphere, as
    the checkpoint replaces the whole mesh."""
    import trimesh

    init, key = str(c.init), "representation.mesh.init"
    if from_checkpoint:
        init = "sphere"
    r, sub = float(c.init_radius), int(c.init_subdivisions)
    if init == "sphere":
        m = trimesh.creation.icosphere(subdivisions=sub, radius=r)
        return np.asarray(m.vertices), np.asarray(m.faces, dtype=np.int64), None
    if init == "cube":
        m = trimesh.creation.box(extents=[2.0 * r] * 3)
        for _ in range(sub):
            m = m.subdivide()
        return np.asarray(m.vertices), np.asarray(m.faces, dtype=np.int64), None
    if init.startswith("file:"):
        return _load_file(init[5:], key)
    if init.startswith("run:"):
        raise UserError(f"{key}=run:RUN_DIR must be resolved into a file before the mesh is built "
                        "(threedistill.inputs.resolve_inputs)")
    raise UserError(f"config key '{key}' must be sphere, cube, file:PATH or run:RUN_DIR, got {shown(init)}")


# ----------------------------------------------------------------------------------------------
# The representation
# ----------------------------------------------------------------------------------------------
@register("mesh")
class Mesh(Representation, Appearance):
    """Vertex-colored triangle mesh (see the module docstring). Built as ``Mesh(c, context, device)``
    from its config group ``representation.mesh`` (the context is unused but for
    ``from_checkpoint``)."""

    config_key = "representation.mesh"
    refines_surfaces = True  # init=run:RUN_DIR: the refine stage's representation

    def __init__(self, c, context: RepresentationContext, device: torch.device | str = "cpu") -> None:
        super().__init__()
        device = torch.device(device)
        self._read_appearance(c)
        self._lrs = {"offsets": float(c.lr_offsets), "colors": float(c.lr_colors)}
        self._lambda_laplacian = plain_schedule(c.lambda_laplacian)
        self._lambda_normal_consistency = plain_schedule(c.lambda_normal_consistency)

        verts, faces, colors = initial_mesh(c, context.from_checkpoint)
        v = torch.as_tensor(np.asarray(verts, dtype=np.float32))
        self.register_buffer("base_vertices", v)
        self.register_buffer("faces", torch.as_tensor(np.asarray(faces, dtype=np.int64)))
        self.offsets = nn.Parameter(torch.zeros_like(v))
        logits = (clamped_logit(torch.as_tensor(np.asarray(colors, dtype=np.float32))) if colors is not None
                  else torch.zeros_like(v))
        self.color_logits = nn.Parameter(logits)
        self.register_buffer("edges", torch.zeros(0, 2, dtype=torch.int64), persistent=False)
        self.register_buffer("face_pairs", torch.zeros(0, 2, dtype=torch.int64), persistent=False)
        self._update_topology()
        self.to(device)

    def _update_topology(self) -> None:
        self.edges = mesh_edges(self.faces)
        self.face_pairs = adjacent_face_pairs(self.faces)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Resize to the checkpoint's vertex / face counts first, then rebuild the edge lists."""
        with torch.no_grad():
            for name in ("base_vertices", "faces", "offsets", "color_logits"):
                src = state_dict.get(prefix + name)
                t = getattr(self, name)
                if src is not None and tuple(src.shape) != tuple(t.shape):
                    t.data = t.data.new_zeros(tuple(src.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._update_topology()

    @property
    def vertices(self) -> torch.Tensor:
        """Current world vertices ``[V,3]`` (base + offsets)."""
        return self.base_vertices + self.offsets

    @property
    def colors(self) -> torch.Tensor:
        return torch.sigmoid(self.color_logits)

    # ------------------------------------------------------------------------------------------
    # Rendering
    # ------------------------------------------------------------------------------------------
    def render(self, cameras: CameraBatch, step: int = 0, generator: Optional[torch.Generator] = None,
               training: bool = True) -> RenderOutput:
        dev = self.offsets.device
        cameras = cameras.to(dev)
        B, V = len(cameras), self.base_vertices.shape[0]
        mode = self._draw_shading(step, training, generator)
        bg = self._solid_background(B, training, generator, dev)
        verts, albedo = self.vertices, self.colors
        if mode == "albedo":
            colors = albedo
        else:
            lights = (cameras.light_positions if training else cameras.positions).to(verts.dtype)
            vn = vertex_normals(verts, self.faces)
            flat = lambda t: t.expand(B, V, 3).reshape(B * V, 3)  # noqa: E731
            colors = self._shade(flat(albedo), flat(vn), flat(verts), lights[:, None, :].expand(B, V, 3).reshape(B * V, 3),
                                  mode).reshape(B, V, 3)
        r = render_mesh(verts, self.faces, cameras, colors, bg, antialiased=True)

        hit = (r["tri_id"] >= 0)[:, None].to(verts.dtype)  # [B,1,H,W]
        _, rays_d = cameras.rays()  # unit world directions [B,H,W,3]
        forward = -cameras.c2w[:, :3, 2].to(verts.dtype)  # optical axis (the camera looks along -z)
        cos = (rays_d * forward[:, None, None, :]).sum(-1)[:, None]  # [B,1,H,W]
        dist = r["depth"] / cos.clamp_min(1e-6)
        far = far_distance(cameras.positions, self.radius)[:, None, None, None]
        depth = normalized_depth(hit * dist, hit, far)
        normal = ((hit * r["normal"] + 1.0) * 0.5).clamp(0.0, 1.0)
        return RenderOutput(rgb=r["rgb"].clamp(0.0, 1.0), alpha=r["alpha"].clamp(0.0, 1.0), depth=depth,
                            normal=normal)

    # ------------------------------------------------------------------------------------------
    # Losses and optimizer groups
    # ------------------------------------------------------------------------------------------
    def regularizers(self, out: RenderOutput, step: int) -> Dict[str, torch.Tensor]:
        """``laplacian`` and ``normal_consistency`` (module docstring; zero weights are left out)."""
        terms: Dict[str, torch.Tensor] = {}
        w = float(scheduled(self._lambda_laplacian, step, "lambda_laplacian") or 0.0)
        if w != 0.0:
            terms["laplacian"] = w * laplacian_loss(self.vertices, self.edges)
        w = float(scheduled(self._lambda_normal_consistency, step, "lambda_normal_consistency") or 0.0)
        if w != 0.0:
            terms["normal_consistency"] = w * normal_consistency_loss(self.vertices, self.faces, self.face_pairs)
        return terms

    def param_groups(self, optim_cfg) -> List[dict]:
        """Offsets and color logits, each with a fixed learning rate (``lr_fixed``; ``optim.lr`` is unused)."""
        params = {"offsets": self.offsets, "colors": self.color_logits}
        return [{"params": [p], "name": name, "lr_scale": 1.0, "lr_fixed": self._lrs[name]}
                for name, p in params.items()]

    def log_stats(self) -> Dict[str, object]:
        with torch.no_grad():  # a tensor: read with the step's other stats (no wait for the device here)
            return {"mesh_offset_max": self.offsets.norm(dim=-1).amax() if self.offsets.numel() else 0.0}

    # ------------------------------------------------------------------------------------------
    # Export
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_mesh(self):
        """The current mesh as a :class:`trimesh.Trimesh` in the world frame (+Z up) with uint8
        sRGB RGBA vertex colors (``save_mesh`` converts it to Y-up on writing)."""
        import trimesh

        rgba = np.full((self.base_vertices.shape[0], 4), 255, dtype=np.uint8)
        rgba[:, :3] = np.rint(self.colors.float().clamp(0, 1).cpu().numpy() * 255.0).astype(np.uint8)
        return trimesh.Trimesh(vertices=self.vertices.double().cpu().numpy(), faces=self.faces.cpu().numpy(),
                               vertex_colors=rgba, process=False)

    @property
    def bounds(self) -> float:
        """Half side of the axis-aligned cube holding every vertex."""
        with torch.no_grad():
            return max(float(self.vertices.abs().amax()), 1e-3) if self.offsets.numel() else 1.0

    # ------------------------------------------------------------------------------------------
    # Export surface and evaluation (see Representation)
    # ------------------------------------------------------------------------------------------
    def explicit_surface(self):
        """Its own triangles (:meth:`export_mesh`), exported instead of an isosurface."""
        return self.export_mesh()

    def evaluation_ambient(self) -> Optional[float]:
        """Evaluation renders are diffuse with the light at the camera, ambient ``ambient_light``."""
        return self.ambient_light

    @torch.no_grad()
    def evaluation_background(self, cameras: CameraBatch) -> torch.Tensor:
        """The evaluation render's solid background (black, else white) as ``[B,3,H,W]`` (CPU)."""
        bg = self._solid_background(len(cameras), False, None, "cpu")
        return bg[:, :, None, None].expand(-1, -1, cameras.height, cameras.width).contiguous()


__all__ = ["Mesh", "adjacent_face_pairs", "initial_mesh", "laplacian_loss", "mesh_edges",
           "normal_consistency_loss", "vertex_normals"]
