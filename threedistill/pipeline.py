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

Front ends call :func:`run_chain` (a new run; :func:`then_refine` for a Distiller built already),
:func:`resume_chain` (whichever stage is
unfinished) and :func:`start_refine` (a refine stage from an existing finished run); all return
the stages' :class:`~threedistill.distill.RunResult` s, the last one the final asset.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf

from threedistill.atomic import atomic_write_text
from threedistill.config import Config, load_config
from threedistill.distill import (Callback, Distiller, RunResult, check_writable_location, read_run_config,
                                  read_run_status)
from threedistill.errors import UserError
from threedistill.inputs import prepare_inputs
from threedistill.representations import representation_class

#: The refine stage's folder inside the coarse run's folder.
REFINE_DIR = "refine"

#: Config keys the refine stage takes from the coarse run (on top of ``refine.config``).
CARRIED_KEYS = ("prior", "camera", "export", "run.prompt", "run.seed", "run.device", "run.progress",
                "run.preview_every", "run.checkpoint_every")


def refine_dir_of(coarse_dir: Path) -> Path:
    return Path(coarse_dir) / REFINE_DIR


def refine_config(coarse_cfg: Config, coarse_dir: Path, config: Optional[str] = None,
                  overrides: Optional[Sequence[str]] = None) -> Config:
    """The refine stage's config for a coarse run in ``coarse_dir`` (``config`` / ``overrides``
    default to the coarse config's ``refine.config`` / ``refine.overrides``)."""
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
        preset = load_config(config)
    except UserError as e:
        raise UserError(f"refine stage: {e}") from None
    if not representation_class(str(preset.representation.name)).refines_surfaces:
        raise UserError(f"refine stage: refine.config '{config}' is a {preset.representation.name} run; "
                        "the refine stage needs representation.name=mesh (e.g. refine.config=sds-mesh)")
    base = OmegaConf.merge(preset, carried)
    try:
        cfg = load_config(None, overrides, base=base)
    except UserError as e:
        raise UserError(f"refine stage: {e}") from None
    if not representation_class(str(cfg.representation.name)).refines_surfaces:
        raise UserError(f"refine stage: representation.name must be mesh, got '{cfg.representation.name}' "
                        "(from refine.overrides)")
    # Set directly, not as a key=value override, so any folder name is taken literally.
    cfg.representation[cfg.representation.name].init = init
    cfg.refine.enabled = False
    cfg.run.name = None
    return cfg


def check_refine(cfg: Config) -> None:
    """Fail early (before the coarse stage) on a bad refine section of a chained config."""
    if cfg.refine.enabled:
        refine_config(cfg, Path(cfg.run.out_dir) / "coarse-run")


def _record(run_dir: Path, **entries: str) -> None:
    import json

    info = read_run_status(run_dir)
    info.update(entries)
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info, indent=1))


def _check_finished(coarse_dir: Path) -> None:
    if not (coarse_dir / "config.yaml").is_file():
        raise UserError(f"'{coarse_dir}' is not a threedistill run folder (no config.yaml)")
    status = read_run_status(coarse_dir).get("status")
    if status != "finished":
        raise UserError(f"'{coarse_dir}' is not a finished run (status: {status or 'unknown'}); finish it first "
                        f"with `threedistill generate --resume {coarse_dir}`")


def _refine_stage(coarse_dir: Path, coarse_cfg: Config, callbacks: Sequence[Callback], prior,
                  config: Optional[str] = None, overrides: Optional[Sequence[str]] = None,
                  resume_overrides: Sequence[str] = ()) -> RunResult:
    """Start the refine stage of the finished run ``coarse_dir``, or resume it when it exists."""
    coarse_dir = Path(coarse_dir).resolve()
    _check_finished(coarse_dir)
    rdir = refine_dir_of(coarse_dir)
    if (rdir / "config.yaml").is_file():
        cfg = read_run_config(rdir, resume_overrides)
        # Point the init at where the coarse run is now (the folders may have moved together).
        cfg.representation[cfg.representation.name].init = f"run:{coarse_dir}"
        resume = True
    else:
        base_ov = coarse_cfg.refine.overrides if overrides is None else overrides
        cfg = refine_config(coarse_cfg, coarse_dir, config, [*base_ov, *resume_overrides])
        resume = False
    if prior is not None and OmegaConf.to_container(cfg.prior) != OmegaConf.to_container(coarse_cfg.prior):
        prior = None  # the refine stage asked for another prior
    d = Distiller(cfg, run_dir=rdir, callbacks=callbacks, prior=prior, resume=resume)
    try:
        return _run(d)
    finally:
        if (rdir / "run.json").is_file():  # the stage started (finished, stopped or interrupted)
            _record(coarse_dir, refine=str(rdir))
            _record(rdir, coarse=str(coarse_dir))


