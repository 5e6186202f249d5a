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

import copy
import importlib.resources
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from threedistill.cameras import CameraConfig
from threedistill.devices import check_auto_bool, check_auto_count, check_threads
from threedistill.errors import UserError
from threedistill.groups import (MAX_STEPS, Scheduled, check_bounds, check_choice, check_positive, check_storable,
                                 check_whole_schedule, parse_schedule, shown)
from threedistill.groups import plain_schedule, scheduled  # noqa: F401  (re-exported)
from threedistill.guidance.base import GuidanceConfig
from threedistill.priors.base import PriorConfig
from threedistill.representations import (  # noqa: F401  (the groups re-exported)
    GaussiansConfig,
    MeshConfig,
    NerfConfig,
    RepresentationConfig,
)

#: The presets (``<loss>-<representation>.yaml`` and overlays), package data of ``threedistill``: found
#: from any working directory, in a clone or an installed wheel alike.
CONFIG_DIR = Path(str(importlib.resources.files("threedistill") / "presets"))

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


#: Bounds of the ``optim`` numbers (:func:`~threedistill.groups.check_bounds`). Learning rates
#: above 10 only diverge (the presets use 1e-3 .. 1e-2); Adam's betas lie in [0, 1).
OPTIM_BOUNDS = {"lr": (0.0, 10.0), "eps": (1e-30, 1.0), "weight_decay": (0.0, 10.0),
                "lr_scale_background": (0.0, 1000.0), "lr_scale_mlp": (0.0, 1000.0)}


