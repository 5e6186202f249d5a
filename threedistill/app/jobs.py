"""Server-side jobs for the web app: validation, a FIFO queue and one worker thread per device.

Independent of Gradio: the UI (and the tests) call :class:`JobManager` directly. Jobs belong to
the manager, not to a browser page, so a reloaded page finds them again. Runs go through the same
:class:`~threedistill.distill.Distiller` as the CLI; nothing here re-implements a step.

Every file the app serves goes through :meth:`JobManager.safe_path`, which only returns paths
inside the outputs folder.

The queue survives the server: it is saved in the outputs folder
(:class:`~threedistill.runs.OutputsFolder`) on every change and read back when a manager starts
there: queued jobs are queued again, and the job that was running resumes from its newest
checkpoint. The app's runs checkpoint every :data:`CHECKPOINT_EVERY_S` seconds, so a killed
server loses at most that much work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import re
import threading
import time
import uuid
import zipfile
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence

from threedistill.config import CONFIG_DIR
from threedistill.devices import OOM_HINT, out_of_memory, resolve_device
from threedistill.distill import Distiller
from threedistill.errors import UserError
from threedistill.groups import shown
from threedistill.pipeline import (AppPathPolicy, PreflightError, RunRequest, is_complete, prepare_run, run_prepared,
                                   then_refine)
from threedistill.plots import write_curves
from threedistill.preview import DEFAULT_SAMPLES, DEFAULT_STEPS, Preview, sample_preview
from threedistill.priors import BUILTIN_PRIORS, PriorCache
from threedistill.priors.diffusers_prior import _hf_cache_dir as hf_cache_dir
from threedistill.runs import OutputsFolder, RunFolder

log = logging.getLogger(__name__)

#: Job states. ``cancelled``: removed from the queue before it started.
QUEUED, RUNNING, FINISHED, STOPPED, FAILED, CANCELLED = "queued", "running", "finished", "stopped", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
#: run.json statuses the Resume button continues (``interrupted``: the process running it died).
RESUMABLE = ("stopped", "interrupted")

#: ``run.checkpoint_every_s`` of the app's runs: a killed server loses at most this many seconds of
#: steps (plus the step in progress). A checkpoint of the shapes prior's NeRF takes a few
#: milliseconds to write, and the time-based one replaces the previous one, so 30 s costs nothing
#: measurable and keeps the loss well under a minute even with a slow step.
CHECKPOINT_EVERY_S = 30.0

#: The fields of the submit form; a validation error names one of them.
FIELDS = ("prompt", "negative_prompt", "preset", "prior", "seed", "steps", "guidance_scale", "resolution", "overrides")

#: Folder under the outputs root for generated zips (not a run folder: it has no run.json).
DOWNLOADS_DIR = ".downloads"


def list_presets() -> List[str]:
    """Loss x representation presets (``<loss>-<representation>``, package data in threedistill/presets)."""
    return sorted(p.stem for p in Path(CONFIG_DIR).glob("*-*.yaml"))


# ----------------------------------------------------------------------------------------------
# Settings and validation
# ----------------------------------------------------------------------------------------------
@dataclass
class JobSettings:
    prompt: str = ""
    negative_prompt: str = ""
    preset: str = "sds-nerf"
    prior: str = "shapes"
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    resolution: Optional[int] = None
    # YAML mapping (``run: {preview_every: 50}``) or ``key=value`` lines, applied last.
    overrides: str = ""

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "JobSettings":
        unknown = set(d) - set(FIELDS)
        if unknown:
            raise ValidationError("overrides", f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class ValidationError(UserError):
    """A bad input, tied to the form field it came from."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _number(name: str, v: Any, kind: type, positive: bool) -> Optional[Any]:
    if _blank(v):
        return None
    try:
        if isinstance(v, bool):
            raise TypeError
        if kind is int and isinstance(v, int):
            out = v  # exactly (a float would round a huge number); the config's bounds refuse it
        else:
            f = float(v)
            if kind is int and f != int(f):
                raise ValueError
            out = int(f) if kind is int else f
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValidationError(name, f"{name.replace('_', ' ')} must be {'a whole number' if kind is int else 'a number'}, "
                                    f"got {shown(v)}") from None
    if not math.isfinite(out):
        raise ValidationError(name, f"{name.replace('_', ' ')} must be a finite number, got {shown(v)}")
    if positive and out <= 0:
        raise ValidationError(name, f"{name.replace('_', ' ')} must be > 0, got {shown(v)}")
    if not positive and out < 0:
        raise ValidationError(name, f"{name.replace('_', ' ')} must be >= 0, got {shown(v)}")
    return out


