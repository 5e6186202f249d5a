"""The whole configuration: assembles the groups, loads YAML presets, applies ``key=value`` overrides.

Every front end (CLI, web app, batch) builds a :class:`Config` with :func:`load_config` and hands
it to :class:`threedistill.distill.Distiller`. Top-level groups are the ones named in the design:
``prior``, ``guidance``, ``representation``, ``camera``, ``optim``, ``run``, ``export``, plus
``refine`` (the optional coarse-to-fine second stage, :mod:`threedistill.pipeline`).

A group lives beside the code it configures and checks its own values in ``validate(key)``
(:class:`~threedistill.priors.PriorConfig`, :class:`~threedistill.guidance.GuidanceConfig`,
:class:`~threedistill.cameras.CameraConfig`); the groups of the loop and the pipeline (``optim``,
``run``, ``export``, ``refine``) live here. They are imported here, so ``from threedistill.config
import PriorConfig`` keeps working. Scheduled scalars (a number or ``[start_value, end_value,
start_step, end_step]``) are described in :mod:`threedistill.groups`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from threedistill.cameras import CameraConfig
from threedistill.errors import UserError
from threedistill.groups import Scheduled, check_choice, check_positive, parse_schedule
from threedistill.groups import plain_schedule, scheduled  # noqa: F401  (re-exported)
from threedistill.guidance.base import GuidanceConfig
from threedistill.priors.base import PriorConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: A ``key=value`` config override: a dotted key (letters, digits, underscores; not starting with a
#: digit or a dot), ``=``, the value (OmegaConf's dotlist syntax, e.g. ``guidance.t_max=[0.98,0.5,0,5000]``).
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def is_override(word: str) -> bool:
    """Whether ``word`` is a ``key=value`` config override (``run.steps=500``) rather than a prompt
    or a path: the one rule for the CLI's words, :func:`load_config`'s overrides and
    ``refine.overrides``."""
    return _OVERRIDE.match(str(word)) is not None


# ----------------------------------------------------------------------------------------------
# Groups (those of the components are imported above)
# ----------------------------------------------------------------------------------------------
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
class OptimConfig:
    name: str = "adam"
    lr: Scheduled = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.0
    # Learning-rate multipliers per parameter group (relative to lr).
    lr_scale_background: float = 0.1
    lr_scale_mlp: float = 0.1

    def validate(self, key: str = "optim") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``OptimConfig.validate(cfg.optim, "optim")``)."""
        parse_schedule(self.lr, f"{key}.lr")
        check_choice(self.name, f"{key}.name", ("adam", "adamw"))


@dataclass
class RunConfig:
    prompt: str = ""
    # 800 steps at 32 px suit the shapes prior on a CPU (about 3 minutes on 2 cores); the prior sees
    # renders resized to its own resolution (64 px). configs/sd.yaml: 10000 steps at 64 px.
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

    def validate(self, key: str = "run") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``RunConfig.validate(cfg.run, "run")``)."""
        for name in ("steps", "resolution", "preview_every", "checkpoint_every"):
            check_positive(getattr(self, name), f"{key}.{name}")
        check_positive(self.seed, f"{key}.seed", allow_zero=True)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"config key '{key}.device' must be auto, cpu, cuda or cuda:N, got '{self.device}'")


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

    def validate(self, key: str = "export") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``ExportConfig.validate(cfg.export, "export")``)."""
        for name in ("mesh_resolution", "texture_size", "turntable_frames", "turntable_fps", "turntable_resolution"):
            check_positive(getattr(self, name), f"{key}.{name}")
        if not 16 <= self.texture_size <= 8192:
            raise UserError(f"config key '{key}.texture_size' must be between 16 and 8192, got {self.texture_size}")
        for fmt in self.formats:
            if fmt not in ("glb", "obj", "ply"):
                raise UserError(f"config key '{key}.formats': unknown mesh format '{fmt}' (use glb, obj, ply)")


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

    def validate(self, key: str = "refine") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``RefineConfig.validate(cfg.refine, "refine")``)."""
        if not str(self.config).strip():
            raise UserError(f"config key '{key}.config' must name a preset or YAML file, e.g. sds-mesh")
        for ov in self.overrides:
            if not is_override(ov):
                raise UserError(f"config key '{key}.overrides': '{ov}' is not of the form key=value")


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

    def validate(self) -> None:
        """Every group's own checks (types are OmegaConf's, on merge); the first bad value raises a
        one-line :class:`~threedistill.errors.UserError` naming its key. Also called unbound on a
        structured config: ``Config.validate(cfg)``."""
        for key, group in (("prior", PriorConfig), ("guidance", GuidanceConfig), ("camera", CameraConfig),
                           ("optim", OptimConfig), ("run", RunConfig), ("export", ExportConfig),
                           ("refine", RefineConfig)):
            group.validate(getattr(self, key), key)
        _validate_representation(self)  # representation groups: moved by D
        # Registered names are checked where they are looked up (guidance / representation registries).


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
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
) -> Config:
    """Defaults <- ``base`` (a dict/DictConfig) <- ``config_file`` (one, or several merged in order,
    e.g. a loss preset then the ``sd`` prior overlay) <- ``key=value`` overrides.

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
        if overrides:
            for ov in overrides:
                if not is_override(ov):
                    raise UserError(f"override '{ov}' is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise UserError(_format_omegaconf_error(e)) from None
    validate(merged)
    return merged  # type: ignore[return-value]


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express; one line naming the key on failure."""
    Config.validate(cfg)


# representation groups: moved by D
def _validate_representation(cfg: Config) -> None:
    """The checks of ``representation.nerf`` / ``.gaussians`` / ``.mesh``."""
    def positive(key: str, allow_zero: bool = False) -> None:
        check_positive(OmegaConf.select(cfg, key), key, allow_zero)

    for key in ("representation.nerf.lambda_orient", "representation.nerf.lambda_sparsity",
                "representation.nerf.lambda_opaque", "representation.gaussians.lambda_opacity",
                "representation.gaussians.lambda_scale", "representation.mesh.lambda_laplacian",
                "representation.mesh.lambda_normal_consistency"):
        parse_schedule(OmegaConf.select(cfg, key), key)
    for key in ("representation.nerf.num_samples", "representation.nerf.radius"):
        positive(key)
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


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


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
    "is_override",
]