@dataclass
class OptimConfig:
    name: str = "adam"
    # The quick start's 300 steps: 0.02 (benchmarks/results/quality-ablation-quickstart.md), decayed
    # linearly to 0.002 over the second half (steps 150-300; Instant-NGP and 3DGS decay theirs too):
    # under SDS's noisy gradient a constant rate keeps the hash grid moving to the last step. 16
    # SDS + NeRF runs (8 benchmark prompts x 2 seeds): IoU 0.835 -> 0.845, color error unchanged
    # (benchmarks/results/quality-ablation-issue18-round6.md). A schedule, so it is in steps: set
    # your own with run.steps (e.g. optim.lr=0.02 or [0.02,0.002,400,800]). The other presets keep a
    # constant 0.01 (set in each).
    lr: Scheduled = field(default_factory=lambda: [0.02, 0.002, 150, 300])
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.0
    # Learning-rate multipliers per parameter group (relative to lr).
    lr_scale_background: float = 0.1
    lr_scale_mlp: float = 0.1
    # Adam's implementation: "auto" = torch's fused kernel on CUDA when every parameter is a CUDA
    # floating-point tensor, else the multi-tensor "foreach" one (same update, fewer kernel launches
    # than the per-parameter loop); "fused", "foreach" or "loop" (the per-parameter loop) to force one.
    fused: str = "auto"

    def validate(self, key: str = "optim") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``OptimConfig.validate(cfg.optim, "optim")``)."""
        parse_schedule(self.lr, f"{key}.lr")
        check_bounds(self, key, OPTIM_BOUNDS)
        check_choice(self.name, f"{key}.name", ("adam", "adamw"))
        check_choice(self.fused, f"{key}.fused", ("auto", "fused", "foreach", "loop"))
        betas = list(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise UserError(f"config key '{key}.betas' must be two numbers in [0, 1), got {shown(betas)}")


#: Bounds of the ``run`` numbers. Far beyond what a real run uses (the papers' longest schedules
#: are ~25k steps; Stable Diffusion renders at 64-512 px), small enough that a typo is refused
#: before it holds a worker for ever or fails inside the job: steps and cadences <= 1e6; seeds are
#: 32-bit (what numpy, diffusers and most tools take, so a seed can be reproduced elsewhere);
#: renders 4..2048 px (a 2048^2 NeRF render batch already needs tens of GB).
RUN_BOUNDS = {"steps": (1, MAX_STEPS), "seed": (0, 2**32 - 1), "resolution": (4, 2048),
              "preview_every": (1, MAX_STEPS), "checkpoint_every": (1, MAX_STEPS),
              # time-based checkpoints: 0 (off) up to a day between two
              "checkpoint_every_s": (0, 86400), "preview_resolution": (4, 2048)}


@dataclass
class RunConfig:
    prompt: str = ""
    # 300 steps at 32 px suit the shapes prior on a CPU (under a minute on 2 idle cores); the prior
    # sees renders resized to its own resolution (64 px). threedistill/presets/sd.yaml: 10000 steps at 64 px.
    steps: int = 300
    seed: int = 0
    # Training renders' size in pixels: a number or a schedule (threedistill/groups.py), e.g.
    # [[0, 32], [400, 64]] (coarse to fine: 32 px, 64 px from step 400); a linear ramp renders at
    # multiples of 8 px between its end values (cameras.resolution_at). Previews use the largest.
    resolution: Scheduled = 32
    # "auto": CUDA if available, else CPU.
    device: str = "auto"
    out_dir: str = "outputs"
    name: Optional[str] = None
    preview_every: int = 100
    # Previews render each view at max(resolution (its largest), preview_resolution) px (large enough to watch).
    preview_resolution: int = 128
    checkpoint_every: int = 250
    # Also checkpoint when this many seconds have passed since the last checkpoint (0: off), so a
    # killed run loses at most about this much work; the web app sets 30. Such a checkpoint is
    # replaced by the next one unless its step is on the checkpoint_every cadence.
    checkpoint_every_s: float = 0.0
    # Progress bar on stderr (tqdm); off for quiet batch logs.
    progress: bool = True
    # torch's CPU threads: auto (OMP_NUM_THREADS when set, else the cores the load average leaves
    # free, at least 1, looked at again every 10 s during the run: a busy machine does not make the
    # threads spin against each other) or N.
    threads: Any = "auto"
    # Read the step's stats (loss, t, grad norms: tensors on the device) every N steps, in one
    # transfer: "auto" = 1 on the CPU (free there), 20 on CUDA (a read waits for the GPU: one wait per
    # step would leave it idle while Python queues the next). metrics.jsonl still gets a line per
    # step (written when read); the progress bar and on_step callbacks move when read; a non-finite
    # loss is caught within N steps, and always before a checkpoint is written.
    stats_every: Any = "auto"
    # Split each step's time into sections (time_render, time_guidance, time_encode, ...), waiting
    # for the device at each section's end: "auto" = on for the CPU (free there), off on CUDA (where
    # the waits cost speed); off, only time_step is logged. true or false to force.
    profile: Any = "auto"
    # TensorFloat-32 matmuls and convolutions on CUDA (Ampere and newer: ~fp16 speed for fp32 work,
    # 10-bit mantissa); a no-op on the CPU.
    tf32: bool = True

    def validate(self, key: str = "run") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``RunConfig.validate(cfg.run, "run")``)."""
        for name in ("steps", "preview_every", "preview_resolution", "checkpoint_every"):
            check_positive(getattr(self, name), f"{key}.{name}")
        check_whole_schedule(self.resolution, f"{key}.resolution", lo=1)
        check_positive(self.seed, f"{key}.seed", allow_zero=True)
        check_bounds(self, key, RUN_BOUNDS)
        check_positive(self.checkpoint_every_s, f"{key}.checkpoint_every_s", allow_zero=True)
        if not math.isfinite(float(self.checkpoint_every_s)):
            raise UserError(f"config key '{key}.checkpoint_every_s' must be a finite number of seconds, "
                            f"got {self.checkpoint_every_s}")
        check_threads(self.threads, f"{key}.threads")
        check_auto_count(self.stats_every, f"{key}.stats_every", "steps between two reads of the stats")
        check_auto_bool(self.profile, f"{key}.profile")
        if not isinstance(self.tf32, bool):
            raise UserError(f"config key '{key}.tf32' must be true or false, got {shown(self.tf32)}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"config key '{key}.device' must be auto, cpu, cuda or cuda:N, got {shown(self.device)}")


#: Bounds of the ``export`` numbers: marching cubes up to 1024^3 cells (threestudio exports at
#: 256; 1024^3 density queries take minutes on a GPU, beyond is a typo), textures up to 8192 px
#: (what GLB viewers load), turntables up to a minute of 60 fps frames at up to 2048 px.
#: Values of ``export.surface``.
EXPORT_SURFACES = ("silhouette", "isosurface")
EXPORT_BOUNDS = {"mesh_resolution": (8, 1024), "min_component_ratio": (0.0, 1.0), "texture_size": (16, 8192),
                 "turntable_frames": (1, 3600), "turntable_fps": (1, 120), "turntable_resolution": (16, 2048),
                 "turntable_elevation": (-90.0, 90.0)}


@dataclass
class ExportConfig:
    # Mesh formats written at the end of a run: any of glb, obj, ply.
    formats: List[str] = field(default_factory=lambda: ["glb", "obj", "ply"])
    # The files' up axis: auto (GLB and OBJ Y-up, PLY Z-up: each imports upright in Blender with
    # its importer's defaults), y or z (OBJ and PLY; GLB is always Y-up, as glTF specifies).
    up_axis: str = "auto"
    # The files' origin (the pivot in Blender and other tools): base (the bottom face's centre:
    # the object stands on the ground), center (the bounding box's centre) or world (as trained).
    origin: str = "base"
    # The object's height in the files, in metres (1 unit = 1 m in glTF and Blender); null keeps
    # the world scale.
    size: Optional[float] = None
    # Gaussians only: also write splat.ply (the standard 3DGS layout splat viewers read).
    splat: bool = True
    mesh_resolution: int = 128
    # Which level set of a density (NeRF, Gaussians) is exported: "silhouette" (the level whose
    # silhouette from 16 views matches what the run renders, the refine stage's start surface too)
    # or "isosurface" (the representation's fixed isosurface_threshold). silhouette: the NeRF's
    # fixed level 5 lies inside the rendered object, so the GLB came out smaller and rougher than
    # the renders (16 SDS + NeRF runs: exported-mesh IoU and color error against the ground truth,
    # benchmarks/results/quality-ablation-issue18-round6.md). `threedistill export --threshold X`
    # sets a level by hand.
    surface: str = "silhouette"
    # Keep connected components with at least this fraction of the largest one's faces.
    min_component_ratio: float = 0.05
    # GLB/OBJ: UV-unwrap (xatlas) and bake the albedo into a texture_size^2 base-color PNG;
    # false: vertex colors only. PLY always has vertex colors.
    texture: bool = True
    texture_size: int = 1024
    turntable: bool = True
    # 96 frames at 24 fps: a 4 s orbit, 256 px.
    turntable_frames: int = 96
    turntable_fps: int = 24
    turntable_resolution: int = 256
    turntable_elevation: float = 15.0
    # What the turntable shows: auto (the exported mesh file when one is written, shaded like the
    # export check over white, so the video shows the asset you get; the representation's own
    # render for one that writes an extra output of its own, the Gaussians' splat), mesh or
    # representation.
    turntable_of: str = "auto"

    def validate(self, key: str = "export") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``ExportConfig.validate(cfg.export, "export")``)."""
        for name in ("mesh_resolution", "texture_size", "turntable_frames", "turntable_fps", "turntable_resolution"):
            check_positive(getattr(self, name), f"{key}.{name}")
        if not 16 <= self.texture_size <= 8192:
            raise UserError(f"config key '{key}.texture_size' must be between 16 and 8192, got {shown(self.texture_size)}")
        check_bounds(self, key, EXPORT_BOUNDS)
        check_choice(str(self.up_axis).lower(), f"{key}.up_axis", ("auto", "y", "z"))
        check_choice(str(self.turntable_of), f"{key}.turntable_of", ("auto", "mesh", "representation"))
        check_choice(str(self.origin).lower(), f"{key}.origin", ("base", "center", "world"))
        check_choice(str(self.surface), f"{key}.surface", EXPORT_SURFACES)
        if self.size is not None and not float(self.size) > 0:
            raise UserError(f"config key '{key}.size' must be > 0 (the object's height in metres) or null, got {self.size}")
        for fmt in self.formats:
            if fmt not in ("glb", "obj", "ply"):
                raise UserError(f"config key '{key}.formats': unknown mesh format '{fmt}' (use glb, obj, ply)")


@dataclass
class RefineConfig:
    """Coarse-to-fine: when ``enabled``, a finished run continues with a refine stage, its own run
    folder ``<run_dir>/refine`` (:mod:`threedistill.pipeline`): a mesh (or Gaussians) run initialized
    from this run's surface (``representation.<name>.init=run:<this run's folder>``)."""

    enabled: bool = False
    # The refine stage's preset or YAML file (it must give representation.name=mesh or gaussians:
    # a representation that starts from a run's surface).
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
                raise UserError(f"config key '{key}.overrides': {shown(ov)} is not of the form key=value")


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
        # No ${...} interpolation first: the groups' checks would resolve it.
        check_storable(self, interpolations_only=True)
        for key, group in (("prior", PriorConfig), ("guidance", GuidanceConfig), ("camera", CameraConfig),
                           ("optim", OptimConfig), ("run", RunConfig), ("export", ExportConfig),
                           ("refine", RefineConfig)):
            group.validate(getattr(self, key), key)
        RepresentationConfig.validate(self.representation, "representation")
        if self.guidance.perp_neg and not self.prior.view_dependent:  # across groups: checked here
            raise UserError("config key 'guidance.perp_neg' needs view-dependent prompts (its negatives are the "
                            "other views' prompts): set prior.view_dependent=true or guidance.perp_neg=false")
        check_storable(self)  # what config.yaml and run.json will hold, the keys without bounds too
        # Registered names are checked where they are looked up (guidance / representation registries).


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
#: A key worth quoting in a message: dotted names of letters, digits and underscores (anything else
#: in a key position came from text that is not a config, e.g. a file that is not one).
_GROUPS = ("prior", "guidance", "representation", "camera", "optim", "run", "export", "refine")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][\w.]{0,99}$")


def _format_omegaconf_error(err: Exception, source: Optional[str] = None) -> str:
    """One line for an OmegaConf error. ``source`` names the file the values came from: then no
    value and no unknown key that is not a plain name is quoted (a file's content never reaches a
    message, whatever file a user names); values a user typed are quoted, shortened."""
    key = str(getattr(err, "full_key", None) or "")
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f"config file '{source}': " if source is not None else ""
    if "Key '" in msg and "not in" in msg or "ConfigKeyError" in type(err).__name__:
        m = re.search(r"Key '([^']+)'", msg)
        name = key or (m.group(1) if m else "")
        if source is not None:  # a file's keys are its content: quoted only as a typo in a known group
            group, _, leaf = name.rpartition(".")
            if group.split(".")[0] in _GROUPS and re.fullmatch(r"[a-z_][a-z0-9_]{0,39}", leaf):
                return f"{where}unknown config key '{name}' (see `threedistill presets` or `threedistill generate --help`)"
            return f"{where}a key that is not a config key (see `threedistill presets`)"
        if _PLAIN_KEY.match(name) is None:
            return f"{where}a key that is not a config key (see `threedistill presets` or `threedistill generate --help`)"
        return f"{where}unknown config key '{name}' (see `threedistill presets` or `threedistill generate --help`)"
    if key and _PLAIN_KEY.match(key) is None:
        return f"{where}a key that is not a config key (see `threedistill presets`)"
    if source is not None:
        kind = next((t for t in ("Integer", "Float", "Boolean", "String") if t in msg), None)
        expected = f" (expected {'a' if kind != 'Integer' else 'an'} {kind.lower()})" if kind else ""
        return f"{where}bad value for config key '{key}'{expected}" if key else f"{where}not a valid config"
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    if key:
        return f"bad value for config key '{key}': {msg}"
    return f"bad config: {msg}"


#: A check of each file a config is read from (the path, resolved, and the name the user gave, for
#: the message; raises :class:`~threedistill.errors.UserError`): the path policy's seam in
#: :func:`load_config`.
ReadCheck = Callable[[Path, str], None]


def preset_names() -> List[str]:
    """The shipped presets (by name, without ``.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path_or_name: str, read_check: Optional[ReadCheck] = None) -> Path:
    """A YAML path, or a preset name (``sds-nerf`` -> ``threedistill/presets/sds-nerf.yaml``, see :func:`list_presets`).
    ``read_check`` (the path policy) sees the resolved path (symlinks followed) of a file before
    it is read, and the name of one that is not found, so a policy can answer both alike."""
    name = str(path_or_name)
    if "\x00" in name or not name.strip():
        raise UserError("config file name is empty or holds a NUL character")
    candidates = [Path(name).expanduser()]
    if name in preset_names():
        candidates = [CONFIG_DIR / f"{name}.yaml"]  # a shipped preset wins over a file of that name
    else:
        candidates += [CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for cand in candidates:
        if cand.is_file():
            if read_check is not None:
                read_check(cand.resolve(), name)
            return cand
    if read_check is not None:
        read_check(Path(name).expanduser().resolve(), name)  # a policy that refuses says so, whether it exists or not
    raise UserError(f"config file {shown(name)} not found (give a YAML path or a preset name: "
                    f"{', '.join(preset_names())})")


def list_presets() -> List[Tuple[str, str]]:
    """``(name, description)`` of every shipped preset, sorted by name; the description is the first
    comment line of its YAML (what ``threedistill presets`` prints)."""
    presets = []
    for path in sorted(CONFIG_DIR.glob("*.yaml"), key=lambda p: p.stem):
        first = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                first = line.lstrip("#").strip()
                break
            if line.strip():
                break
        presets.append((path.stem, first))
    return presets


#: Keys that older versions wrote into run folders and that no longer exist: ignored when a saved
#: run's config.yaml is read, so old runs still resume, export and evaluate.
RETIRED_KEYS = ("optim.lr_scale_guidance", "representation.nerf.encoding")
#: Keys added after run folders were first written, with the value that reproduces how such a
#: folder was trained (its saved config lacks the key; today's default differs): an old run keeps
#: rendering, evaluating and exporting as it did.
INTRODUCED_KEYS = {"representation.nerf.normal_type": "analytic", "representation.nerf.density_activation": "softplus",
                   "representation.gaussians.lit": False, "export.surface": "isosurface"}


def _yaml_error(path: Path, err: Exception) -> UserError:
    """A file that is not valid YAML, by line and column only: the parser's message quotes the file."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return UserError(f"config file '{path}' is not valid YAML{where}")


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not a text file") from None
    except OSError as e:
        raise UserError(f"config file '{path}' cannot be read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # yaml errors, OmegaConf's on odd keys
        raise _yaml_error(path, e) from None


def _merge(merged: Any, other: Any, source: Optional[str] = None) -> Any:
    """``OmegaConf.merge`` with its errors as one-line :class:`UserError` (no content of ``source``)."""
    try:
        return OmegaConf.merge(merged, other)
    except OmegaConfBaseException as e:
        raise UserError(_format_omegaconf_error(e, source)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # values OmegaConf cannot hold
        where = f"config file '{source}': " if source is not None else ""
        raise UserError(f"{where}a value that is not a valid config value ({type(e).__name__})") from None


def _group_of(cfg: DictConfig, key: str) -> tuple[Optional[DictConfig], str]:
    """The mapping that holds the dotted ``key`` in ``cfg`` (None when it is absent or not a
    mapping) and the key's last part."""
    group, name = key.rsplit(".", 1)
    node = OmegaConf.select(cfg, group)
    return (node if isinstance(node, DictConfig) else None), name


def load_run_config_file(path: Path, overrides: Sequence[str] = ()) -> Config:
    """A run folder's saved ``config.yaml`` (minus :data:`RETIRED_KEYS`, plus the old values of
    :data:`INTRODUCED_KEYS` it lacks) with ``overrides``."""
    saved = _read_yaml(path)
    if not isinstance(saved, DictConfig):
        raise UserError(f"config file '{path}' does not hold a config mapping")
    for key in RETIRED_KEYS:
        node, name = _group_of(saved, key)
        if node is not None and name in node:
            del node[name]
    for key, old_value in INTRODUCED_KEYS.items():
        node, name = _group_of(saved, key)
        if node is not None and name not in node:
            node[name] = old_value
    return load_config(None, overrides, base=saved, base_source=str(path))


def _load_config_file(path: Path, chain: tuple = (), read_check: Optional[ReadCheck] = None) -> DictConfig:
    """One YAML config file; its optional top-level ``extends: [name or path, ...]`` is loaded
    first (recursively, in order; names resolve like ``--config``, relative paths against the
    file's folder), then the file's own keys on top. ``read_check`` sees every file first."""
    if path.resolve() in chain:
        raise UserError(f"config file '{path}' extends itself (through {' -> '.join(p.name for p in chain)})")
    if read_check is not None:
        read_check(path.resolve(), str(path))
    loaded = _read_yaml(path)
    if loaded is None:
        loaded = OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise UserError(f"config file '{path}' does not hold a config mapping")
    parents = loaded.pop("extends", None)
    if parents is None:
        return loaded
    if isinstance(parents, str):
        parents = [parents]
    if not all(isinstance(p, str) for p in parents):
        raise UserError(f"config file '{path}': extends must name presets or YAML files")
    merged = OmegaConf.create({})
    for parent in parents:
        beside = [c for c in (path.parent / str(parent), path.parent / f"{parent}.yaml") if c.is_file()]
        try:
            target = beside[0] if beside else resolve_config_path(str(parent), read_check)
        except UserError:  # the name is the file's content: not quoted
            raise UserError(f"config file '{path}': a file it extends is not found or not allowed") from None
        merged = _merge(merged, _load_config_file(target, chain + (path.resolve(),), read_check), str(target))
    return _merge(merged, loaded, str(path))


_SCHEMA: Optional[DictConfig] = None


def _schema() -> DictConfig:
    """A fresh copy of the structured defaults (built once: building takes ~7x a copy)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = OmegaConf.structured(Config)
    return copy.deepcopy(_SCHEMA)


def load_config(
    config_file: Optional[str | Path | Sequence[str | Path]] = None,
    overrides: Sequence[str] = (),
    base: Optional[DictConfig | dict] = None,
    values: Optional[Mapping[str, Any]] = None,
    read_check: Optional[ReadCheck] = None,
    base_source: Optional[str] = None,
) -> Config:
    """Defaults <- ``base`` (a dict/DictConfig) <- ``config_file`` (one, or several merged in order,
    e.g. a loss preset then the ``sd`` prior overlay) <- ``values`` (typed values by dotted key,
    e.g. ``{"run.seed": 3}``: a form's fields) <- ``key=value`` overrides.

    ``read_check`` (a path policy) sees each config file (and each file it extends) before it is
    read. ``base_source``: the file ``base`` was read from (its content is never quoted).
    Returns a validated structured config (an OmegaConf object typed as :class:`Config`).
    Raises :class:`UserError` with one line naming the key on any problem; a message never
    quotes a config file's content.
    """
    merged = _schema()
    if base is not None:
        merged = _merge(merged, base, base_source)
    if config_file is None:
        files: Sequence[str | Path] = []
    elif isinstance(config_file, (str, Path)):
        files = [config_file]
    else:
        files = list(config_file)
    for one in files:
        path = resolve_config_path(str(one), read_check)
        merged = _merge(merged, _load_config_file(path, read_check=read_check), str(path))
    if values:
        nested: Dict[str, Any] = {}
        for key, value in values.items():
            if _PLAIN_KEY.match(str(key)) is None:
                raise UserError(f"{shown(key)} is not a config key")
            *groups, name = str(key).split(".")
            node = nested
            for g in groups:
                node = node.setdefault(g, {})
                if not isinstance(node, dict):
                    raise UserError(f"config key '{key}' is given twice (as a value and as a group)")
            node[name] = value
        merged = _merge(merged, nested)
    if overrides:
        for ov in overrides:
            if not is_override(ov):
                raise UserError(f"override {shown(ov)} is not of the form key=value")
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise UserError(_format_omegaconf_error(e)) from None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:  # e.g. key='
            raise UserError(f"an override that is not a valid config value ({type(e).__name__}): "
                            f"{shown([ov for ov in overrides])}") from None
        merged = _merge(merged, dotlist)
    try:
        validate(merged)
    except OmegaConfBaseException as e:  # e.g. a value that reads as another type
        raise UserError(_format_omegaconf_error(e)) from None
    except UserError as e:
        sources = [str(f) for f in files] + ([base_source] if base_source else [])
        if sources:
            typed = [str(k) for k in (values or {})] + [ov.split("=", 1)[0] for ov in overrides]
            raise UserError(_unquoted_unless_typed(str(e), typed, sources)) from None
        raise
    return merged  # type: ignore[return-value]


def _unquoted_unless_typed(message: str, typed: Sequence[str], sources: Sequence[str]) -> str:
    """A validation message about a value that came from a config file, without the value (a
    file's content is never quoted); values the user typed stay quoted."""
    m = re.search(r"config keys? '([^']+)'", message)
    key = m.group(1) if m else ""
    if key and any(key == t or key.startswith(t + ".") or t.startswith(key + ".") for t in typed):
        return message
    short = re.sub(r",? got .*$", "", message)
    short = re.sub(r": schedule .*$|, not .*$", "", short)
    return f"{short} (set in {', '.join(repr(s) for s in sources)})"


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express; one line naming the key on failure."""
    Config.validate(cfg)


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
