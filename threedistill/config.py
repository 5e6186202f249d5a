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

import importlib.resources
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from threedistill.cameras import CameraConfig
from threedistill.errors import UserError
from threedistill.groups import Scheduled, check_choice, check_positive, parse_schedule
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
    # renders resized to its own resolution (64 px). threedistill/presets/sd.yaml: 10000 steps at 64 px.
    steps: int = 800
    seed: int = 0
    resolution: int = 32
    # "auto": CUDA if available, else CPU.
    device: str = "auto"
    out_dir: str = "outputs"
    name: Optional[str] = None
    preview_every: int = 100
    checkpoint_every: int = 250
    # Also checkpoint when this many seconds have passed since the last checkpoint (0: off), so a
    # killed run loses at most about this much work; the web app sets 30. Such a checkpoint is
    # replaced by the next one unless its step is on the checkpoint_every cadence.
    checkpoint_every_s: float = 0.0
    # Progress bar on stderr (tqdm); off for quiet batch logs.
    progress: bool = True

    def validate(self, key: str = "run") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (also called
        unbound on a structured config node: ``RunConfig.validate(cfg.run, "run")``)."""
        for name in ("steps", "resolution", "preview_every", "checkpoint_every"):
            check_positive(getattr(self, name), f"{key}.{name}")
        check_positive(self.seed, f"{key}.seed", allow_zero=True)
        check_positive(self.checkpoint_every_s, f"{key}.checkpoint_every_s", allow_zero=True)
        if not math.isfinite(float(self.checkpoint_every_s)):
            raise UserError(f"config key '{key}.checkpoint_every_s' must be a finite number of seconds, "
                            f"got {self.checkpoint_every_s}")
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
    # GLB/OBJ: UV-unwrap (xatlas) and bake the albedo into a texture_size^2 base-color PNG;
    # false: vertex colors only. PLY always has vertex colors.
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
        RepresentationConfig.validate(self.representation, "representation")
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
        return f"unknown config key '{name}' (see `threedistill presets` or `threedistill generate --help`)"
    if key:
        return f"bad value for config key '{key}': {msg}"
    return f"bad config: {msg}"


def resolve_config_path(path_or_name: str) -> Path:
    """A YAML path, or a preset name (``sds-nerf`` -> ``threedistill/presets/sds-nerf.yaml``, see :func:`list_presets`)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / path_or_name, CONFIG_DIR / f"{path_or_name}.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"config file '{path_or_name}' not found (give a YAML path or a preset name: "
                    f"{', '.join(p for p, _ in list_presets())})")


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
