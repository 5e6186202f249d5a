"""Structured configuration: dataclasses, YAML presets, ``key=value`` overrides, validation.

Every front end (CLI, web app, batch) builds a :class:`Config` with :func:`load_config` and hands
it to :class:`threedistill.distill.Distiller`. Top-level groups are the ones named in the design:
``prior``, ``guidance``, ``representation``, ``camera``, ``optim``, ``run``, ``export``, plus
``refine`` (the optional coarse-to-fine second stage, :mod:`threedistill.pipeline`).

Scheduled scalars
-----------------
Scalars that papers anneal (guidance scale, timestep range, loss weights, learning rates) accept
either a number or a linear schedule ``[start_value, end_value, start_step, end_step]``: the value
is ``start_value`` up to ``start_step``, ``end_value`` from ``end_step`` on, linear in between.
Example: ``guidance.t_max=[0.98,0.5,0,5000]``. :func:`scheduled` evaluates one at a step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from threedistill.errors import UserError
from threedistill.groups import Scheduled, parse_schedule, plain_schedule, scheduled  # noqa: F401  (re-exported)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------
@dataclass
class PriorConfig:
    # A built-in name ("shapes": the shipped shapes-world prior, see assets/shapes-prior), a local
    # diffusers pipeline folder, or a Hugging Face hub id that is already in the local cache
    # (nothing is ever downloaded at run time). The other defaults suit "shapes"; configs/sds-nerf.yaml
    # holds the Stable Diffusion settings.
    name: str = "shapes"
    revision: Optional[str] = None
    # "auto": fp16 on CUDA, fp32 on CPU.
    dtype: str = "auto"
    # Append ", front view" / ", side view" / ", back view" / ", overhead view" to the prompt.
    view_dependent: bool = True
    negative_prompt: str = ""
    # Hugging Face cache folder to search; None means the default (HF_HOME / HF_HUB_CACHE).
    cache_dir: Optional[str] = None


@dataclass
class GuidanceConfig:
    name: str = "sds"
    # Classifier-free guidance scale in the diffusers form eps_u + s * (eps_c - eps_u).
    # 15 suits the shapes prior (30 and 100 grow the object past its true size: measured IoU 0.59
    # at 15 vs 0.49 at 30 on "a red cube"). For Stable Diffusion use DreamFusion's 100
    # (threestudio form; 101 here, the difference is negligible): configs/sds-nerf.yaml.
    guidance_scale: Scheduled = 15.0
    # Timestep range as fractions of num_train_timesteps. The default t_max anneals from 0.98 to 0.5
    # over the default 800 steps (shape first, then detail).
    t_min: Scheduled = 0.02
    t_max: Scheduled = field(default_factory=lambda: [0.98, 0.5, 0, 800])
    # w(t): "auto" = the loss's own (sqrt((1 - abar) / abar) for ism, "sds" for the others);
    # "sds" = 1 - alphas_cumprod[t], "uniform" = 1, "fantasia3d" = sqrt(abar) * (1 - abar), "ism".
    weighting: str = "auto"
    # Clamp the injected gradient elementwise to +-grad_clip (None or 0 disables).
    grad_clip: Scheduled = None
    weight: Scheduled = 1.0
    # -- trainable guidance state (vsd, esd): a LoRA on the prior's UNet plus a camera embedding --
    lora_rank: int = 4
    # Learning rate of the LoRA and camera embedding (fixed; ProlificDreamer's 1e-4).
    state_lr: float = 1.0e-4
    # Fraction of LoRA training samples whose camera condition is dropped (zeroed).
    camera_dropout: float = 0.1
    # esd: weight of the camera-free LoRA prediction (0 is VSD).
    esd_lambda: float = 0.5
    # -- ism: x_s = DDIM inversion of x with the empty prompt, s = t - delta_t ----------------------
    delta_t: Scheduled = field(default_factory=lambda: [100, 50, 0, 800])
    # Inversion to s in at most xs_inv_steps steps of stride xs_delta_t (integer timesteps).
    xs_delta_t: int = 200
    xs_inv_steps: int = 5
    # -- csd: weight of the negative-prompt term, annealed 0 -> 1 (no effect without a negative prompt)
    negative_weight: Scheduled = field(default_factory=lambda: [0.0, 1.0, 0, 400])


@dataclass
class NerfConfig:
    # Scene bounds: the axis-aligned cube [-radius, radius]^3.
    radius: float = 1.0
    encoding: str = "hashgrid"
    # The defaults suit the shapes world on a CPU (smooth objects, 32 px renders); configs/sds-nerf.yaml
    # has Instant-NGP-like 12 levels up to 512 for Stable Diffusion.
    n_levels: int = 6
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    max_resolution: int = 64
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    # Magic3D density blob added to the raw density at initialization.
    blob_density: float = 10.0
    # 0.35 starts the object below the shapes world's sizes (all within radius 0.5) so SDS grows it
    # rather than having to carve a too-large blob; Magic3D's 0.5 is in configs/sds-nerf.yaml.
    blob_radius: float = 0.35
    # Fixed stratified samples per ray (CPU path). The CUDA path marches the occupancy grid with
    # render_step_size instead.
    num_samples: int = 32
    # CPU (fixed-sample) path: samples in cells of a skip_grid_resolution^3 grid whose density,
    # dilated by one cell, is below skip_density_threshold are not evaluated. Training renders use
    # a grid refreshed every skip_refresh_every steps (checkpointed); renders without autograd use
    # a grid of the current weights. 0 disables skipping.
    skip_grid_resolution: int = 64
    skip_density_threshold: float = 0.001
    skip_refresh_every: int = 16
    # CUDA path: nerfacc occupancy grid.
    occupancy_grid_resolution: int = 32
    occupancy_threshold: float = 0.01
    render_step_size: float = 0.01
    # Shading: albedo only before this step, then random among diffuse / textureless / albedo.
    # (Defaults suit the shapes prior, which never saw untextured objects; configs/sds-nerf.yaml
    # has DreamFusion's 1000 / 0.2 / 0.2 for Stable Diffusion.)
    ambient_only_steps: int = 100
    albedo_prob: float = 0.5
    textureless_prob: float = 0.0
    ambient_light: float = 0.1
    # Background: "mlp" (learned, view-direction dependent), "white", "black", "random".
    # White is the shapes world's background (the default prior's).
    background: str = "white"
    random_background_prob: float = 0.5
    # Regularizer weights.
    lambda_orient: Scheduled = field(default_factory=lambda: [10.0, 1000.0, 0, 5000])
    lambda_sparsity: Scheduled = 5.0
    lambda_opaque: Scheduled = 0.0
    # Marching-cubes iso level on density (export). 5 puts the surface of the initial blob at
    # radius 0.25; trained objects are far denser than that at their surface.
    isosurface_threshold: float = 5.0


@dataclass
class GaussiansConfig:
    # Initial number of Gaussians (densification changes it). A "file:" init uses the file's
    # points (randomly subsampled to num_points when it has more).
    num_points: int = 4096
    # "sphere": uniform in a ball of init_radius; "shape": on the shapes-world mesh named by the
    # prompt (falls back to "sphere" otherwise); "file:PATH": a point cloud / mesh read by trimesh.
    init: str = "sphere"
    init_radius: float = 0.5
    init_opacity: float = 0.1
    # Scene radius: depth is normalized by |camera| + radius * sqrt(3), as for the NeRF.
    radius: float = 1.0
    # Background: "white", "black" or "random" (random solid colour per training image, white at
    # evaluation). While training, white/black are replaced by a random colour with probability
    # random_background_prob per image. White is the shapes world's background.
    background: str = "white"
    random_background_prob: float = 0.0
    # Fixed learning rates per group (DreamGaussian-style), independent of optim.lr.
    lr_means: float = 1.0e-3
    lr_scales: float = 5.0e-3
    lr_quats: float = 1.0e-3
    lr_opacities: float = 5.0e-2
    lr_colors: float = 1.0e-2
    # Regularizer weights: mean opacity, mean linear scale (0 disables).
    lambda_opacity: Scheduled = 0.0
    lambda_scale: Scheduled = 0.0
    # Marching-cubes level on the summed Gaussian density (export).
    isosurface_threshold: float = 0.5
    # Adaptive density control (3D Gaussian Splatting, Kerbl et al. 2023), on both back ends.
    # Every densify_every steps from densify_from to densify_until (null: half of run.steps),
    # Gaussians whose view-space positional gradient, averaged over the steps they were visible,
    # exceeds densify_grad_threshold (in NDC units, as gsplat; guidance losses have far larger
    # gradients than 3DGS's photometric loss, whose threshold is 2e-4: 1.0 keeps roughly the top
    # 10% of SDS with the shapes prior) are cloned (largest scale <=
    # densify_scale_threshold x radius) or split in two (larger ones; scales / 1.6); at the same
    # time Gaussians with opacity < prune_opacity or largest scale > prune_scale x radius are
    # removed. Opacities are clamped to 2 x prune_opacity every opacity_reset_every steps
    # (0: never) up to densify_until. The count never exceeds max_gaussians (the
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


@dataclass
class MeshConfig:
    # Starting mesh: "sphere" (an icosphere of init_radius, init_subdivisions), "cube" (a box of
    # half side init_radius, subdivided init_subdivisions times), "file:PATH" (any mesh trimesh
    # reads, Y-up as written by `threedistill export`; its vertex colours when present) or
    # "run:RUN_DIR" (the surface of a previous NeRF / Gaussians run, extracted as `export` does,
    # with its albedo as vertex colours).
    init: str = "sphere"
    init_radius: float = 0.5
    init_subdivisions: int = 4
    # "run:" init: marching-cubes grid size (null: the source run's export.mesh_resolution).
    init_mesh_resolution: Optional[int] = None
    # Depth normalization: depth = distance / (|camera| + radius * sqrt(3)), as for the NeRF.
    radius: float = 1.0
    # Shading (the NeRF's conventions): albedo only before ambient_only_steps, then per batch
    # albedo (albedo_prob), textureless (textureless_prob) or diffuse, lit from the batch's light.
    ambient_only_steps: int = 100
    albedo_prob: float = 0.5
    textureless_prob: float = 0.0
    ambient_light: float = 0.1
    # Background: "white", "black" or "random", as for the Gaussians.
    background: str = "white"
    random_background_prob: float = 0.0
    # Fixed learning rates: vertex offsets, colour logits (independent of optim.lr).
    lr_offsets: float = 1.0e-3
    lr_colors: float = 1.0e-2
    # Regularizer weights: uniform Laplacian smoothing of the vertices (mean squared norm of
    # mean-of-neighbours minus vertex) and normal consistency (mean 1 - cos between adjacent face
    # normals over interior edges); 0 disables.
    lambda_laplacian: Scheduled = 1000.0
    lambda_normal_consistency: Scheduled = 1000.0


@dataclass
class RepresentationConfig:
    name: str = "nerf"
    nerf: NerfConfig = field(default_factory=NerfConfig)
    gaussians: GaussiansConfig = field(default_factory=GaussiansConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


@dataclass
class CameraConfig:
    batch_size: int = 1
    elevation_range: List[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: List[float] = field(default_factory=lambda: [1.5, 2.0])
    fovy_range: List[float] = field(default_factory=lambda: [40.0, 70.0])
    # Point light sampled around the camera direction at this distance from the origin.
    light_distance_range: List[float] = field(default_factory=lambda: [0.8, 1.5])
    light_position_perturb: float = 1.0
    # View labels (degrees): |azimuth| < front => front, |azimuth| > 180 - back => back,
    # elevation > overhead => overhead, otherwise side.
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    # Evaluation / preview / turntable cameras.
    eval_distance: float = 1.75
    eval_fovy: float = 55.0
    eval_elevation: float = 15.0


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: Scheduled = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.0
    # Learning-rate multipliers per parameter group (relative to lr).
    lr_scale_background: float = 0.1
    lr_scale_mlp: float = 0.1


@dataclass
class RunConfig:
    prompt: str = ""
    # 800 steps at 32 px suit the shapes prior on a CPU (about 3 minutes on 2 cores); the prior sees
    # renders resized to its own resolution (64 px). configs/sds-nerf.yaml: 10000 steps at 64 px.
    steps: int = 800
    seed: int = 0
    resolution: int = 32
    # "auto": CUDA if available, else CPU.
    device: str = "auto"
    out_dir: str = "outputs"
    name: Optional[str] = None
    preview_every: int = 100
    checkpoint_every: int = 250
    # Progress bar on stderr (tqdm); off for quiet batch logs.
    progress: bool = True


@dataclass
class ExportConfig:
    # Mesh formats written at the end of a run: any of glb, obj, ply.
    formats: List[str] = field(default_factory=lambda: ["glb"])
    # Gaussians only: also write splat.ply (the standard 3DGS layout splat viewers read).
    splat: bool = True
    mesh_resolution: int = 128
    # Keep connected components with at least this fraction of the largest one's faces.
    min_component_ratio: float = 0.05
    # GLB/OBJ: UV-unwrap (xatlas) and bake the albedo into a texture_size^2 base-colour PNG;
    # false: vertex colours only. PLY always has vertex colours.
    texture: bool = True
    texture_size: int = 1024
    turntable: bool = True
    turntable_frames: int = 60
    turntable_fps: int = 24
    turntable_resolution: int = 128
    turntable_elevation: float = 15.0


@dataclass
class RefineConfig:
    """Coarse-to-fine: when ``enabled``, a finished run continues with a refine stage, its own run
    folder ``<run_dir>/refine`` (:mod:`threedistill.pipeline`): a mesh run initialized from this
    run's surface (``representation.mesh.init=run:<this run's folder>``)."""

    enabled: bool = False
    # The refine stage's preset or YAML file (it must give representation.name=mesh).
    config: str = "sds-mesh"
    # key=value overrides for the refine stage, e.g. [run.resolution=64, run.steps=400].
    overrides: List[str] = field(default_factory=list)


@dataclass
class Config:
    prior: PriorConfig = field(default_factory=PriorConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
_SCHEDULED_KEYS = [
    "guidance.guidance_scale",
    "guidance.t_min",
    "guidance.t_max",
    "guidance.grad_clip",
    "guidance.weight",
    "guidance.delta_t",
    "guidance.negative_weight",
    "representation.nerf.lambda_orient",
    "representation.nerf.lambda_sparsity",
    "representation.nerf.lambda_opaque",
    "representation.gaussians.lambda_opacity",
    "representation.gaussians.lambda_scale",
    "representation.mesh.lambda_laplacian",
    "representation.mesh.lambda_normal_consistency",
    "optim.lr",
]


def _format_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Key '" in msg and "not in" in msg or "ConfigKeyError" in type(err).__name__:
        m = re.search(r"Key '([^']+)'", msg)
        name = key or (m.group(1) if m else "?")
        return f"unknown config key '{name}' (see configs/ or `threedistill generate --help`)"
    if key:
        return f"bad value for config key '{key}': {msg}"
    return f"bad config: {msg}"


def resolve_config_path(path_or_name: str) -> Path:
    """A YAML path, or a preset name from ``configs/`` (``sds-nerf`` -> ``configs/sds-nerf.yaml``)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / path_or_name, CONFIG_DIR / f"{path_or_name}.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"config file '{path_or_name}' not found (give a YAML path or a preset in {CONFIG_DIR})")


