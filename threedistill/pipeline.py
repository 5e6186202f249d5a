"""Coarse-to-fine: a coarse run (NeRF or Gaussians) followed by a mesh refine stage.

A run whose config has ``refine.enabled`` continues, once finished, with a refine stage in its own
run folder ``<coarse run folder>/refine``: a mesh run (``refine.config``, default ``sds-mesh``,
then ``refine.overrides``) whose ``representation.mesh.init`` is ``run:<absolute coarse folder>``,
so it starts from the coarse surface. The coarse run's outputs stay; its ``run.json`` records the
refine folder (``"refine"``), the refine run's ``run.json`` the coarse one (``"coarse"``).

The refine stage's config is: defaults <- ``refine.config`` <- what the coarse run carries over
(:data:`CARRIED_KEYS`: the prompt, seed, prior, cameras, export settings, device, logging cadence)
<- ``refine.overrides``; then ``representation.mesh.init`` and ``refine.enabled=false`` are set.
The already-loaded prior object is shared when the prior config is the same.

The loaded prior is shared through a :class:`~threedistill.priors.PriorCache` when it is the same
(name, revision, dtype, cache dir, device).

Front ends turn what a user asked into a config and a run folder with :func:`prepare_run` (a
:class:`RunRequest`: a new run, a run to resume, or a refine stage of a finished run; every
pre-flight check is made there, once), then run it with :func:`run_prepared`. :func:`run_chain`
(a new run; :func:`then_refine` for a Distiller built already), :func:`resume_chain` (whichever
stage is unfinished) and :func:`start_refine` (a refine stage from an existing finished run) are
the same two steps in one call; all return the stages' :class:`~threedistill.distill.RunResult` s,
the last one the final asset.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from omegaconf import OmegaConf

from threedistill.cameras import max_resolution, orbit_cameras, preview_cameras
from threedistill.config import CONFIG_DIR, Config, ReadCheck, load_config
from threedistill.distill import Callback, Distiller, RunResult, check_prompt, check_writable_location
from threedistill.errors import UserError
from threedistill.inputs import prepare_inputs
from threedistill.groups import max_scheduled, shown
from threedistill.priors import BUILTIN_PRIORS, PriorCache, check_prior_available
from threedistill.representations import representation_class, representation_names
from threedistill.runs import RunFolder, slugify
from threedistill.shapes.world import COLOR_NAMES, SHAPES, parse_prompt

log = logging.getLogger(__name__)

#: The refine stage's folder inside the coarse run's folder.
REFINE_DIR = RunFolder.REFINE

#: Config keys the refine stage takes from the coarse run (on top of ``refine.config``).
CARRIED_KEYS = ("prior", "camera", "export", "run.prompt", "run.seed", "run.device", "run.progress",
                "run.preview_every", "run.checkpoint_every")


def refine_dir_of(coarse_dir: Path) -> Path:
    return RunFolder(coarse_dir).refine.path


def refine_config(coarse_cfg: Config, coarse_dir: Path, config: Optional[str] = None,
                  overrides: Optional[Sequence[str]] = None, read_check: Optional[ReadCheck] = None) -> Config:
    """The refine stage's config for a coarse run in ``coarse_dir`` (``config`` / ``overrides``
    default to the coarse config's ``refine.config`` / ``refine.overrides``); ``read_check`` (the
    path policy's) sees the refine config file before it is read."""
    config = str(coarse_cfg.refine.config) if config is None else config
    overrides = list(coarse_cfg.refine.overrides) if overrides is None else list(overrides)
    carried: dict = {}
    for key in CARRIED_KEYS:
        node = carried
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        value = OmegaConf.select(coarse_cfg, key)
        node[parts[-1]] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    init = f"run:{Path(coarse_dir).resolve()}"
    try:
        preset = load_config(config, read_check=read_check)
    except UserError as e:
        raise UserError(f"refine stage: {e}") from None
    if not representation_class(str(preset.representation.name)).refines_surfaces:
        raise UserError(f"refine stage: refine.config '{config}' is a {preset.representation.name} run; "
                        f"the refine stage needs representation.name={' or '.join(_refining())} "
                        "(e.g. refine.config=sds-mesh)")
    base = OmegaConf.merge(preset, carried)
    try:
        cfg = load_config(None, overrides, base=base)
    except UserError as e:
        raise UserError(f"refine stage: {e}") from None
    if not representation_class(str(cfg.representation.name)).refines_surfaces:
        raise UserError(f"refine stage: representation.name must be {' or '.join(_refining())}, "
                        f"got '{cfg.representation.name}' (from refine.overrides)")
    # Set directly, not as a key=value override, so any folder name is taken literally.
    cfg.representation[cfg.representation.name].init = init
    cfg.refine.enabled = False
    cfg.run.name = None
    return cfg


