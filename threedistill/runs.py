"""Run folders: :class:`RunFolder` is the one owner of a run folder's layout and of its ``run.json``.

Layout (``<run.out_dir>/<run.name>``)::

    config.yaml          the resolved config
    run.json             status (running / exporting / finished / stopped / interrupted), prompt,
                         step, timings, outputs, export_pending (stopped after its last step, before
                         its outputs were all written: resuming it writes them); links to a refine stage ("refine") / its coarse run ("coarse")
    metrics.jsonl        one JSON object per step
    previews/            step_XXXXXX.png (front | side | back | overhead)
    checkpoints/         step_XXXXXX.safetensors + .json (see :mod:`threedistill.checkpoint`)
    model.glb            (and .obj / .ply as configured; OBJ with model.mtl and model.png)
    splat.ply            (Gaussians: the 3DGS splat file)
    turntable.mp4
    export_check.json    ``threedistill export --check`` (and export_check.png with --check-images)
    eval.json            ``threedistill eval`` (shapes-world prompts)
    curves.png           ``threedistill plot`` and the web app's curves (:mod:`threedistill.plots`)
    inputs/              inputs from elsewhere (another run's surface, a shapes-world mesh) as mesh arrays
    refine/              a refine stage: a run folder of its own

No other module spells a file name of this layout: they ask a :class:`RunFolder` for the path.
The files a server keeps beside the run folders in its outputs root (the web app's saved job
queue) belong to :class:`OutputsFolder`.
Run folders written by older versions load as they are (the layout has only grown).

**Who runs a run.** While a run is ``running`` or ``exporting``, run.json also names its runner
(``runner``: pid, host name, boot id, pid namespace, the process's start time, a token of the run)
and a ``heartbeat`` (seconds since the epoch) that a thread of the runner renews every
:data:`HEARTBEAT_EVERY_S` seconds (:meth:`RunFolder.attend`). :meth:`RunFolder.read_status` (and so
:meth:`~RunFolder.status`, which every front end shows) answers ``interrupted`` when the status
says running or exporting but that runner is gone: on the runner's own machine (same host name,
boot id and pid namespace) when its process no longer exists or its pid now belongs to a process
started at another time (a recycled pid), or, in the runner's own process, when the run has ended
without writing its status; seen from another machine (a shared file system, a Ray worker), when
the heartbeat is older than :data:`HEARTBEAT_STALE_S`. A run.json without a runner (written by an
older version, or by hand) counts as interrupted once its file is older than that bound. Nothing
writes ``interrupted`` on a reader's behalf: the answer is computed when read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from threedistill.atomic import atomic_write_text, remove_leftover_temp_files
from threedistill.checkpoint import latest_checkpoint, load_latest_checkpoint
from threedistill.config import Config, load_run_config_file, to_yaml
from threedistill.devices import resolve_device
from threedistill.errors import UserError
from threedistill.meshio import read_mesh
from threedistill.representations import RepresentationContext, build_representation
from threedistill.shapes.evaluate import evaluate_mesh_file, evaluate_representation, floater_fraction

log = logging.getLogger(__name__)


#: run.json statuses of a run that some process is driving now.
LIVE_STATUSES = ("running", "exporting")
#: How often a runner renews its heartbeat in run.json (a thread, so a long step or export does
#: not delay it).
HEARTBEAT_EVERY_S = 30.0
#: A heartbeat older than this means its runner is gone, where its process cannot be looked up
#: (another machine, no /proc). Ten missed beats: only a frozen process, a suspended machine or a
#: stalled file system misses that many; clocks of machines sharing a folder (NTP) agree far better.
HEARTBEAT_STALE_S = 300.0


# ----------------------------------------------------------------------------------------------
# The process that runs a run
# ----------------------------------------------------------------------------------------------
def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks after boot, Linux ``/proc``); None when there is
    no such process, no ``/proc``, or the process has exited and only waits to be reaped (a zombie:
    an orphaned worker whose parent was killed stays one where nothing reaps it)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses; starttime is field 22
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):  # zombie / dead: runs nothing any more
            return None
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _this_process() -> Dict[str, Any]:
    """This process, as a runner record names it (the token is added per run)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "started": _process_start(pid)}


