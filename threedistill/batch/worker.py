"""Running one batch row, the same function under every executor.

:func:`execute_row` starts the row's run (or resumes it from its last checkpoint when its folder
already holds one), runs its refine stage when its config chains one, scores it against the ground
truth when the prompt is a shapes-world prompt and the prior is the built-in one, and writes a small
GIF of the turntable for the gallery. It holds an exclusive lock on the run folder while it works,
so a run is never driven by two processes (a batch restarted while a killed one's worker is still
winding down waits for it).

:func:`local_worker_main` is the body of a ``--executor local`` worker process: rows arrive on its
inbox, events (started, progress, done, failed) go to the shared outbox.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

from threedistill.devices import out_of_memory, resolve_device
from threedistill.distill import Callback
from threedistill.errors import UserError
from threedistill.pipeline import RunRequest, prepare_run, run_prepared
from threedistill.priors import PriorCache
from threedistill.runs import RunFolder
from threedistill.shapes.world import parse_prompt

LOCK_NAME = ".batch-row.lock"
# One loaded prior per worker process, reused while the rows ask for the same weights.
_PRIORS = PriorCache(max_entries=1)


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process still drives this run
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _turntable_gif(mp4: Path, size: int = 128, frames: int = 30) -> Optional[Path]:
    """A small looping GIF of ``mp4`` (for the gallery page), next to it."""
    import imageio.v3 as iio
    from PIL import Image

    video = iio.imread(mp4, index=None)  # every frame
    step = max(1, len(video) // frames)
    pics = [Image.fromarray(f).resize((size, size), Image.BILINEAR) for f in video[::step]]
    gif = mp4.with_suffix(".gif")
    tmp = gif.with_name(f".{gif.name}.tmp")
    pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:], duration=1000 // 12, loop=0)
    os.replace(tmp, gif)
    return gif


def row_request(task: Dict[str, Any], extra: Sequence[str] = ()) -> RunRequest:
    """What a row asks for: continue its run folder when that holds a run (``extra`` overrides on
    top), else a new run there: the batch's and the row's presets, then overrides, then ``extra``
    (its run folder's parent is the batch folder)."""
    run_dir = Path(task["run_dir"])
    if RunFolder(run_dir).is_run():
        return RunRequest(resume=run_dir, overrides=list(extra))
    return RunRequest(prompt=task["prompt"], configs=task["configs"], overrides=[*task["overrides"], *extra],
                      out_dir=str(run_dir.parent), run_dir=run_dir)


def execute_row(task: Dict[str, Any], progress: Optional[Callable[[int, int], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None,
                started: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Run (or resume) one row. ``task``: ``run_dir``, ``prompt``, ``configs`` (presets / files, merged
    in order) and ``overrides``. Returns ``status`` ("finished", or "stopped" when ``should_stop``
    asked for it), ``start_step``, ``step``, ``outputs`` (paths relative to the batch folder),
    ``metrics`` (shapes world, else None)."""
    run_dir = Path(task["run_dir"])
    out_root = run_dir.parent
    info: Dict[str, Any] = {"start_step": None}

    class Report(Callback):
        def on_start(self, d):
            if info["start_step"] is None:
                info["start_step"] = d.step
                if started is not None:
                    started(d.step)

        def on_step(self, d, step, stats):
            if progress is not None:
                progress(step, d.cfg.run.steps)
            if should_stop is not None and should_stop():
                d.request_stop()

    quiet = [] if task.get("show_run_progress") else ["run.progress=false"]  # the batch has its own bar
    with run_dir_lock(run_dir):
        cfg, folder = prepare_run(row_request(task, quiet))
        _PRIORS.get(cfg.prior, resolve_device(cfg.run.device))  # loaded before the run starts
        results = run_prepared(cfg, folder, callbacks=[Report()], priors=_PRIORS)
        last = results[-1]
        result: Dict[str, Any] = {"status": last.status, "start_step": info["start_step"], "step": last.step,
                                  "outputs": {}, "metrics": None}
        if last.status != "finished":
            return result
        outputs = {k: Path(v) for k, v in last.outputs.items()}
        if "turntable" in outputs:
            try:
                outputs["gif"] = _turntable_gif(outputs["turntable"])
            except Exception as e:  # a gallery thumbnail is not worth failing a finished row
                result["eval_error"] = f"turntable GIF: {e}"
        preview = RunFolder(last.run_dir).latest_preview()
        if preview is not None:
            outputs["preview"] = preview
        result["outputs"] = {k: os.path.relpath(v, out_root) for k, v in outputs.items()}
        result["metrics"] = _shapes_metrics(Path(last.run_dir), cfg, result)
        return result


def _shapes_metrics(run_dir: Path, cfg, result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Ground-truth metrics when the prompt is a shapes-world prompt and the prior is the built-in one."""
    if str(cfg.prior.name) != "shapes" or parse_prompt(str(cfg.run.prompt)) is None:
        return None
    try:
        r = RunFolder(run_dir).evaluate()
    except UserError as e:
        result["eval_error"] = f"evaluation: {e}"
        return None
    keep = ("iou", "color_error", "predicted", "prompt_correct", "view_consistency")
    return {k: r[k] for k in keep if k in r}


def describe_failure(e: BaseException) -> tuple[str, bool]:
    """(one-line error, retryable). A :class:`UserError` (bad config, missing weights, a loss that
    became NaN) fails the same way again, so it is not retried; anything else is."""
    if isinstance(e, UserError):
        return str(e), False
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__, True


# ----------------------------------------------------------------------------------------------
# --executor local: one worker process
# ----------------------------------------------------------------------------------------------
def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker whose batch was killed (SIGKILL, no chance to stop us) exits within a second, so a
    restarted batch never races it; its run keeps its last checkpoint."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def resolve_runner(runner: Optional[str]) -> Callable[..., Dict[str, Any]]:
    """The row function: :func:`execute_row`, or ``"module:function"`` with its signature (a seam
    for tools that wrap a row, and for the tests' failing rows)."""
    if not runner:
        return execute_row
    import importlib

    module, _, name = runner.partition(":")
    return getattr(importlib.import_module(module), name)


def local_worker_main(index: int, threads: int, inbox, outbox, stop_event, parent_pid: int,
                      runner: Optional[str] = None) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides; it asks us via stop_event
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    last_progress = [0.0]
    run_row = resolve_runner(runner)

    while True:
        task = inbox.get()
        if task is None:
            return
        rid = task["id"]

        def progress(step: int, total: int) -> None:
            now = time.monotonic()
            if now - last_progress[0] > 0.5 or step == total:
                last_progress[0] = now
                outbox.put(("progress", index, rid, step, total))

        try:
            result = run_row(task, progress=progress, should_stop=stop_event.is_set,
                                 started=lambda s: outbox.put(("started", index, rid, s)))
            outbox.put(("done", index, rid, result))
        except BaseException as e:  # noqa: BLE001 - every failure is reported, the worker lives on
            error, retryable = describe_failure(e)
            if os.environ.get("THREEDISTILL_BATCH_TRACEBACKS"):
                traceback.print_exc()
            outbox.put(("failed", index, rid, error, retryable))
            if out_of_memory(e) is not None:
                return  # a fresh process gets a clean allocator