#: Keys that older versions wrote into run folders and that no longer exist: ignored when a saved
#: run's config.yaml is read, so old runs still resume, export and evaluate.
RETIRED_KEYS = ("optim.lr_scale_guidance",)


def load_run_config_file(path: Path, overrides: Sequence[str] = ()) -> Config:
    """A run folder's saved ``config.yaml`` (minus :data:`RETIRED_KEYS`) with ``overrides``."""
    try:
        saved = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise UserError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(saved, DictConfig):
        raise UserError(f"config file '{path}' does not hold a config mapping")
    for key in RETIRED_KEYS:
        group, name = key.rsplit(".", 1)
        node = OmegaConf.select(saved, group)
        if isinstance(node, DictConfig) and name in node:
            del node[name]
    return load_config(None, overrides, base=saved)


def _load_config_file(path: Path, chain: tuple = ()) -> DictConfig:
    """One YAML config file; its optional top-level ``extends: [name or path, ...]`` is loaded
    first (recursively, in order; names resolve like ``--config``, relative paths against the
    file's folder), then the file's own keys on top."""
    if path.resolve() in chain:
        raise UserError(f"config file '{path}' extends itself (through {' -> '.join(p.name for p in chain)})")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise UserError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        loaded = OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise UserError(f"config file '{path}' does not hold a config mapping")
    parents = loaded.pop("extends", None)
    if parents is None:
        return loaded
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        beside = [c for c in (path.parent / str(parent), path.parent / f"{parent}.yaml") if c.is_file()]
        target = beside[0] if beside else resolve_config_path(str(parent))
        merged = OmegaConf.merge(merged, _load_config_file(target, chain + (path.resolve(),)))
    return OmegaConf.merge(merged, loaded)