def parse_overrides(text: str) -> List[str]:
    """The advanced panel's text as ``key=value`` overrides: either ``key=value`` lines or a YAML
    mapping (nested groups are flattened to dotted keys). Blank lines and ``#`` comments are skipped."""
    import yaml

    lines = [l.strip() for l in (text or "").splitlines() if l.strip() and not l.strip().startswith("#")]
    if not lines:
        return []
    if all("=" in l and ":" not in l.split("=", 1)[0] for l in lines):
        return lines
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise ValidationError("overrides", f"advanced settings: not valid YAML or key=value lines ({first})") from None
    if not isinstance(data, dict):
        raise ValidationError("overrides", "advanced settings: give a YAML mapping (e.g. `run: {preview_every: 50}`) "
                                           "or key=value lines (e.g. `run.preview_every=50`)")
    out: List[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out.append(f"{prefix}={json.dumps(node, default=str)}")  # default: YAML dates

    walk("", data)
    return out


def _field_for_message(message: str) -> str:
    """Which form field a config error message is about (the rest go to the advanced panel): the
    field of the config key the message names, else the first form word it mentions."""
    fields = (("run.steps", "steps"), ("run.seed", "seed"), ("run.resolution", "resolution"),
              ("guidance.guidance_scale", "guidance_scale"), ("prior.negative_prompt", "negative_prompt"),
              ("run.prompt", "prompt"), ("prior.name", "prior"))
    named = re.search(r"config keys? '([^']+)'", message)
    if named is not None:
        key = named.group(1)
        return next((name for k, name in fields if key == k), "overrides")
    m = message.lower()
    for key, name in (*fields, ("negative_prompt", "negative_prompt"), ("prompt", "prompt"), ("prior", "prior")):
        if key in m:
            return name
    return "overrides"


def list_prior_choices(cache_dir: Optional[str] = None) -> List[str]:
    """``shapes`` plus the diffusers pipelines (repos with a model_index.json) in the local HF cache:
    the priors the app offers, and the only ones its path policy lets a job load."""
    names = list(BUILTIN_PRIORS)
    try:
        cache = hf_cache_dir(cache_dir)  # the folder load_prior looks in
        for repo in sorted(cache.glob("models--*")):
            if any(repo.glob("snapshots/*/model_index.json")):
                names.append(repo.name[len("models--"):].replace("--", "/"))
    except Exception:  # a missing or unreadable cache just means no extra choices
        pass
    return names


#: Which form field a failed pre-flight check (:class:`~threedistill.pipeline.PreflightError`) is about.
_CHECK_FIELDS = {"prompt": "prompt", "prior": "prior", "refine": "overrides", "paths": "overrides",
                 "run_folder": "overrides"}


def build_config(s: JobSettings, outputs: Path, priors: Optional[Sequence[str]] = None):
    """The validated run config for ``s`` (raises :class:`ValidationError` naming the field), by
    :func:`~threedistill.pipeline.prepare_run` under the app's path policy
    (:class:`~threedistill.pipeline.AppPathPolicy`): a job reads only inside ``outputs``, the
    shipped presets and the ``priors`` offered (default :func:`list_prior_choices`); ``run.out_dir``
    is always the outputs folder and ``run.name`` a plain slug, so no user text ever places a run
    outside it.
    """
    for name in ("prompt", "negative_prompt", "preset", "prior", "overrides"):  # raw API calls may send anything
        value = getattr(s, name)
        if value is not None and not isinstance(value, str):
            raise ValidationError(name, f"{name.replace('_', ' ')} must be text, got {type(value).__name__}")
        if value is not None and (len(value) > 100_000 or "\x00" in value):
            raise ValidationError(name, f"{name.replace('_', ' ')} is too long or holds a NUL character")
    if "\n" in (s.negative_prompt or "") or "\r" in (s.negative_prompt or ""):
        raise ValidationError("negative_prompt", "the negative prompt must be a single line")
    presets = list_presets()
    if s.preset not in presets:
        raise ValidationError("preset", f"unknown preset '{s.preset}'; choose one of {', '.join(presets)}")
    seed = _number("seed", s.seed, int, positive=False)
    steps = _number("steps", s.steps, int, positive=True)
    scale = _number("guidance_scale", s.guidance_scale, float, positive=True)
    resolution = _number("resolution", s.resolution, int, positive=True)
    prior = (s.prior or "").strip() or "shapes"

    overrides = parse_overrides(s.overrides)
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if key == "run.out_dir":
            raise ValidationError("overrides", "run.out_dir is set by the app (its --outputs folder); remove it")
        if key == "run.prompt":
            raise ValidationError("overrides", "set the prompt in the prompt field, not run.prompt")
    form: Dict[str, Any] = {"prior.name": prior, "prior.negative_prompt": s.negative_prompt or ""}
    if scale is not None:
        form["guidance.guidance_scale"] = scale
    # The outputs folder comes after the preset (the Advanced box may not set it: checked above).
    form["run.out_dir"] = str(outputs)
    # The page offers every mesh download (GLB, OBJ zip, PLY), so all three are written unless the
    # preset or the Advanced box says otherwise.
    request = RunRequest(prompt=s.prompt, configs=[s.preset], values=form, seed=seed, steps=steps,
                         resolution=resolution, overrides=overrides,
                         defaults={"run": {"progress": False, "checkpoint_every_s": CHECKPOINT_EVERY_S},
                                   "export": {"formats": ["glb", "obj", "ply"]}},
                         path_policy=AppPathPolicy(outputs, list_prior_choices() if priors is None else priors))
    try:
        cfg, _ = prepare_run(request)  # the folder is named when the job starts
    except PreflightError as e:
        field_name = _CHECK_FIELDS.get(e.check) or _field_for_message(e.message)
        if e.check == "paths" and e.message.startswith("prior"):  # the prior field's own refusal
            field_name = "prior"
        message = e.message.replace('threedistill generate "a red cube"', '"a red cube"')
        raise ValidationError(field_name, message) from None
    return cfg


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    settings: Dict[str, Any]
    device: str
    status: str = QUEUED
    position: int = 0  # 1-based place among the jobs waiting for this device; 0 when not queued
    step: int = 0
    steps: int = 0
    loss: Optional[float] = None
    eta_s: Optional[float] = None
    phase: str = "queued"  # queued, loading prior, distilling, exporting, done
    preview: Optional[str] = None
    outputs: Dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None
    run_dir: Optional[str] = None
    run_name: Optional[str] = None
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    ended: Optional[float] = None
    step_time_total: float = 0.0
    step_count: int = 0
    # A job that continues a run folder of the outputs folder (the Resume button, or the running job
    # of a server that stopped): that folder's name; None for a new run.
    resume_of: Optional[str] = None
    # The step the run started from (its checkpoint's when resumed); None until it starts.
    start_step: Optional[int] = None
    # Stopped after its last step, before all its outputs were written: resuming it writes them.
    export_pending: bool = False
    cfg: Any = field(default=None, repr=False)
    folder: Any = field(default=None, repr=False)  # the RunFolder a resume job continues
    distiller: Any = field(default=None, repr=False)
    cancel_requested: bool = False

    def public(self) -> Dict[str, Any]:
        hidden = ("cfg", "folder", "distiller", "step_time_total", "step_count", "cancel_requested")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        d["settings"], d["outputs"] = dict(self.settings), dict(self.outputs)
        return d


class _JobCallback:
    """Feeds a Distiller's progress into its :class:`Job` (duck-typed Callback)."""

    def __init__(self, manager: "JobManager", job: Job):
        self.manager, self.job = manager, job

    def on_start(self, distiller) -> None:
        with self.manager._lock:
            j = self.job
            if j.distiller is not None and j.distiller is not distiller:
                # A chained run's refine stage (threedistill.pipeline): follow it (progress, cancel,
                # and the results panel, which shows job.run_dir: <run>/refine).
                j.run_dir = str(distiller.run_dir)
                j.steps = int(distiller.cfg.run.steps)
                j.step_time_total, j.step_count = 0.0, 0
            j.distiller = distiller
            j.phase = "refining" if distiller.folder.is_refine_stage() else "distilling"
            j.step = distiller.step
            if j.start_step is None:
                j.start_step = distiller.step
            if distiller.step >= j.steps:
                j.phase = "exporting"  # resumed with no step left: its outputs are written now
            if j.preview is None and distiller.folder.latest_preview() is not None:
                j.preview = str(distiller.folder.latest_preview())
            if j.cancel_requested or self.manager._closed:
                distiller.request_stop()

    def on_step(self, distiller, step: int, stats: Dict[str, float]) -> None:
        with self.manager._lock:
            j = self.job
            j.step = step
            j.loss = float(stats.get("loss", float("nan")))
            j.step_time_total += float(stats.get("time_step", 0.0))
            j.step_count += 1
            j.eta_s = (j.step_time_total / j.step_count) * max(j.steps - step, 0)
            if step >= j.steps:
                j.phase = "exporting"

    def on_preview(self, distiller, step: int, path: Path) -> None:
        with self.manager._lock:
            self.job.preview = str(path)

    def on_checkpoint(self, distiller, step: int, path: Path) -> None: ...

    def on_end(self, distiller, result) -> None: ...


def _count(value: Any) -> int:
    """A step count from a run.json as a plain int a JSON page can show (0 for anything else: one
    damaged run.json must not break the history for everyone)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else 0


def _text(value: Any) -> str:
    return value[:4096] if isinstance(value, str) else ""


class JobManager:
    """Validates submissions and runs them one at a time per device, in submission order."""

    def __init__(self, outputs: str | Path = "outputs", restore: bool = True, priors: Optional[Sequence[str]] = None):
        """``restore``: queue again the jobs a previous manager left in this outputs folder's saved
        queue (the running one resumes from its checkpoint). ``priors``: the prior names the page
        offers (default: the built-in ones and the pipelines found locally)."""
        self.outputs = Path(outputs).expanduser().resolve()
        #: The priors a job may use (the page's choices): the path policy refuses any other.
        self.priors = list(priors) if priors is not None else list_prior_choices()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self._store = OutputsFolder(self.outputs)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: Dict[str, Job] = {}
        self._queues: Dict[str, Deque[str]] = {}
        self._workers: Dict[str, threading.Thread] = {}
        self._priors = PriorCache()  # every job's prior stays loaded (one server, few priors)
        self._closed = False
        if restore:
            self._restore()

    # -- submitting ---------------------------------------------------------------------------
    def validate(self, settings: JobSettings | Dict[str, Any]):
        s = settings if isinstance(settings, JobSettings) else JobSettings.from_dict(settings)
        return s, build_config(s, self.outputs, self.priors)

    def submit(self, settings: JobSettings | Dict[str, Any]) -> str:
        """Queue a job; returns its id. Raises :class:`ValidationError` (nothing queued) on bad input."""
        return self._enqueue(self._new_job(settings))

    def _new_job(self, settings: JobSettings | Dict[str, Any], job_id: Optional[str] = None,
                 created: Optional[float] = None) -> Job:
        s, cfg = self.validate(settings)
        try:
            device = str(resolve_device(cfg.run.device))
        except UserError as e:
            raise ValidationError("overrides", str(e)) from None
        return Job(id=job_id or uuid.uuid4().hex[:12], settings=asdict(s), device=device, steps=int(cfg.run.steps),
                   cfg=cfg, created=created or time.time())

    def _enqueue(self, job: Job) -> str:
        with self._lock:
            if self._closed:
                raise UserError("the job manager is shut down")
            self._jobs[job.id] = job
            self._queues.setdefault(job.device, deque()).append(job.id)
            self._renumber(job.device)
            self._save_queue()
            if job.device not in self._workers:
                t = threading.Thread(target=self._worker, args=(job.device,), name=f"threedistill-jobs-{job.device}",
                                     daemon=True)
                self._workers[job.device] = t
                t.start()
            self._wake.notify_all()
        return job.id

    def resume(self, ref: str) -> str:
        """Queue a job that continues a stopped or interrupted run of the outputs folder (by run
        name, or by the id of a job of this server) from its newest checkpoint: its remaining steps,
        then its outputs (and its refine stage when its config chains one). Returns the job's id."""
        with self._lock:
            job = self._jobs.get(str(ref))
            name = job.run_name if job is not None else str(ref)
        if not name:
            raise UserError(f"job '{ref}' has not started yet; there is nothing to resume")
        d = self.run_dir(name)
        if d.parent != self.outputs:
            raise UserError(f"'{name}' is not a run of the outputs folder")
        with self._lock:
            if any(d.name in (j.run_name, j.resume_of) and j.status in ACTIVE for j in self._jobs.values()):
                raise UserError(f"run '{d.name}' is already queued or running on this server")
        folder = RunFolder(d)
        stage = folder.refine if folder.is_finished() and not is_complete(d) else folder
        status = stage.status()
        if is_complete(d):
            raise UserError(f"run '{d.name}' is finished; there is nothing to resume")
        if stage is folder.refine and status is None:
            status = "stopped"  # the coarse run finished; its refine stage has not started yet
        if status not in RESUMABLE:
            raise UserError(f"run '{d.name}' is {status or 'unknown'}: only a stopped or interrupted run can be resumed")
        return self._enqueue(self._resume_job(d.name))

    def _resume_job(self, name: str, job_id: Optional[str] = None, settings: Optional[Dict[str, Any]] = None,
                    created: Optional[float] = None) -> Job:
        """A job continuing the run folder ``name`` (its config and the folder checked now, again
        when it starts)."""
        cfg, folder = self._prepare_resume(name)
        if settings is None:
            settings = asdict(JobSettings(prompt=str(cfg.run.prompt), preset="(resume)", prior=str(cfg.prior.name),
                                          negative_prompt=str(cfg.prior.negative_prompt or "")))
        try:
            device = str(resolve_device(cfg.run.device))
        except UserError as e:
            raise ValidationError("overrides", str(e)) from None
        return Job(id=job_id or uuid.uuid4().hex[:12], settings=settings, device=device, steps=int(cfg.run.steps),
                   cfg=cfg, folder=folder, resume_of=name, created=created or time.time())

    def _prepare_resume(self, name: str):
        """The resumed run's config and folder under the app's path policy (the folder and every
        path its config names must lie inside the outputs folder, its prior be one the page offers)."""
        return prepare_run(RunRequest(resume=self.outputs / name, path_policy=AppPathPolicy(self.outputs, self.priors)))

    # -- the saved queue ------------------------------------------------------------------------
    def _save_queue(self) -> None:
        """Write the active jobs to the outputs folder (under the lock; not once shut down, so the
        queue a stopping server leaves is the one it had)."""
        if self._closed:
            return
        entries = []
        active = [j for j in self._jobs.values() if j.status in ACTIVE]
        for j in sorted(active, key=lambda j: (j.status != RUNNING, j.position, j.created)):
            entries.append({"id": j.id, "status": j.status, "settings": j.settings, "created": j.created,
                            "run_name": j.run_name, "resume_of": j.resume_of})
        try:
            self._store.write_queue(entries)
        except OSError as e:  # a full or read-only disk must not stop the jobs themselves
            log.warning("could not save the job queue to %s (%s)", self._store.queue_path, e)

    def _restore(self) -> None:
        """Queue again what the saved queue holds, in its order: a job whose run folder holds a run
        resumes it (from its newest checkpoint); the others start as submitted. A job that no longer
        validates is listed as failed, with the reason."""
        for e in self._store.read_queue():
            jid = str(e.get("id") or uuid.uuid4().hex[:12])
            settings = e.get("settings") if isinstance(e.get("settings"), dict) else {}
            created = e.get("created") if isinstance(e.get("created"), (int, float)) else None
            name = e.get("run_name") or e.get("resume_of")
            try:
                if name and "/" not in str(name) and str(name) not in (".", "..") \
                        and RunFolder(self.outputs / str(name)).is_run():
                    job = self._resume_job(str(name), jid, settings or None, created)
                else:
                    job = self._new_job(settings, jid, created)
                self._enqueue(job)
                log.info("restored job %s (%s)", jid, f"resuming {name}" if job.resume_of else "queued")
            except UserError as err:
                prompt = str(settings.get("prompt", "")) if settings else ""
                failed = Job(id=jid, settings=asdict(JobSettings(prompt=prompt)), device="", status=FAILED,
                             phase="done", error=f"could not restore this job after a restart: {err}",
                             run_name=str(name) if name else None, created=created or time.time(), ended=time.time())
                with self._lock:
                    self._jobs[jid] = failed
        with self._lock:
            self._save_queue()

    def cancel(self, job_id: str) -> str:
        """Remove a queued job, or stop a running one after its current step (its files are kept).
        Returns the job's status afterwards."""
        with self._lock:
            job = self._get(job_id)
            if job.status == QUEUED:
                q = self._queues.get(job.device, deque())
                if job.id in q:
                    q.remove(job.id)
                job.status, job.phase, job.position, job.ended = CANCELLED, "done", 0, time.time()
                self._renumber(job.device)
                self._save_queue()
            elif job.status == RUNNING:
                job.cancel_requested = True
                if job.distiller is not None:
                    job.distiller.request_stop()
            return job.status

    # -- reading --------------------------------------------------------------------------------
    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(str(job_id))
        if job is None:
            raise UserError(f"no job '{job_id}'")
        return job

    def status(self, job_id: str) -> Dict[str, Any]:
        with self._lock:
            return self._get(job_id).public()

    def jobs(self) -> List[Dict[str, Any]]:
        """All jobs of this server, newest first."""
        with self._lock:
            return [j.public() for j in sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)]

    def active_job(self) -> Optional[Dict[str, Any]]:
        """The running job (else the first queued one, else the newest job): what a fresh page shows."""
        with self._lock:
            for want in (RUNNING, QUEUED):
                cands = [j for j in self._jobs.values() if j.status == want]
                if cands:
                    return min(cands, key=lambda j: j.created).public()
            if self._jobs:
                return max(self._jobs.values(), key=lambda j: j.created).public()
        return None

    def wait(self, job_id: str, timeout: float = 600.0) -> Dict[str, Any]:
        """Block until the job is no longer queued or running (for tests and scripts)."""
        end = time.time() + timeout
        with self._lock:
            while self._get(job_id).status in ACTIVE:
                left = end - time.time()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {self._get(job_id).status} after {timeout} s")
                self._wake.wait(min(left, 0.5))
            return self._get(job_id).public()

    def history(self) -> List[Dict[str, Any]]:
        """Run folders in the outputs folder (those with a status), newest first."""
        runs = []
        for d in self.outputs.iterdir():
            folder = RunFolder(d)
            if not d.is_dir() or d.name.startswith(".") or not self.is_inside(d) or not folder.has_status():
                continue  # a link to a folder elsewhere is not a run of this app
            info = folder.read_status()
            preview = folder.latest_preview()
            preview = preview if preview is not None and self.is_inside(preview) else None
            runs.append({"name": d.name, "run_dir": str(d), "status": _text(info.get("status", "unknown")),
                         "prompt": _text(info.get("prompt", "")), "step": _count(info.get("step", 0)),
                         "steps": _count(info.get("steps", 0)), "updated": _text(info.get("updated", "")), "preview": str(preview) if preview else None,
                         "export_pending": bool(info.get("export_pending", False)),
                         "mtime": folder.status_path.stat().st_mtime})
        runs.sort(key=lambda r: r["mtime"], reverse=True)
        return runs

    # -- the 2D prompt check and the curves ----------------------------------------------------------
    def preview(self, settings: JobSettings | Dict[str, Any], samples: int = DEFAULT_SAMPLES,
                steps: int = DEFAULT_STEPS) -> Preview:
        """The prior's samples for the form's settings (:func:`~threedistill.preview.sample_preview`):
        validated like a submission (:class:`ValidationError` naming the field), the prior shared
        with the jobs. Runs now, in the caller's thread; queues nothing."""
        _, cfg = self.validate(settings)
        return sample_preview(cfg, samples=samples, steps=steps, priors=self._priors)

    def curves(self, name_or_job_id: str, min_age_s: float = 0.0) -> Optional[str]:
        """The run's ``curves.png`` (by job id or run name), drawn again when its metrics are newer,
        but not more often than every ``min_age_s`` seconds (a running job's page polls); None while
        the run has no metrics yet."""
        folder = RunFolder(self.run_dir(name_or_job_id))
        png = self.safe_path(folder.curves_path)
        metrics = folder.metrics_path
        if not metrics.is_file():
            return None
        if png.is_file():
            made = png.stat().st_mtime
            if made >= metrics.stat().st_mtime or time.time() - made < min_age_s:
                return str(png)
        try:
            return str(write_curves(folder, png))
        except UserError:
            return None  # the run has not logged a step yet

    # -- files ------------------------------------------------------------------------------------
    def is_inside(self, path: str | Path) -> bool:
        """Whether ``path`` (symlinks resolved) lies inside the outputs folder."""
        try:
            self.safe_path(path)
            return True
        except UserError:
            return False

    def safe_path(self, path: str | Path) -> Path:
        """``path`` (absolute, or relative to the outputs folder) resolved, if it lies inside the
        outputs folder; else :class:`UserError`. Symlinks are resolved before the check."""
        if path is None or str(path).strip() == "" or "\x00" in str(path):
            raise UserError("empty or invalid path")
        p = Path(path)
        p = (p if p.is_absolute() else self.outputs / p).resolve()
        if p != self.outputs and self.outputs not in p.parents:
            raise UserError(f"'{path}' is outside the outputs folder")
        return p

    def run_dir(self, name_or_job_id: str) -> Path:
        """A run folder by job id or by folder name (a single path component inside outputs)."""
        with self._lock:
            job = self._jobs.get(str(name_or_job_id))
            if job is not None:
                if job.run_dir is None:
                    raise UserError(f"job '{name_or_job_id}' has not started yet")
                return self.safe_path(job.run_dir)
        name = str(name_or_job_id)
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UserError(f"'{name}' is not a run name")
        d = self.safe_path(name)
        if not RunFolder(d).has_status():
            raise UserError(f"no run '{name}' in the outputs folder")
        return d

    def run_outputs(self, name_or_job_id: str) -> Dict[str, Optional[str]]:
        """The files of a run for the results panel: glb, obj (a zip of obj + mtl + textures when there
        are several), ply, splat, turntable, config, preview, zip (the whole folder). Missing ones are None."""
        d = self.run_dir(name_or_job_id)
        folder = RunFolder(d)

        def f(path: Path) -> Optional[str]:
            if not self.is_inside(path):  # a link out of the outputs folder is not served
                return None
            p = self.safe_path(path)
            return str(p) if p.is_file() else None

        out: Dict[str, Optional[str]] = {"run_dir": str(d), "glb": f(folder.mesh_path("glb")),
                                         "ply": f(folder.mesh_path("ply")), "splat": f(folder.splat_path),
                                         "turntable": f(folder.turntable_path), "config": f(folder.config_path),
                                         "obj": None, "preview": None}
        obj = f(folder.mesh_path("obj"))
        if obj:
            extra = [p for p in folder.mesh_companions() if self.is_inside(p)]
            out["obj"] = str(self._zip(d, [folder.mesh_path("obj"), *extra], f"{d.name}-obj.zip")) if extra else obj
        preview = folder.latest_preview()
        if preview is not None and self.is_inside(preview):
            out["preview"] = str(self.safe_path(preview))
        out["zip"] = str(self.zip_run(d))
        return out

    def zip_run(self, run_dir: Path) -> Path:
        """A zip of the whole run folder (rebuilt when run.json is newer)."""
        d = self.safe_path(run_dir)
        files = [p for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink() and self.is_inside(p)]
        return self._zip(d, files, f"{d.name}.zip")

    def _zip(self, root: Path, files: Sequence[Path], name: str) -> Path:
        dest_dir = self.outputs / DOWNLOADS_DIR
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / name
        newest = max((p.stat().st_mtime for p in files), default=0.0)
        if dest.is_file() and dest.stat().st_mtime >= newest:
            return dest
        fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".zip.tmp")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for p in files:
                    p = self.safe_path(p)
                    z.write(p, f"{root.name}/{p.relative_to(root)}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    # -- the worker ---------------------------------------------------------------------------------
    def _renumber(self, device: str) -> None:
        for i, jid in enumerate(self._queues.get(device, ())):
            self._jobs[jid].position = i + 1

    def _worker(self, device: str) -> None:
        while True:
            with self._lock:
                q = self._queues[device]
                while not q and not self._closed:
                    self._wake.wait(1.0)
                if self._closed:
                    return
                job = self._jobs[q.popleft()]
                self._renumber(device)
                job.status, job.position, job.phase, job.started = RUNNING, 0, "loading prior", time.time()
                self._save_queue()
            self._run(job)
            with self._lock:
                job.ended = time.time()
                job.phase = "done"
                job.cfg = job.folder = None
                job.distiller = None
                self._save_queue()
                self._wake.notify_all()

    def _run(self, job: Job) -> None:
        try:  # job.cfg passed build_config at submit, the refine section included
            self._priors.get(job.cfg.prior, resolve_device(job.cfg.run.device))  # loaded before the run starts
            cb = _JobCallback(self, job)
            if job.resume_of is not None:
                # Checked again now: the folder may have changed since the job was queued.
                cfg, folder = self._prepare_resume(job.resume_of)
                with self._lock:
                    job.run_dir, job.run_name, job.steps = str(folder.path), job.resume_of, int(cfg.run.steps)
                    self._save_queue()
                results = run_prepared(cfg, folder, [cb], priors=self._priors)
            else:
                # Named now, when the run starts (the naming policy avoids the folders that exist now).
                folder = RunFolder.new(self.outputs, job.cfg.run.prompt, job.cfg.run.name)
                d = Distiller(job.cfg, run_dir=folder, callbacks=[cb], priors=self._priors)
                with self._lock:
                    job.distiller = d
                    job.run_dir, job.run_name = str(folder.path), folder.name
                    self._save_queue()  # a restart resumes this folder from its checkpoint
                    if job.cancel_requested:
                        d.request_stop()
                results = then_refine(d, [cb])  # a chained preset's refine stage runs here too
            result = results[-1]
            with self._lock:
                job.status = FINISHED if result.status == "finished" else STOPPED
                job.outputs = dict(result.outputs)
                job.step = result.step
                job.eta_s = 0.0 if job.status == FINISHED else None
                job.export_pending = bool(RunFolder(result.run_dir).read_status().get("export_pending", False))
        except UserError as e:
            with self._lock:
                job.status, job.error = FAILED, str(e)
        except Exception as e:  # an unexpected error must not kill the worker thread
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if out_of_memory(e) is not None:
                msg = f"out of memory; {OOM_HINT}"
            with self._lock:
                job.status, job.error = FAILED, f"{type(e).__name__}: {msg}"

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the running jobs (after their current step, with a checkpoint) and the workers. The
        saved queue keeps them: a manager started on this outputs folder again continues them."""
        with self._lock:
            self._save_queue()
            self._closed = True
            for job in self._jobs.values():
                if job.status == RUNNING and job.distiller is not None:
                    job.distiller.request_stop()
            self._wake.notify_all()
            workers = list(self._workers.values())
        for t in workers:
            t.join(timeout)