#: Tokens of the runs this process is driving now (:meth:`RunFolder.attend`).
_ATTENDED: set = set()
#: One lock per run.json path for the writers of this process (the loop and its heartbeat thread).
_LOCKS: Dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _status_lock(path: Path) -> threading.Lock:
    key = os.path.abspath(path)
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def runner_alive(info: Dict[str, Any], mtime: Optional[float] = None, now: Optional[float] = None) -> Optional[bool]:
    """Whether the runner recorded in a run.json dict ``info`` still runs it: True or False, or
    None when ``info`` has no live status. ``mtime``: run.json's modification time (judges a
    run.json without a runner record); ``now``: the time to judge the heartbeat at."""
    if info.get("status") not in LIVE_STATUSES:
        return None
    now = time.time() if now is None else now
    runner = info.get("runner")
    if not isinstance(runner, dict):  # an older version's run.json, or one written by hand
        return mtime is None or now - mtime <= HEARTBEAT_STALE_S
    try:
        beat = float(info.get("heartbeat", 0.0))
    except (TypeError, ValueError):
        beat = 0.0
    fresh = now - beat <= HEARTBEAT_STALE_S
    me = _this_process()
    same_machine = (runner.get("host") == me["host"] and runner.get("boot_id") == me["boot_id"]
                    and runner.get("pid_ns") == me["pid_ns"])
    if not same_machine:
        return fresh
    try:
        pid = int(runner.get("pid"))
    except (TypeError, ValueError):
        return False
    if me["started"] is not None and runner.get("started") is not None:  # Linux: exact
        if _process_start(pid) != runner.get("started"):
            return False  # gone, or its pid was recycled
        if pid == me["pid"]:
            return runner.get("token") in _ATTENDED
        return True
    try:  # elsewhere: the pid exists, and (a pid may be recycled) the heartbeat is fresh
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return fresh
    if pid == me["pid"]:
        return runner.get("token") in _ATTENDED
    return fresh