def then_refine(d: Distiller, callbacks: Sequence[Callback] = ()) -> List[RunResult]:
    """Run ``d``, then its refine stage when its config enables one and it finished."""
    result = _run(d)
    results = [result]
    if result.status == "finished" and d.cfg.refine.enabled:
        results.append(_refine_stage(d.run_dir, d.cfg, callbacks, getattr(d, "prior", None)))
    return results


def _run(d: Distiller) -> RunResult:
    """``d.run()`` after resolving its inputs into its run folder (:func:`threedistill.inputs.prepare_inputs`);
    a new run that fails before it starts (no config.yaml yet) leaves no folder behind."""
    if not d.resuming and (d.run_dir / "config.yaml").exists():
        return d.run()  # refuses: the folder holds another run, which must stay untouched
    check_writable_location(d.run_dir)
    fresh = not d.run_dir.exists()
    try:
        prepare_inputs(d)
        return d.run()
    except BaseException:
        if fresh and not (d.run_dir / "config.yaml").exists():
            shutil.rmtree(d.run_dir, ignore_errors=True)
        raise


def run_chain(cfg: Config, run_dir: Optional[Path] = None, callbacks: Sequence[Callback] = (),
              prior=None) -> List[RunResult]:
    """A new run, then its refine stage when ``cfg.refine.enabled``."""
    check_refine(cfg)
    return then_refine(Distiller(cfg, run_dir=run_dir, callbacks=callbacks, prior=prior), callbacks)


def resume_chain(run_dir: Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
                 prior=None) -> List[RunResult]:
    """Resume whichever stage of ``run_dir`` is unfinished: the run itself (then its refine stage
    when enabled), else its refine stage (``overrides`` apply to the stage resumed). A run without
    ``refine.enabled`` resumes as itself (a refine stage started by :func:`start_refine` is resumed
    as its own folder, ``<run_dir>/refine``)."""
    run_dir = Path(run_dir)
    coarse_cfg = read_run_config(run_dir)
    finished = read_run_status(run_dir).get("status") == "finished"
    if finished and coarse_cfg.refine.enabled:
        return [_refine_stage(run_dir, coarse_cfg, callbacks, prior, resume_overrides=overrides)]
    d = Distiller.resume(run_dir, overrides=overrides, callbacks=callbacks, prior=prior)
    check_refine(d.cfg)
    return then_refine(d, callbacks)


def is_complete(run_dir: Path) -> bool:
    """A finished run whose refine stage (when enabled) is finished too."""
    run_dir = Path(run_dir)
    if read_run_status(run_dir).get("status") != "finished":
        return False
    try:
        enabled = read_run_config(run_dir).refine.enabled
    except UserError:
        return True
    return not enabled or read_run_status(refine_dir_of(run_dir)).get("status") == "finished"


def start_refine(coarse_dir: Path, config: Optional[str] = None, overrides: Sequence[str] = (),
                 callbacks: Sequence[Callback] = (), prior=None) -> RunResult:
    """A refine stage from an existing finished run: ``config`` (default the run's
    ``refine.config``), the run's ``refine.overrides`` then ``overrides``."""
    coarse_dir = Path(coarse_dir)
    if not coarse_dir.is_dir():
        raise UserError(f"run folder '{coarse_dir}' does not exist")
    _check_finished(coarse_dir)
    coarse_cfg = read_run_config(coarse_dir)
    overrides = [*coarse_cfg.refine.overrides, *overrides]
    refine_config(coarse_cfg, coarse_dir, config, overrides)  # a bad refine config fails first
    rdir = refine_dir_of(coarse_dir)
    if (rdir / "config.yaml").is_file():
        raise UserError(f"'{rdir}' already holds a refine stage; continue it with "
                        f"`threedistill generate --resume {rdir}` or remove it to start again")
    return _refine_stage(coarse_dir, coarse_cfg, callbacks, prior, config=config, overrides=overrides)


__all__ = ["REFINE_DIR", "CARRIED_KEYS", "refine_config", "check_refine", "run_chain", "then_refine", "resume_chain",
           "start_refine", "is_complete", "refine_dir_of"]