def _refining() -> List[str]:
    """The representations a refine stage can be (they start from a run's surface)."""
    return [n for n in representation_names() if representation_class(n).refines_surfaces]


def check_refine(cfg: Config, policy: Optional["PathPolicy"] = None) -> None:
    """Fail early (before the coarse stage) on a bad refine section of a chained config; with a
    path policy, the refine stage's config file and its whole config pass it too (its overrides may
    name a prior folder, an init file, ...)."""
    if cfg.refine.enabled:
        coarse = Path(cfg.run.out_dir) / "coarse-run"
        stage = refine_config(cfg, coarse, read_check=policy.read_check("refine.config") if policy else None)
        if policy is not None:
            policy.check_config(stage, RunFolder(coarse).refine, new_run=False)


# ----------------------------------------------------------------------------------------------
# Preparing a run: the one way from what a user asked to a config and a run folder
# ----------------------------------------------------------------------------------------------
class PathPolicy:
    """Which files a run may read and where its folder may be: one policy, applied by
    :func:`prepare_run` once per run to every config value that names a file or a folder (the
    config files and presets with what they extend, ``refine.config`` and the refine stage's
    whole config, ``representation.*.init=file:``/``run:``, ``prior.name`` as a folder,
    ``prior.cache_dir``, ``run.out_dir``, ``run.name``) and to the run folder itself (new,
    resumed, a refine stage's source, a batch row's). Symlinks are resolved before every check.

    This base class is the CLI's (and batch's) policy: a run may read whatever the user names, but
    ``run.name`` is a folder name (no separator, no ``..``, not absolute), so a new run's folder
    stays inside ``run.out_dir`` (``--out``), symlinks included. :class:`AppPathPolicy` is the
    web app's. ``extra``: a further check ``(config, run folder)`` (raise :class:`UserError`).
    """

    def __init__(self, extra: Optional[Callable[[Config, RunFolder], None]] = None):
        self.extra = extra

    # -- what a policy decides ------------------------------------------------------------------
    def check_read(self, path: Path, given: str, key: str) -> None:
        """May the run read ``path`` (resolved; ``given``: what the user wrote, for the message;
        ``key``: the config key or field that names it)? The CLI may read anything."""

    def check_prior(self, cfg: Config) -> None:
        """May the run load ``cfg.prior`` (its name when it is a folder, its cache folder)?"""
        name = str(cfg.prior.name)
        if name not in BUILTIN_PRIORS and _looks_like_path(name):
            self.check_read(_resolved(name), name, "prior.name")
        if cfg.prior.cache_dir is not None:
            self.check_read(_resolved(str(cfg.prior.cache_dir)), str(cfg.prior.cache_dir), "prior.cache_dir")

    def check_run_folder(self, folder: RunFolder, key: str, given: Optional[str] = None) -> None:
        """May the run read and write ``folder`` (a run to resume, a refine stage's source, a
        batch row's folder; ``given``: what the user wrote)? The CLI may use any."""

    def check_out_dir(self, cfg: Config) -> None:
        """May new runs be written into ``run.out_dir``? The CLI may write anywhere the user says."""

    # -- the whole config ---------------------------------------------------------------------------
    def read_check(self, key: str) -> Callable[[Path, str], None]:
        """:data:`threedistill.config.ReadCheck` for the config files named by ``key``."""
        return lambda path, given: self.check_read(path, given, key)

    def check_config(self, cfg: Config, folder: RunFolder, new_run: bool = True) -> None:
        """Every path-naming value of ``cfg`` and the run's ``folder`` (``new_run``: a folder to be
        named from ``run.name``; a resumed run or a refine stage has its folder already)."""
        name = cfg.run.name
        if new_run:  # a resumed run or a refine stage has its folder (checked) already
            if name is not None:
                self.check_run_name(str(name), Path(str(cfg.run.out_dir)))
            self.check_out_dir(cfg)
        for group in ("nerf", "gaussians", "mesh"):
            node = cfg.representation[group]
            init = str(node.init) if "init" in node and node.init is not None else ""
            key = f"representation.{group}.init"
            if init.startswith("file:"):
                self.check_read(_resolved(init[len("file:"):]), init, key)
            elif init.startswith("run:"):
                self.check_run_folder(RunFolder(_resolved(init[len("run:"):])), key, init)
        self.check_prior(cfg)
        if self.extra is not None:
            self.extra(cfg, folder)

    def check_run_name(self, name: str, out_dir: Path) -> None:
        """``run.name`` is one folder name inside ``out_dir`` (``run.name=../x`` would write outside
        ``--out``), also once symlinks in ``out_dir`` are followed."""
        if (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
                or Path(name).is_absolute() or Path(name).name != name):
            raise UserError(f"run.name {shown(name)} must be a folder name inside the output folder (no '/', "
                            f"'\\' or '..'), e.g. '{slugify(name)}'")
        target = (out_dir / name).resolve()
        if target.parent != out_dir.resolve():
            raise UserError(f"run.name {shown(name)} is a link that leads outside the output folder; pick another")


