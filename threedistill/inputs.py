"""Inputs that come from elsewhere, resolved into plain files before a representation is built.

Representations read only their own config group and plain files (``init=file:PATH``, besides
their built-in shapes). Two inputs name something outside the run instead; the pipeline turns
them into mesh arrays (:func:`threedistill.meshio.write_mesh_arrays`: float64 vertices, int64
faces, float32 colors, lossless) in the run folder's ``inputs/`` before construction:

* ``init=run:RUN_DIR`` (the mesh refine stage; a Gaussians run's 3D initialization): the
  surface of that run's newest checkpoint, its own triangles when it has them
  (:meth:`~threedistill.representations.Representation.explicit_surface`), else its density's
  isosurface at ``init_mesh_resolution`` (else the run's ``export.mesh_resolution``) with colors
  from its albedo; with ``init_surface=silhouette`` (the default, and what a group without the
  key, the Gaussians', gets) at the density level whose silhouette matches what the run renders
  (:func:`matching_cameras`, :func:`threedistill.export.mesh.silhouette_threshold`), else at its
  ``isosurface_threshold``; then ``init_smooth_passes`` Taubin passes (:func:`taubin_smooth`; 0
  when the group has no such key). The global torch RNG is left as it was.
* ``init=shape`` (Gaussians): the shapes-world mesh that ``run.prompt`` names (``"a red cube"``);
  a prompt that names none falls back to ``init=sphere`` with a logged warning.
* ``init_inset`` (Gaussians; :class:`~threedistill.representations.gaussians.GaussiansConfig`):
  a mesh start (``run:``, ``shape``, and then also a ``file:`` mesh) is moved inwards along its
  vertex normals (:func:`inset_surface`) by that distance, or by the one :func:`matched_inset`
  finds (``match``), before it is written; a ``file:`` point cloud is used as it is (a warning).

Only the active representation's group is looked at, by the value of its ``init`` key, never by
the representation's name. The user's config (config.yaml) keeps ``run:``/``shape``; the resolved
config, with ``init=file:<run>/inputs/<key>.npz``, is only what the representation is built from.
A file already in ``inputs/`` is reused (a resumed run keeps the input it started from, even when
the coarse run has moved since).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from threedistill.config import Config
from threedistill.devices import resolve_device
from threedistill.distill import Distiller
from threedistill.runs import RunFolder
from threedistill.errors import UserError
from threedistill.export.mesh import extract_mesh, matching_cameras
from threedistill.meshio import MESH_ARRAYS_SUFFIX, read_world_mesh, vertex_colors, write_mesh_arrays
from threedistill.representations.gaussians import INSET_MATCH
from threedistill.shapes.world import parse_prompt, shape_mesh

log = logging.getLogger(__name__)

def needs_resolving(cfg: Config) -> bool:
    """Whether the active representation's ``init`` names something outside the run, or a mesh
    file that its ``init_inset`` moves."""
    init = _init_of(cfg)
    if init is None:
        return False
    return init.startswith("run:") or init == "shape" or (init.startswith("file:") and _inset_of(cfg) != 0)


def resolve_inputs(cfg: Config, into: RunFolder) -> Config:
    """``cfg`` itself when nothing needs resolving, else a copy whose active representation's
    ``init`` is ``file:`` mesh arrays written into the run folder ``into`` (module docstring);
    ``cfg`` is not changed."""
    init = _init_of(cfg)
    if init is None or not needs_resolving(cfg):
        return cfg
    name = str(cfg.representation.name)
    group = cfg.representation[name]
    key = f"representation.{name}.init"
    out = copy.deepcopy(cfg)
    if init == "shape" and parse_prompt(str(cfg.run.prompt)) is None:
        log.warning("%s=shape: prompt %r names no shapes-world shape; initializing in a sphere instead",
                    key, str(cfg.run.prompt))
        out.representation[name].init = "sphere"
        return out
    path = into.input_path(key, MESH_ARRAYS_SUFFIX)
    if not path.is_file():
        if init == "shape":
            m = shape_mesh(parse_prompt(str(cfg.run.prompt)).shape)
            arrays: Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]] = (np.asarray(m.vertices),
                                                                            np.asarray(m.faces), None)
        elif init.startswith("run:"):
            arrays = surface_of_run(Path(init[len("run:"):]).expanduser(), key, group.get("init_mesh_resolution"),
                                    resolve_device(cfg.run.device), str(group.get("init_surface", "silhouette")),
                                    int(group.get("init_smooth_passes", 0)))
        else:
            data = read_world_mesh(init[len("file:"):], key)
            if len(data.faces) == 0:
                log.warning("%s_inset applies to meshes; '%s' is a point cloud, used as it is", key, init[len("file:"):])
                return out
            arrays = (data.vertices, data.faces, data.colors)
        inset = _inset_of(cfg)
        if inset != 0 and len(arrays[1]) > 0:
            if inset == INSET_MATCH:
                inset = matched_inset(cfg, *arrays)
            arrays = (inset_surface(arrays[0], arrays[1], float(inset)), arrays[1], arrays[2])
        write_mesh_arrays(path, *arrays)
    out.representation[name].init = f"file:{path}"
    return out


def surface_of_run(run_dir: Path, key: str, resolution: Optional[int], device: torch.device,
                   surface: str = "isosurface", smooth_passes: int = 0) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """World vertices ``[V,3]`` float64, faces ``[F,3]`` int64 and vertex colors ``[V,3]`` float32
    sRGB (or None) of the trained run in ``run_dir`` (module docstring). ``surface``: ``isosurface``
    (the run's ``isosurface_threshold``) or ``silhouette`` (the level whose silhouette matches the
    run's render from :func:`matching_cameras`). ``smooth_passes``: Taubin smoothing passes of the
    vertices (:func:`taubin_smooth`)."""
    source = RunFolder(run_dir)
    if not source.is_run():
        raise UserError(f"{key}: '{run_dir}' is not a threedistill run folder (no config.yaml)")
    with torch.random.fork_rng(devices=[]):  # loading reseeds the global RNG
        cfg, rep, _ = source.load_representation(device=str(device))
        mesh = rep.explicit_surface()
        if mesh is None:
            match = matching_cameras(cfg.camera) if surface == "silhouette" else None
            mesh = extract_mesh(rep, resolution=int(resolution or cfg.export.mesh_resolution),
                                min_component_ratio=float(cfg.export.min_component_ratio), match_cameras=match)
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    if smooth_passes > 0:
        verts = taubin_smooth(verts, np.asarray(mesh.faces, dtype=np.int64), smooth_passes)
    return verts, np.asarray(mesh.faces, dtype=np.int64), vertex_colors(mesh, linear=False)


def inset_surface(verts: np.ndarray, faces: np.ndarray, distance: float) -> np.ndarray:
    """``verts`` moved ``distance`` along the mesh's inward vertex normals (the area-weighted
    normals of the faces around each vertex; a mesh wound inside out, negative volume, is turned
    first); a new float64 array."""
    import trimesh

    m = trimesh.Trimesh(vertices=np.asarray(verts, dtype=np.float64), faces=np.asarray(faces, dtype=np.int64),
                        process=False)
    normals = np.asarray(m.vertex_normals, dtype=np.float64)
    if m.volume < 0:
        normals = -normals
    return np.asarray(verts, dtype=np.float64) - float(distance) * normals


#: Bisection steps of :func:`matched_inset` and its largest inset, as a fraction of the mesh's
#: smallest bounding-box side (a mesh moved in by half its thickness has no inside left).
INSET_ITERATIONS, INSET_MAX_FRACTION = 10, 0.25


def matched_inset(cfg: Config, verts: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None,
                  iterations: int = INSET_ITERATIONS) -> float:
    """The inset of ``init_inset=match`` (:class:`~threedistill.representations.gaussians.GaussiansConfig`):
    the distance along the inward vertex normals (:func:`inset_surface`) at which the active
    representation, built by ``cfg`` from the moved mesh, renders (``alpha > 0.5``,
    ``training=False``) as many pixels from :func:`matching_cameras` as the mesh's own silhouette.

    Each candidate is a full build from a mesh-array file, so every rule of the start (points
    sampled on the surface, scales from their neighbours, the initial opacity) is what is matched;
    the builds draw from a fixed seed in a forked RNG (the caller's stream is left as it was). The
    covered area falls as the inset grows, so a bisection over ``[0, INSET_MAX_FRACTION x the
    smallest bounding-box side]`` (``iterations`` halvings) finds it: 0 when the start is not
    larger than the mesh, the largest inset when even that one is."""
    import tempfile

    import trimesh

    from threedistill.export.mesh import mesh_silhouette
    from threedistill.representations.base import RepresentationContext, build_representation

    cameras = matching_cameras(cfg.camera)
    target = int(mesh_silhouette(trimesh.Trimesh(vertices=verts, faces=faces, process=False), cameras).sum())
    name = str(cfg.representation.name)
    device = resolve_device(cfg.run.device)
    context = RepresentationContext.of_run(cfg.run)
    extent = np.ptp(np.asarray(verts, dtype=np.float64), axis=0)
    with tempfile.TemporaryDirectory() as tmp:
        def area(inset: float) -> int:
            path = write_mesh_arrays(Path(tmp) / f"inset{MESH_ARRAYS_SUFFIX}", inset_surface(verts, faces, inset),
                                     faces, colors)
            rep_cfg = copy.deepcopy(cfg.representation)
            rep_cfg[name].init = f"file:{path}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.run.seed))
                rep = build_representation(rep_cfg, context, device).eval()
                with torch.no_grad():
                    return int((rep.render(cameras.to(device), training=False).alpha > 0.5).sum())

        lo, hi = 0.0, INSET_MAX_FRACTION * float(extent.min())
        start = area(lo)
        if start <= target or hi <= 0.0:
            inset = 0.0
        elif area(hi) > target:
            inset = hi
        else:
            for _ in range(int(iterations)):  # invariant: area(lo) > target >= area(hi)
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if area(mid) > target else (lo, mid)
            inset = hi
    log.info("%s.init_inset=%s: %.4f (the start at inset 0 covers %d pixels, the mesh %d)",
             f"representation.{name}", INSET_MATCH, inset, start, target)
    return inset


#: Taubin's two steps (Taubin 1995, "A signal processing approach to fair surface design"): a
#: Laplacian step of TAUBIN_LAMBDA shrinks, one of TAUBIN_MU (negative, |mu| > lambda) inflates;
#: together a low-pass filter with pass-band frequency 1/lambda + 1/mu = 0.11, so bumps a few
#: cells wide go while the volume stays.
TAUBIN_LAMBDA, TAUBIN_MU = 0.5, -0.53


def taubin_smooth(verts: np.ndarray, faces: np.ndarray, passes: int) -> np.ndarray:
    """``verts`` after ``passes`` Taubin passes over the mesh ``faces`` (trimesh's uniform
    Laplacian, each pass a ``TAUBIN_LAMBDA`` then a ``TAUBIN_MU`` step); a new array."""
    import trimesh
    from trimesh.smoothing import filter_taubin

    m = trimesh.Trimesh(vertices=np.array(verts, dtype=np.float64), faces=faces, process=False)
    filter_taubin(m, lamb=TAUBIN_LAMBDA, nu=-TAUBIN_MU, iterations=2 * int(passes))
    return np.asarray(m.vertices, dtype=np.float64)


def prepare_inputs(d: Distiller) -> None:
    """Resolve ``d``'s inputs into its run folder's ``inputs/`` before it is built: ``d`` builds
    its representation from the resolved group, its config (config.yaml) stays as asked."""
    if needs_resolving(d.cfg):
        d.representation_cfg = resolve_inputs(d.cfg, d.folder).representation


def _active_group(cfg: Config):
    """The active representation's config group (None when the config has none)."""
    return cfg.representation.get(str(cfg.representation.name))


def _inset_of(cfg: Config):
    """The active group's ``init_inset`` (0 when it has none): a distance or ``INSET_MATCH``."""
    group = _active_group(cfg)
    inset = group.get("init_inset", 0) if group is not None else 0
    return inset if inset == INSET_MATCH else float(inset)


def _init_of(cfg: Config) -> Optional[str]:
    group = _active_group(cfg)
    init = group.get("init") if group is not None else None
    return None if init is None else str(init)


__all__ = ["inset_surface", "matched_inset", "matching_cameras", "needs_resolving", "prepare_inputs", "resolve_inputs", "surface_of_run"]