def load_config(
    config_file: Optional[str | Path | Sequence[str | Path]] = None,
    overrides: Sequence[str] = (),
    base: Optional[DictConfig | dict] = None,
    values: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Defaults <- ``base`` (a dict/DictConfig) <- ``config_file`` (one, or several merged in order,
    e.g. a loss preset then the ``sd`` prior overlay) <- ``values`` (typed values by dotted key,
    e.g. ``{"run.seed": 3}``: a form's fields) <- ``key=value`` overrides.

    Returns a validated structured config (an OmegaConf object typed as :class:`Config`).
    Raises :class:`UserError` with one line naming the key on any problem.
    """
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if base is not None:
            merged = OmegaConf.merge(merged, base)
        if config_file is None:
            files: Sequence[str | Path] = []
        elif isinstance(config_file, (str, Path)):
            files = [config_file]
        else:
            files = list(config_file)
        for one in files:
            merged = OmegaConf.merge(merged, _load_config_file(resolve_config_path(str(one))))
        if values:
            nested: Dict[str, Any] = {}
            for key, value in values.items():
                *groups, name = str(key).split(".")
                node = nested
                for g in groups:
                    node = node.setdefault(g, {})
                node[name] = value
            merged = OmegaConf.merge(merged, nested)
        if overrides:
            for ov in overrides:
                if "=" not in ov:
                    raise UserError(f"override '{ov}' is not of the form key=value")
                key = ov.split("=", 1)[0].strip()
                if not key or " " in key:
                    raise UserError(f"override '{ov}' is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise UserError(_format_omegaconf_error(e)) from None
    validate(merged)
    return merged  # type: ignore[return-value]


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express; one line naming the key on failure."""
    for key in _SCHEDULED_KEYS:
        parse_schedule(OmegaConf.select(cfg, key), key)

    def positive(key: str, allow_zero: bool = False) -> None:
        v = OmegaConf.select(cfg, key)
        if v is None or v < 0 or (v == 0 and not allow_zero):
            raise UserError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    for key in ("run.steps", "run.resolution", "camera.batch_size", "representation.nerf.num_samples",
                "representation.nerf.radius", "export.mesh_resolution", "export.texture_size",
                "export.turntable_frames",
                "export.turntable_fps", "export.turntable_resolution", "run.preview_every",
                "run.checkpoint_every"):
        positive(key)
    positive("run.seed", allow_zero=True)

    def range_key(key: str, lo: float, hi: float) -> None:
        r = list(OmegaConf.select(cfg, key))
        if len(r) != 2 or r[0] > r[1]:
            raise UserError(f"config key '{key}' must be [min, max] with min <= max, got {r}")
        if r[0] < lo or r[1] > hi:
            raise UserError(f"config key '{key}' must lie within [{lo}, {hi}], got {r}")

    range_key("camera.elevation_range", -90.0, 90.0)
    range_key("camera.azimuth_range", -360.0, 360.0)
    range_key("camera.distance_range", 1e-3, 1e3)
    range_key("camera.fovy_range", 1.0, 179.0)
    range_key("camera.light_distance_range", 0.0, 1e3)

    for key in ("guidance.t_min", "guidance.t_max"):
        start, end, _, _ = parse_schedule(OmegaConf.select(cfg, key), key)  # type: ignore[misc]
        for v in (start, end):
            if not 0.0 <= v <= 1.0:
                raise UserError(f"config key '{key}' is a fraction of the diffusion steps in [0, 1], got {v}")
    if cfg.guidance.weighting not in ("auto", "sds", "uniform", "fantasia3d", "ism"):
        raise UserError(f"config key 'guidance.weighting' must be auto, sds, uniform, fantasia3d or ism, "
                        f"got '{cfg.guidance.weighting}'")
    for key in ("guidance.lora_rank", "guidance.xs_delta_t", "guidance.xs_inv_steps", "guidance.state_lr"):
        positive(key)
    for key in ("guidance.camera_dropout", "guidance.esd_lambda"):
        v = OmegaConf.select(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise UserError(f"config key '{key}' must lie within [0, 1], got {v}")
    start, end, _, _ = parse_schedule(cfg.guidance.guidance_scale, "guidance.guidance_scale")  # type: ignore[misc]
    if min(start, end) < 0:
        raise UserError(f"config key 'guidance.guidance_scale' must be >= 0, got {cfg.guidance.guidance_scale}")
    start, end, _, _ = parse_schedule(cfg.guidance.delta_t, "guidance.delta_t")  # type: ignore[misc]
    if min(start, end) < 0:
        raise UserError(f"config key 'guidance.delta_t' must be >= 0 (integer timesteps), got {cfg.guidance.delta_t}")
    if cfg.representation.nerf.background not in ("mlp", "white", "black", "random"):
        raise UserError(
            f"config key 'representation.nerf.background' must be mlp, white, black or random, "
            f"got '{cfg.representation.nerf.background}'"
        )
    g = cfg.representation.gaussians
    for key in ("representation.gaussians.num_points", "representation.gaussians.init_radius",
                "representation.gaussians.radius"):
        positive(key)
    for key in ("densify_from", "densify_every", "densify_grad_threshold", "densify_scale_threshold",
                "prune_opacity", "prune_scale", "opacity_reset_every"):
        positive(f"representation.gaussians.{key}", allow_zero=True)
    positive("representation.gaussians.max_gaussians")
    if g.densify_until is not None and g.densify_until < 0:
        raise UserError(f"config key 'representation.gaussians.densify_until' must be >= 0 or null, got {g.densify_until}")
    if not 0.0 < g.init_opacity < 1.0:
        raise UserError(f"config key 'representation.gaussians.init_opacity' must lie within (0, 1), got {g.init_opacity}")
    if not 0.0 <= g.random_background_prob <= 1.0:
        raise UserError(f"config key 'representation.gaussians.random_background_prob' must lie within [0, 1], "
                        f"got {g.random_background_prob}")
    if g.background not in ("white", "black", "random"):
        raise UserError(f"config key 'representation.gaussians.background' must be white, black or random, "
                        f"got '{g.background}'")
    if g.init not in ("sphere", "shape") and not (str(g.init).startswith("file:") and len(str(g.init)) > 5):
        raise UserError(f"config key 'representation.gaussians.init' must be sphere, shape or file:PATH, got '{g.init}'")
    m = cfg.representation.mesh
    for key in ("init_radius", "radius", "lr_offsets", "lr_colors"):
        positive(f"representation.mesh.{key}", allow_zero=key.startswith("lr_"))
    positive("representation.mesh.ambient_only_steps", allow_zero=True)
    if not 0 <= m.init_subdivisions <= 7:
        raise UserError(f"config key 'representation.mesh.init_subdivisions' must be between 0 and 7, "
                        f"got {m.init_subdivisions}")
    if m.init_mesh_resolution is not None and m.init_mesh_resolution < 2:
        raise UserError(f"config key 'representation.mesh.init_mesh_resolution' must be >= 2 or null, "
                        f"got {m.init_mesh_resolution}")
    for key in ("albedo_prob", "textureless_prob", "ambient_light", "random_background_prob"):
        v = OmegaConf.select(cfg, f"representation.mesh.{key}")
        if not 0.0 <= v <= 1.0:
            raise UserError(f"config key 'representation.mesh.{key}' must lie within [0, 1], got {v}")
    if m.albedo_prob + m.textureless_prob > 1.0:
        raise UserError(f"config keys 'representation.mesh.albedo_prob' + 'textureless_prob' must be <= 1, "
                        f"got {m.albedo_prob} + {m.textureless_prob}")
    if m.background not in ("white", "black", "random"):
        raise UserError(f"config key 'representation.mesh.background' must be white, black or random, "
                        f"got '{m.background}'")
    init = str(m.init)
    if init not in ("sphere", "cube") and not (init.startswith(("file:", "run:")) and len(init.split(":", 1)[1]) > 0):
        raise UserError(f"config key 'representation.mesh.init' must be sphere, cube, file:PATH or run:RUN_DIR, "
                        f"got '{m.init}'")
    for key in ("representation.mesh.lambda_laplacian", "representation.mesh.lambda_normal_consistency"):
        sched = parse_schedule(OmegaConf.select(cfg, key), key)
        if sched is not None and min(sched[0], sched[1]) < 0:
            raise UserError(f"config key '{key}' must be >= 0, got {OmegaConf.select(cfg, key)}")
    if cfg.representation.nerf.encoding not in ("hashgrid",):
        raise UserError(f"config key 'representation.nerf.encoding' must be hashgrid, got '{cfg.representation.nerf.encoding}'")
    if not 16 <= cfg.export.texture_size <= 8192:
        raise UserError(f"config key 'export.texture_size' must be between 16 and 8192, "
                        f"got {cfg.export.texture_size}")
    for fmt in cfg.export.formats:
        if fmt not in ("glb", "obj", "ply"):
            raise UserError(f"config key 'export.formats': unknown mesh format '{fmt}' (use glb, obj, ply)")
    if cfg.run.device not in ("auto", "cpu", "cuda") and not str(cfg.run.device).startswith("cuda:"):
        raise UserError(f"config key 'run.device' must be auto, cpu, cuda or cuda:N, got '{cfg.run.device}'")
    if cfg.prior.dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise UserError(f"config key 'prior.dtype' must be auto, fp32, fp16 or bf16, got '{cfg.prior.dtype}'")
    if cfg.optim.name not in ("adam", "adamw"):
        raise UserError(f"config key 'optim.name' must be adam or adamw, got '{cfg.optim.name}'")
    if not str(cfg.refine.config).strip():
        raise UserError("config key 'refine.config' must name a preset or YAML file, e.g. sds-mesh")
    for ov in cfg.refine.overrides:
        if not re.match(r"^[A-Za-z_][\w.]*=", str(ov)):
            raise UserError(f"config key 'refine.overrides': '{ov}' is not of the form key=value")
    # Registered names are checked where they are looked up (guidance / representation registries).


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def to_container(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = [
    "Config",
    "PriorConfig",
    "GuidanceConfig",
    "RepresentationConfig",
    "NerfConfig",
    "GaussiansConfig",
    "MeshConfig",
    "CameraConfig",
    "OptimConfig",
    "RunConfig",
    "ExportConfig",
    "RefineConfig",
    "load_config",
    "validate",
    "scheduled",
    "plain_schedule",
    "parse_schedule",
    "to_yaml",
    "to_container",
]