def _looks_like_path(name: str) -> bool:
    """A prior name that names a folder here (a hub id is ``org/name`` and no folder of that name)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or Path(name).expanduser().exists() or name.count("/") != 1


def _resolved(path: str) -> Path:
    if "\x00" in path:
        raise UserError("a path holds a NUL character")
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unknown ~user
        return Path(path).absolute()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class AppPathPolicy(PathPolicy):
    """The web app's policy: a run reads only inside ``outputs``, the shipped presets
    (``configs/``) and the priors in ``priors`` (names: built-ins, cached hub ids); it writes only
    new folders of ``outputs`` whose ``run.name`` is a plain slug not used yet. A refused path gets
    the same message whether it exists or not, and the message quotes only what the user wrote."""

    def __init__(self, outputs: Union[str, Path], priors: Sequence[str] = tuple(BUILTIN_PRIORS),
                 extra: Optional[Callable[[Config, RunFolder], None]] = None):
        super().__init__(extra)
        self.outputs = Path(outputs).expanduser().resolve()
        self.priors = list(priors)
        self.presets = CONFIG_DIR.resolve()

    def _refuse(self, given: str, key: str) -> UserError:
        return UserError(f"{key} {shown(given)} is not allowed: the web app reads only its outputs folder, "
                         f"its presets and the listed priors")

    def check_read(self, path: Path, given: str, key: str) -> None:
        if not (_inside(path, self.outputs) or _inside(path, self.presets)):
            raise self._refuse(given, key)

    def check_prior(self, cfg: Config) -> None:
        name = str(cfg.prior.name)
        if name not in self.priors:
            raise UserError(f"prior {shown(name)} is not allowed: choose one of {', '.join(self.priors)}")
        if cfg.prior.cache_dir is not None:
            raise self._refuse(str(cfg.prior.cache_dir), "prior.cache_dir")

    def check_run_folder(self, folder: RunFolder, key: str, given: Optional[str] = None) -> None:
        if not _inside(_resolved(str(folder.path)), self.outputs):
            raise self._refuse(given if given is not None else str(folder.path), key)

    def check_out_dir(self, cfg: Config) -> None:
        if _resolved(str(cfg.run.out_dir)) != self.outputs:
            raise UserError("run.out_dir is set by the app (its --outputs folder); remove it")

    def check_run_name(self, name: str, out_dir: Path) -> None:
        if slugify(name) != name:
            raise UserError(f"run.name {shown(name)} must be a plain name of a-z, 0-9 and '-' (e.g. '{slugify(name)}')")
        super().check_run_name(name, out_dir)
        if (self.outputs / name).exists() or (self.outputs / name).is_symlink():
            raise UserError(f"run.name '{name}' is already used in the outputs folder; pick another")


@dataclass
class RunRequest:
    """What a user asked for, in a front end's terms. One of three kinds:

    * a new run (the default): ``prompt``, ``configs`` (presets or YAML files, merged in order),
      ``values`` (typed values by dotted key, e.g. a form's fields: ``{"run.seed": 3}``) and
      ``seed`` / ``steps`` / ``resolution``, then ``overrides`` (``key=value`` text) last;
      ``defaults`` (a nested mapping) and ``out_dir`` sit below the configs. The folder is
      ``run_dir`` when given (batch rows), else a new one in ``run.out_dir`` named by
      ``run_name`` (or ``run.name``), else by :meth:`RunFolder.new`'s policy;
    * ``resume``: continue that run folder (its saved config with ``overrides``); a finished run
      whose config chains a refine stage continues with that stage;
    * ``refine_of``: a refine stage of that finished run (``configs``: at most one, the stage's
      preset, default the run's ``refine.config``; ``overrides`` after the run's ``refine.overrides``).

    ``path_policy``: which files the run may read (:class:`PathPolicy`; None: the CLI's). A plain
    callable ``(config, folder)`` is taken as an extra check on top of the CLI's policy. It sees
    every config file before it is read, and the config and the folder before anything else is
    checked against the file system.
    """

    prompt: Optional[str] = None
    configs: Sequence[Union[str, Path]] = ()
    overrides: Sequence[str] = ()
    values: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None
    steps: Optional[int] = None
    resolution: Optional[int] = None
    out_dir: Optional[Union[str, Path]] = None
    run_name: Optional[str] = None
    run_dir: Optional[Union[str, Path]] = None
    resume: Optional[Union[str, Path]] = None
    refine_of: Optional[Union[str, Path]] = None
    path_policy: Optional[Union[PathPolicy, Callable[[Config, RunFolder], None]]] = None
    #: Where :func:`prepare_run`'s warnings go (one line each; the run still starts): the app
    #: shows them beside the job, the CLI prints them; default: this module's logger.
    on_warning: Optional[Callable[[str], None]] = None


#: The built-in prior that knows only the shapes world's prompts.
SHAPES_PRIOR = "shapes"


def prompt_warnings(cfg: Config) -> List[str]:
    """What is doubtful about a run's prompt before it starts (warnings, not errors): with the
    built-in ``shapes`` prior, a prompt that is not one of the shapes world's 36 prompts
    (:func:`threedistill.shapes.world.parse_prompt`), which the prior cannot follow."""
    prompt = str(cfg.run.prompt)
    if str(cfg.prior.name) != SHAPES_PRIOR or parse_prompt(prompt) is not None:
        return []
    n = len(COLOR_NAMES) * len(SHAPES)
    return [f"the built-in prior 'shapes' knows only the {n} prompts \"a <color> <shape>\" "
            f"(colors: {', '.join(COLOR_NAMES)}; shapes: {', '.join(SHAPES)}), so '{prompt}' will give "
            f"a shape that does not follow it; for other prompts use a real diffusion model: -c sd "
            f"(Stable Diffusion 2.1-base, a GPU advised) or prior.name=<hub id or pipeline folder>"]


class PreflightError(UserError):
    """A :func:`prepare_run` check failed; ``check`` says which: config, prompt, paths, run_folder,
    refine or prior (a front end may tie it to one of its fields)."""

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check
        self.message = message


def _check(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except PreflightError:
        raise
    except UserError as e:
        raise PreflightError(name, str(e)) from None


def _check_finished(coarse: RunFolder) -> None:
    if not coarse.is_run():
        raise UserError(f"'{coarse.path}' is not a threedistill run folder (no {RunFolder.CONFIG})")
    status = coarse.status()
    if status != "finished":
        raise UserError(f"'{coarse.path}' is not a finished run (status: {status or 'unknown'}); finish it first "
                        f"with `threedistill generate --resume {coarse.path}`")


def _prepare_refine(coarse: RunFolder, config: Optional[str], overrides: Sequence[str],
                    continue_existing: bool, policy: PathPolicy) -> Tuple[Config, RunFolder]:
    """A refine stage of the finished run ``coarse``: a new one, or (``continue_existing``) the
    one its folder holds already."""
    policy.check_run_folder(coarse, "run folder")  # before the file system is asked about it
    if not coarse.path.is_dir():
        raise UserError(f"run folder '{coarse.path}' does not exist")
    _check_finished(coarse)
    coarse_cfg = coarse.read_config()
    where = RunFolder(coarse.path.resolve())
    folder = where.refine
    if continue_existing and folder.is_run():
        cfg = folder.read_config(overrides)
        # Point the init at where the coarse run is now (the folders may have moved together).
        cfg.representation[cfg.representation.name].init = f"run:{where.path}"
        return cfg, folder
    cfg = refine_config(coarse_cfg, where.path, config, [*coarse_cfg.refine.overrides, *overrides],
                        read_check=policy.read_check("refine.config"))
    if folder.is_run():
        raise UserError(f"'{folder.path}' already holds a refine stage; continue it with "
                        f"`threedistill generate --resume {folder.path}` or remove it to start again")
    return cfg, folder


def _policy(request: RunRequest) -> PathPolicy:
    """The request's path policy (a plain callable: an extra check over the CLI's)."""
    if isinstance(request.path_policy, PathPolicy):
        return request.path_policy
    return PathPolicy(extra=request.path_policy)


def prepare_config(request: RunRequest) -> Config:
    """The validated config of a new-run ``request`` with the checks that need no run folder (the
    config, the prompt, that the prior's weights can be found): for front ends that sample the
    prior without a run (``threedistill preview``). Raises :class:`PreflightError` naming the check."""
    cfg = _new_config(request)
    _check("paths", lambda: _policy(request).check_prior(cfg))  # a preview reads its config files and the prior
    _check("prior", lambda: check_prior_available(cfg.prior))
    return cfg


def _new_config(request: RunRequest) -> Config:
    policy = _policy(request)
    base = OmegaConf.merge(OmegaConf.create(dict(request.defaults)),
                           {"run": {"prompt": request.prompt or "",
                                    **({"out_dir": str(request.out_dir)} if request.out_dir is not None else {})}})
    values = dict(request.values)
    for key, value in (("run.seed", request.seed), ("run.steps", request.steps),
                       ("run.resolution", request.resolution), ("run.name", request.run_name)):
        if value is not None:
            values[key] = value
    cfg = _check("config", lambda: load_config(list(request.configs), list(request.overrides), base=base,
                                               values=values, read_check=policy.read_check("config")))
    cfg.run.prompt = _check("prompt", lambda: check_prompt(cfg.run.prompt))
    return cfg


def _prepare_new(request: RunRequest) -> Tuple[Config, RunFolder]:
    policy = _policy(request)
    cfg = _new_config(request)
    if request.run_dir is not None:
        folder = RunFolder(request.run_dir)
        _check("paths", lambda: policy.check_run_folder(folder, "run folder"))
    elif cfg.run.name:
        # The policy sees an explicit name before the file system does (the collision check).
        _check_paths(request, cfg, RunFolder(Path(cfg.run.out_dir) / str(cfg.run.name)))
        return cfg, _check("run_folder", lambda: RunFolder.new(cfg.run.out_dir, cfg.run.prompt, cfg.run.name))
    else:
        folder = RunFolder.new(cfg.run.out_dir, cfg.run.prompt)
    _check_paths(request, cfg, folder)
    return cfg, folder


def _check_paths(request: RunRequest, cfg: Config, folder: RunFolder) -> None:
    """The path policy on the config's paths and the run folder (:class:`PathPolicy`)."""
    policy = _policy(request)
    new_run = request.resume is None and request.refine_of is None
    _check("paths", lambda: policy.check_config(cfg, folder, new_run))


def prepare_run(request: RunRequest) -> Tuple[Config, RunFolder]:
    """The validated config and the run folder of ``request``, with every pre-flight check made
    (the same for the CLI, the web app and batch): the path policy (every file the config is read
    from, every path the config names, the run folder; :class:`PathPolicy`), the config
    (validation), the prompt, the run folder (an explicit ``run.name`` that already holds a run is
    refused), the refine section of a chained config, and that the prior's weights can be found
    (none loaded); then each of :func:`prompt_warnings` goes to ``request.on_warning`` (before any
    step: a warning, the run may still start). Creates nothing. Raises :class:`PreflightError` (a :class:`UserError`) naming
    the check."""
    policy = _policy(request)
    if request.refine_of is not None:
        if len(request.configs) > 1:
            raise PreflightError("config", "a refine stage takes one preset or config file")
        config = str(request.configs[0]) if request.configs else None
        cfg, folder = _check("refine", lambda: _prepare_refine(RunFolder(request.refine_of), config,
                                                               request.overrides, False, policy))
    elif request.resume is not None:
        folder = RunFolder(request.resume)
        _check("paths", lambda: policy.check_run_folder(folder, "run folder"))  # before is_dir: no probing
        if not folder.path.is_dir():
            raise PreflightError("run_folder", f"run folder '{folder.path}' does not exist")
        saved = _check("config", folder.read_config)
        if folder.is_finished() and saved.refine.enabled:  # what continues is its refine stage
            cfg, folder = _check("refine", lambda: _prepare_refine(folder, None, request.overrides, True, policy))
        else:
            cfg = _check("config", lambda: folder.read_config(request.overrides))
        _check("run_folder", folder.check_not_running)  # a live process drives it: one writer only
    if request.refine_of is not None or request.resume is not None:
        _check_paths(request, cfg, folder)
    else:
        cfg, folder = _prepare_new(request)  # checks the paths itself, before the folder is named
    _check("refine", lambda: check_refine(cfg, policy))
    _check("prior", lambda: check_prior_available(cfg.prior))
    for warning in prompt_warnings(cfg):
        (request.on_warning or log.warning)(warning)
    return cfg, folder


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def coarse_of(folder: RunFolder) -> Optional[RunFolder]:
    """The coarse run whose refine stage ``folder`` is (None for a run of its own)."""
    parent = RunFolder(folder.path.parent)
    return parent if folder.is_refine_stage() and parent.is_run() else None


def _run_refine(coarse: RunFolder, cfg: Config, folder: RunFolder, callbacks: Sequence[Callback],
                priors: Optional[PriorCache]) -> RunResult:
    d = Distiller(cfg, run_dir=folder, callbacks=callbacks, priors=priors, resume=folder.is_run())
    try:
        return _run(d)
    finally:
        if folder.has_status():  # the stage started (finished, stopped or interrupted)
            coarse.link_refine_stage(folder)


def then_refine(d: Distiller, callbacks: Sequence[Callback] = ()) -> List[RunResult]:
    """Run ``d``, then its refine stage when its config enables one and it finished."""
    result = _run(d)
    results = [result]
    if result.status == "finished" and d.cfg.refine.enabled:
        # A finished run that chains a refine stage: resuming it means its refine stage.
        # Its prompt was warned about (if at all) when the coarse run was prepared.
        cfg, folder = prepare_run(RunRequest(resume=d.run_dir, on_warning=log.debug))
        results.append(_run_refine(RunFolder(d.run_dir.resolve()), cfg, folder, callbacks, d.priors))
    return results


def _run(d: Distiller) -> RunResult:
    """``d.run()`` after resolving its inputs into its run folder (:func:`threedistill.inputs.prepare_inputs`);
    a new run that fails before it starts (no config.yaml yet) leaves no folder behind."""
    if not d.resuming and d.folder.is_run():
        return d.run()  # refuses: the folder holds another run, which must stay untouched
    check_writable_location(d.run_dir)
    fresh = not d.run_dir.exists()
    try:
        prepare_inputs(d)
        return d.run()
    except BaseException:
        if fresh and not d.folder.is_run():
            shutil.rmtree(d.run_dir, ignore_errors=True)
        raise


def run_prepared(cfg: Config, folder: RunFolder, callbacks: Sequence[Callback] = (),
                 priors: Optional[PriorCache] = None) -> List[RunResult]:
    """Run what :func:`prepare_run` returned: a new run or one to continue (then its refine stage
    when its config chains one), or a refine stage."""
    priors = priors if priors is not None else PriorCache()
    coarse = coarse_of(folder)
    if coarse is not None:
        return [_run_refine(coarse, cfg, folder, callbacks, priors)]
    return then_refine(Distiller(cfg, run_dir=folder, callbacks=callbacks, priors=priors, resume=folder.is_run()),
                       callbacks)


def run_chain(cfg: Config, run_dir: Optional[Path] = None, callbacks: Sequence[Callback] = (),
              priors: Optional[PriorCache] = None) -> List[RunResult]:
    """A new run from a config made by :func:`prepare_run`, then its refine stage when
    ``cfg.refine.enabled``."""
    return then_refine(Distiller(cfg, run_dir=run_dir, callbacks=callbacks, priors=priors), callbacks)


def resume_chain(run_dir: Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
                 priors: Optional[PriorCache] = None) -> List[RunResult]:
    """Resume whichever stage of ``run_dir`` is unfinished: the run itself (then its refine stage
    when enabled), else its refine stage (``overrides`` apply to the stage resumed). A run without
    ``refine.enabled`` resumes as itself (a refine stage started by :func:`start_refine` is resumed
    as its own folder, ``<run_dir>/refine``)."""
    cfg, folder = prepare_run(RunRequest(resume=run_dir, overrides=overrides))
    return run_prepared(cfg, folder, callbacks, priors)


def is_complete(run_dir: Path) -> bool:
    """A finished run whose refine stage (when enabled) is finished too."""
    folder = RunFolder(run_dir)
    if not folder.is_finished():
        return False
    try:
        enabled = folder.read_config().refine.enabled
    except UserError:
        return True
    return not enabled or folder.refine.is_finished()


def start_refine(coarse_dir: Path, config: Optional[str] = None, overrides: Sequence[str] = (),
                 callbacks: Sequence[Callback] = (), priors: Optional[PriorCache] = None) -> RunResult:
    """A refine stage from an existing finished run: ``config`` (default the run's
    ``refine.config``), the run's ``refine.overrides`` then ``overrides``."""
    cfg, folder = prepare_run(RunRequest(refine_of=coarse_dir, configs=[config] if config else [],
                                         overrides=overrides))
    return run_prepared(cfg, folder, callbacks, priors)[-1]


__all__ = ["REFINE_DIR", "CARRIED_KEYS", "RunRequest", "prompt_warnings", "SHAPES_PRIOR", "PreflightError", "PathPolicy",
           "AppPathPolicy", "prepare_run", "prepare_config", "run_prepared",
           "refine_config", "check_refine", "run_chain", "then_refine", "resume_chain", "start_refine",
           "is_complete", "refine_dir_of", "coarse_of"]


# ----------------------------------------------------------------------------------------------
# Planning: what a run will cost, from two steps at its largest settings
# ----------------------------------------------------------------------------------------------
def largest_settings(cfg: Config) -> Tuple[int, int]:
    """``(resolution, camera batch size)`` at their largest over the run: a plain number, a linear
    ``[start, end, from_step, to_step]`` or milestones ``[[step, value], ...]``
    (:func:`~threedistill.groups.max_scheduled`)."""
    return (max_resolution(cfg.run.resolution),
            int(math.ceil(max_scheduled(cfg.camera.batch_size, "camera.batch_size"))))


@dataclass
class RunPlan:
    """:func:`plan_run`'s measurement. ``peak_memory``: bytes, or None where it cannot be measured;
    ``memory_kind`` says which memory it is."""

    device: str
    resolution: int
    batch_size: int
    steps: int
    seconds_per_step: float
    peak_memory: Optional[int]
    memory_kind: str
    previews_s: float
    #: The export's estimated seconds: the representation's own turntable frames (0 without one).
    export_s: float
    #: The export's parts not estimated (they need the mesh): "mesh extraction", "the mesh's turntable".
    not_estimated: List[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        """Training, previews and the estimated part of the export."""
        return self.steps * self.seconds_per_step + self.previews_s + self.export_s

    def lines(self) -> List[str]:
        def gib(b: Optional[int]) -> str:
            return "n/a" if b is None else f"{b / 2**30:.2f} GiB"

        def dur(s: float) -> str:
            s = int(round(s))
            return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

        return [f"plan on {self.device}, at the largest settings: {self.resolution} px, camera batch {self.batch_size}",
                f"  peak memory:   {gib(self.peak_memory)} ({self.memory_kind})",
                f"  time per step: {self.seconds_per_step:.3f} s (measured after a warm-up step)",
                f"  training:      {dur(self.steps * self.seconds_per_step)} for {self.steps} steps, previews "
                f"{dur(self.previews_s)}",
                f"  export:        about {dur(self.export_s)}"
                + (f", not counting {' and '.join(self.not_estimated)} (not estimated)" if self.not_estimated else ""),
                f"  total:         about {dur(self.total_s)}" + (" plus those" if self.not_estimated else "")]


def _process_peak_rss() -> Optional[int]:
    """The process's peak resident set size in bytes (Linux/macOS), or None."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError, ValueError):
        return None


def plan_run(cfg: Config, priors: Optional[PriorCache] = None, steps: int = 2) -> RunPlan:
    """Run ``steps`` steps (the first a warm-up, not timed) at the run's largest resolution and camera
    batch size (:func:`largest_settings`) in a temporary folder, removed after; nothing else is
    written. Returns the measured peak memory (CUDA: the allocator's peak; CPU: the peak resident
    size of this whole process) and time per step (each step's stats read, so the device's time is
    in it), with the whole run's time extrapolated from them (steps, previews, turntable)."""
    steps = max(int(steps), 2)
    cfg = copy.deepcopy(cfg)
    resolution, batch_size = largest_settings(cfg)
    cfg.run.resolution, cfg.camera.batch_size = resolution, batch_size
    cfg.run.progress = False
    tmp = Path(tempfile.mkdtemp(prefix="threedistill-plan-"))
    try:
        d = Distiller(cfg, run_dir=tmp / "plan", priors=priors)
        prepare_inputs(d)
        cuda = d.device.type == "cuda"

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(d.device)

        if cuda:
            torch.cuda.reset_peak_memory_stats(d.device)
        d.build()
        times = []
        for step in range(steps):
            t0 = time.perf_counter()
            d.train_step(step)  # reads its stats: the step's device work is done when it returns
            sync()
            times.append(time.perf_counter() - t0)
        per_step = sum(times[1:]) / len(times[1:])
        c, e = cfg.camera, cfg.export

        def render_s(cams) -> float:
            """Seconds per evaluation render of ``cams`` (the second of two: the first builds caches)."""
            cams = cams.to(d.device)
            with torch.no_grad():
                for _ in range(2):
                    t0 = time.perf_counter()
                    d.representation.render(cams, step=steps, training=False)
                    sync()
            return time.perf_counter() - t0

        size = max(resolution, int(cfg.run.preview_resolution))
        every = int(cfg.run.preview_every)
        n_previews = int(cfg.run.steps) // every + (int(cfg.run.steps) % every != 0)  # and the last step's
        previews_s = n_previews * render_s(preview_cameras(size, c.eval_distance, c.eval_fovy, c.eval_elevation))
        # The turntable's frames, when it shows the representation itself (export.turntable_of); a
        # mesh turntable (and the mesh extraction) would need the mesh: not estimated.
        of = str(e.turntable_of)
        if of == "auto":
            of = "representation" if d.representation.extra_outputs() else "mesh"
        export_s = 0.0
        if e.turntable and of == "representation":
            frame = orbit_cameras(1, int(e.turntable_resolution), float(e.turntable_elevation), c.eval_distance,
                                  c.eval_fovy)
            export_s = int(e.turntable_frames) * render_s(frame)
        unestimated = [what for what, on in (("mesh extraction", bool(e.formats)),
                                             ("the mesh's turntable", bool(e.turntable) and of != "representation"))
                       if on]
        if cuda:
            peak, kind = int(torch.cuda.max_memory_allocated(d.device)), "CUDA memory allocated by torch"
        else:
            peak, kind = _process_peak_rss(), "peak resident memory of this process"
        return RunPlan(device=str(d.device), resolution=resolution, batch_size=batch_size, steps=int(cfg.run.steps),
                       seconds_per_step=per_step, peak_memory=peak, memory_kind=kind, previews_s=previews_s,
                       export_s=export_s, not_estimated=unestimated)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