def slugify(text: str, max_len: int = 48) -> str:
    """Lower-case letters, digits and '-' (a run folder's name; "run" when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].strip("-") or "run"


class RunFolder:
    """One run folder (it need not exist yet): every path in it, its status and its config."""

    CONFIG = "config.yaml"
    STATUS = "run.json"
    METRICS = "metrics.jsonl"
    PREVIEWS = "previews"
    CHECKPOINTS = "checkpoints"
    MESH_STEM = "model"
    SPLAT = "splat.ply"
    TURNTABLE = "turntable.mp4"
    EXPORT_CHECK = "export_check.json"
    EXPORT_CHECK_IMAGES = "export_check.png"
    EVAL = "eval.json"
    CURVES = "curves.png"
    REFINE = "refine"
    INPUTS = "inputs"

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._token: Optional[str] = None  # set while this object attends a run (see attend)

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- creating ---------------------------------------------------------------------------------
    @classmethod
    def new(cls, out_dir: Union[str, Path], prompt: str, name: Optional[str] = None,
            now: Optional[datetime] = None) -> "RunFolder":
        """The folder of a new run in ``out_dir`` (not created yet: the run creates it once built).

        An explicit ``name`` is taken as it is and refused when that folder already holds a run;
        else the name is ``<prompt slug>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``, ... appended
        while a folder of that name exists."""
        out = Path(out_dir)
        if name:
            folder = cls(out / str(name))
            if folder.is_run():
                raise UserError(f"run folder '{folder.path}' already holds a run; resume it with --resume or pick "
                                "another run.name")
            return folder
        base = f"{slugify(prompt)}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"
        path, i = out / base, 2
        while path.exists():
            path, i = out / f"{base}-{i}", i + 1
        return cls(path)

    @classmethod
    def find(cls, out_dir: Union[str, Path]) -> List["RunFolder"]:
        """The run folders (those with a run.json) directly in ``out_dir``, most recently updated
        first; hidden folders are skipped."""
        out = Path(out_dir)
        if not out.is_dir():
            return []
        found = [cls(d) for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
        found = [f for f in found if f.has_status()]

        def updated(f: "RunFolder") -> float:
            try:
                return f.status_path.stat().st_mtime
            except OSError:
                return 0.0

        return sorted(found, key=updated, reverse=True)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def status_path(self) -> Path:
        return self.path / self.STATUS

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def previews_dir(self) -> Path:
        return self.path / self.PREVIEWS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def splat_path(self) -> Path:
        return self.path / self.SPLAT

    @property
    def turntable_path(self) -> Path:
        return self.path / self.TURNTABLE

    @property
    def export_check_path(self) -> Path:
        return self.path / self.EXPORT_CHECK

    @property
    def export_check_images_path(self) -> Path:
        return self.path / self.EXPORT_CHECK_IMAGES

    @property
    def eval_path(self) -> Path:
        return self.path / self.EVAL

    @property
    def curves_path(self) -> Path:
        """The run's curves figure (:func:`threedistill.plots.write_curves`)."""
        return self.path / self.CURVES

    @property
    def inputs_dir(self) -> Path:
        """Inputs from elsewhere resolved into files (:mod:`threedistill.inputs`)."""
        return self.path / self.INPUTS

    def input_path(self, key: str, suffix: str) -> Path:
        """The resolved input for the config key ``key`` (e.g. ``representation.mesh.init``)."""
        return self.inputs_dir / f"{key}{suffix}"

    @property
    def refine(self) -> "RunFolder":
        """The refine stage's folder inside this one."""
        return RunFolder(self.path / self.REFINE)

    def is_refine_stage(self) -> bool:
        """Whether this folder is (by its place) the refine stage of another run."""
        return self.path.name == self.REFINE

    def mesh_path(self, fmt: str) -> Path:
        """``model.<fmt>`` (glb, obj, ply)."""
        return self.path / f"{self.MESH_STEM}.{fmt}"

    def mesh_companions(self) -> List[Path]:
        """The files an OBJ export writes beside ``model.obj`` (material and texture images)."""
        if not self.path.is_dir():
            return []
        obj = self.mesh_path("obj").name
        return [p for p in sorted(self.path.iterdir()) if p.is_file() and p.name != obj
                and (p.suffix.lower() == ".mtl"
                     or (p.name.startswith((self.MESH_STEM, "material")) and p.suffix.lower() in (".png", ".jpg")))]

    def preview_path(self, step: int) -> Path:
        return self.previews_dir / f"step_{step:06d}.png"

    def previews(self) -> List[Path]:
        """The preview images, oldest first."""
        return sorted(self.previews_dir.glob("step_*.png")) if self.previews_dir.is_dir() else []

    def latest_preview(self) -> Optional[Path]:
        found = self.previews()
        return found[-1] if found else None

    def latest_checkpoint(self) -> Optional[int]:
        """The newest complete checkpoint's step (None when there is none)."""
        return latest_checkpoint(self.checkpoints_dir)

    # -- status (run.json) -------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether the folder holds a run (its config was written)."""
        return self.config_path.is_file()

    def has_status(self) -> bool:
        return self.status_path.is_file()

    def read_status(self, as_stored: bool = False) -> Dict[str, Any]:
        """``run.json`` as a dict ({} when it is missing or unreadable), its ``status`` as it
        stands now: ``interrupted`` when it says running or exporting but its runner is gone (see
        :func:`runner_alive`). ``as_stored``: exactly what the file says."""
        try:
            text = self.status_path.read_text()
            mtime = self.status_path.stat().st_mtime
            info = json.loads(text)
        except (OSError, ValueError):
            return {}
        if not isinstance(info, dict):
            return {}
        if not as_stored and runner_alive(info, mtime) is False:
            info["status"] = "interrupted"
        return info

    def update_status(self, entries: Dict[str, Any], drop: Sequence[str] = ()) -> Dict[str, Any]:
        """The one writer of ``run.json``: its entries minus ``drop``, updated with ``entries``,
        written atomically. Returns what was written."""
        with _status_lock(self.status_path):
            info = self.read_status(as_stored=True)
            for key in drop:
                info.pop(key, None)
            info.update(entries)
            atomic_write_text(self.status_path, json.dumps(info, indent=1))
            return info

    def set_status(self, status: str, prompt: str, step: int, steps: int, **extra: Any) -> Dict[str, Any]:
        """A run's progress (an earlier export error or error is dropped; ``extra`` may set a new
        one). A live status (running, exporting) names this process as the runner, with the token
        of the run this object attends (:meth:`attend`; without one the run reads as interrupted);
        any other status drops the runner."""
        entries = {"status": status, "prompt": prompt, "step": step, "steps": steps,
                   "updated": datetime.now().isoformat(timespec="seconds")}
        drop = ["export_error", "export_pending", "error"]
        if status in LIVE_STATUSES:
            entries["runner"] = {**_this_process(), "token": self._token}
            entries["heartbeat"] = round(time.time(), 3)
        else:
            drop += ["runner", "heartbeat"]
        entries.update(extra)
        return self.update_status(entries, drop=drop)

    @contextlib.contextmanager
    def attend(self, step: Optional[Callable[[], int]] = None,
               every_s: float = HEARTBEAT_EVERY_S) -> Iterator["RunFolder"]:
        """While the body runs, this process drives the run: a live :meth:`set_status` names it as
        the runner, and a thread renews run.json's ``heartbeat`` (and ``step``, from ``step()``)
        every ``every_s`` seconds while the status stays live. Afterwards the run reads as
        interrupted unless the body wrote another status."""
        self._token = secrets.token_hex(8)
        _ATTENDED.add(self._token)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(self._token, stop, step, every_s),
                                name=f"heartbeat {self.name}", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            stop.set()
            beat.join()
            _ATTENDED.discard(self._token)
            self._token = None

    def _heartbeat(self, token: str, stop: threading.Event, step: Optional[Callable[[], int]], every_s: float) -> None:
        while not stop.wait(every_s):
            try:
                with _status_lock(self.status_path):
                    info = self.read_status(as_stored=True)
                    runner = info.get("runner")
                    if info.get("status") not in LIVE_STATUSES or not isinstance(runner, dict) \
                            or runner.get("token") != token:
                        continue  # not started yet, or ended: never revive a status
                    info["heartbeat"] = round(time.time(), 3)
                    if step is not None:
                        info["step"] = int(step())
                    atomic_write_text(self.status_path, json.dumps(info, indent=1))
            except Exception:  # noqa: BLE001 - a missed beat (full disk, ...) must not end the run
                continue

    def runner_alive(self) -> Optional[bool]:
        """:func:`runner_alive` of this run.json: True when a live process drives the run now."""
        try:
            info = json.loads(self.status_path.read_text())
            mtime = self.status_path.stat().st_mtime
        except (OSError, ValueError):
            return None
        return runner_alive(info, mtime) if isinstance(info, dict) else None

    def check_not_running(self) -> None:
        """:class:`UserError` when a live process (see :meth:`runner_alive`, with a runner record)
        drives this run now, so a second one does not write the same folder."""
        info = self.read_status(as_stored=True)
        runner = info.get("runner")
        if isinstance(runner, dict) and self.runner_alive():
            raise UserError(f"run '{self.path}' is {info.get('status')} in process {runner.get('pid')} on "
                            f"{runner.get('host')}; wait for it to end or stop it first")

    def remove_temp_leftovers(self) -> List[Path]:
        """Remove the temporary files a killed writer left (only :mod:`threedistill.atomic`'s
        temp names) in the run folder, its checkpoints, previews and inputs; not in a refine stage
        (its own run folder). Skipped (nothing removed) while a live process drives the run."""
        if self.runner_alive():
            return []
        removed: List[Path] = []
        for d in (self.path, self.checkpoints_dir, self.previews_dir, self.inputs_dir):
            removed += remove_leftover_temp_files(d)
        return removed

    def link_refine_stage(self, refine: "RunFolder") -> None:
        """Record in both ``run.json`` s that ``refine`` is this run's refine stage."""
        self.update_status({"refine": str(refine.path)})
        refine.update_status({"coarse": str(self.path)})

    def status(self) -> Optional[str]:
        return self.read_status().get("status")

    def is_finished(self) -> bool:
        return self.status() == "finished"

    # -- config -----------------------------------------------------------------------------------
    def read_config(self, overrides: Sequence[str] = ()) -> Config:
        """The run's saved config with ``overrides`` (old keys are dropped, see ``config.RETIRED_KEYS``)."""
        if not self.is_run():
            raise UserError(f"'{self.path}' is not a threedistill run folder (no {self.CONFIG})")
        return load_run_config_file(self.config_path, overrides)

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config_path, to_yaml(cfg))

    # -- metrics ----------------------------------------------------------------------------------
    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past ``step`` (left by a killed run) so the log matches the checkpoint."""
        path = self.metrics_path
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a kill
        atomic_write_text(path, "".join(l + "\n" for l in kept))

    # -- the trained representation ------------------------------------------------------------------
    def load_representation(self, overrides: Sequence[str] = (), device: Optional[str] = None):
        """``(config, representation, step)``: the representation rebuilt from the newest checkpoint
        (no prior needed), in eval mode: for export, render and evaluation."""
        cfg = self.read_config(overrides)
        dev = resolve_device(device or cfg.run.device)
        if self.latest_checkpoint() is None:
            raise UserError(f"run folder '{self.path}' has no checkpoint yet; nothing to export")
        self.remove_temp_leftovers()
        torch.manual_seed(cfg.run.seed)
        # The checkpoint holds the whole state: the representation reads none of its inputs, so a
        # refine run loads without its coarse run.
        rep = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run, from_checkpoint=True), dev)
        # The newest checkpoint that loads (one that does not is skipped with a warning).
        step, _ = load_latest_checkpoint(self.checkpoints_dir, rep, None, None, dev)
        rep.set_step(step)
        rep.eval()
        return cfg, rep, step

    def evaluate(self, classifier=None, write: bool = True) -> Dict[str, Any]:
        """Score the newest checkpoint against the shapes-world ground truth
        (:func:`~threedistill.shapes.evaluate.evaluate_representation`); writes ``eval.json``."""
        if not self.path.is_dir():
            raise UserError(f"run folder '{self.path}' does not exist")
        cfg, rep, step = self.load_representation()
        result = evaluate_representation(rep, str(cfg.run.prompt), camera_cfg=cfg.camera, classifier=classifier)
        result["step"] = step
        exported = next((p for p in (self.mesh_path(f) for f in ("glb", "obj", "ply")) if p.is_file()), None)
        if exported is not None:
            mesh = read_mesh(exported, "evaluation")
            result["floaters"] = floater_fraction(mesh.vertices, mesh.faces)
            result.update(evaluate_mesh_file(exported, str(cfg.run.prompt), camera_cfg=cfg.camera,
                                             ambient=rep.evaluation_ambient()))
        if write:
            atomic_write_text(self.eval_path, json.dumps(result, indent=2) + "\n")
        return result


class OutputsFolder:
    """An outputs root that a server (the web app) owns: the run folders in it, and the server's
    own files, whose names start with a dot so they are never taken for runs.

    ``.queue.json``: the app's job queue (queued jobs and the running one, with its run folder's
    name once it started), rewritten atomically on every change and read back at start-up."""

    QUEUE = ".queue.json"
    QUEUE_VERSION = 1

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    @property
    def queue_path(self) -> Path:
        return self.path / self.QUEUE

    def run(self, name: str) -> RunFolder:
        return RunFolder(self.path / name)

    def read_queue(self) -> List[Dict[str, Any]]:
        """The saved queue's entries, oldest first; [] when there is none. An unreadable file is
        kept aside as ``.queue.json.bad`` (with a one-line warning) and read as empty."""
        if not self.queue_path.is_file():
            return []
        try:
            data = json.loads(self.queue_path.read_text(encoding="utf-8"))
            jobs = data["jobs"] if isinstance(data, dict) else None
            if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
                raise ValueError("no list of jobs")
            return jobs
        except (OSError, ValueError, KeyError) as e:
            bad = self.queue_path.with_name(self.QUEUE + ".bad")
            self.queue_path.replace(bad)
            log.warning("the saved job queue %s is unreadable (%s); kept as %s, starting with an empty queue",
                        self.queue_path, str(e).splitlines()[0] if str(e) else type(e).__name__, bad)
            return []

    def write_queue(self, jobs: Sequence[Dict[str, Any]]) -> None:
        atomic_write_text(self.queue_path, json.dumps({"version": self.QUEUE_VERSION, "jobs": list(jobs)}, indent=1))


def load_trained_representation(run_dir: Union[str, Path], overrides: Sequence[str] = (),
                                device: Optional[str] = None) -> Tuple[Config, Any, int]:
    """:meth:`RunFolder.load_representation` of the folder ``run_dir``."""
    return RunFolder(run_dir).load_representation(overrides, device)


__all__ = ["RunFolder", "OutputsFolder", "slugify", "load_trained_representation", "runner_alive", "LIVE_STATUSES",
           "HEARTBEAT_EVERY_S", "HEARTBEAT_STALE_S"]
