"""Batches of prompts: a resumable manifest, local worker processes or Ray, a summary and a gallery.

    threedistill batch PROMPTS.txt|ROWS.jsonl|ROWS.csv [-c PRESET] [--out DIR] [--seeds N]
        [--executor local|ray] [--workers N] [--ray-address ADDR] [--retries R] [key=value ...]

:func:`run_batch` is the coordinator: it reads the rows (:mod:`.rows`), merges them into
``OUT/batch.jsonl`` (:mod:`.manifest`), checks every new row's config before any work (a bad preset
or override fails that row alone, with its error), hands rows to an executor (:mod:`.executors`),
and writes ``summary.md`` and ``index.html`` (:mod:`.report`). Rerunning the same command resumes:
done rows are skipped, interrupted rows continue from their last checkpoint, failed rows get their
attempts again. Only one batch at a time may use an output folder (a lock file).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from threedistill.batch.executors import make_executor
from threedistill.batch.manifest import MANIFEST, Manifest
from threedistill.batch.report import write_gallery, write_summary
from threedistill.batch.rows import BatchRow, read_batch_input
from threedistill.batch.worker import row_request
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.pipeline import is_complete, prepare_run
from threedistill.runs import RunFolder


@contextmanager
def _batch_lock(out: Path) -> Iterator[None]:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".batch.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another batch is running in '{out}'; wait for it or use another --out") from None
        yield


@contextmanager
def _ctrl_c_requests() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C (SIGINT) into a flag the coordinator's loop reads, rather than a
    ``KeyboardInterrupt`` raised wherever the main thread happens to be: an exception raised inside
    a finalizer (``__del__``, a weakref or queue callback) is printed and dropped by Python, and the
    batch then ran on and exited 0. A second Ctrl-C raises at once (the previous handler is back),
    for a user who does not want to wait for the running rows' checkpoints. Off the main thread
    (where handlers cannot be installed) the flag stays down and Ctrl-C behaves as before."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # noqa: ARG001
        requested.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _task(entry: Dict[str, Any], out: Path, configs: Sequence[str], overrides: Sequence[str]) -> Dict[str, Any]:
    return {"id": entry["id"], "prompt": entry["prompt"], "run_dir": str(out / entry["run_dir"]),
            "configs": [*configs, *entry["presets"]],
            "overrides": [*overrides, *entry["overrides"], f"run.seed={entry['seed']}"]}


def _check_row(task: Dict[str, Any]) -> None:
    """Prepare the row's run now (no weights loaded): a bad preset, override, refine section or a
    missing prior fails here."""
    prepare_run(row_request(task))


class _Progress:
    """The overall bar: rows finished of all, with done / failed / running and the running rows' steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="batch", unit="row", disable=not enabled, dynamic_ncols=True)
        self.steps: Dict[str, str] = {}

    def update(self, manifest: Manifest, finished_now: int = 0) -> None:
        c = manifest.counts()
        if finished_now:
            self.bar.update(finished_now)
        running = ", ".join(f"{rid[:18]} {s}" for rid, s in list(self.steps.items())[:3])
        self.bar.set_postfix_str(f"done {c['done']}, failed {c['failed']}, running {c['running']}"
                                 + (f" [{running}]" if running else ""))

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()


#: Bounds of the batch flags, checked before anything is read or created: more worker processes
#: than 256 or torch threads than 1024 per worker exceed any machine; 100 retries of a crashing row
#: or 10000 seeds per prompt are typos.
BATCH_FLAG_BOUNDS = {"workers": (1, 256), "threads": (1, 1024), "retries": (0, 100), "seeds": (1, 10_000)}


def check_batch_flags(**flags: Optional[int]) -> None:
    """Each flag (None: its default) is a whole number within :data:`BATCH_FLAG_BOUNDS`."""
    for name, value in flags.items():
        lo, hi = BATCH_FLAG_BOUNDS[name]
        if value is None and name in ("workers", "threads"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"--{name} must be >= {lo} and <= {hi} (a whole number), got {value}")


def run_batch(input_path: str | Path, out: Optional[str | Path], configs: Sequence[str] = (), overrides: Sequence[str] = (),
              seeds: int = 1, executor: str = "local", workers: Optional[int] = None,
              ray_address: Optional[str] = None, retries: int = 1, threads: Optional[int] = None,
              progress: bool = True, log=print, runner: Optional[str] = None) -> Dict[str, Any]:
    """Run (or resume) a batch into ``out`` (None: the config's ``run.out_dir``). Returns the totals (rows, done, failed, ...); the
    manifest, ``summary.md`` and ``index.html`` are in ``out``. ``runner``: ``"module:function"``
    to run each row instead of :func:`~threedistill.batch.worker.execute_row` (same signature)."""
    check_batch_flags(workers=workers, threads=threads, retries=retries, seeds=seeds)  # before anything is created
    # The batch-wide settings must be valid on their own (a typo there would fail every row).
    base = {"run": {"prompt": "batch", **({"out_dir": str(out)} if out is not None else {})}}
    cfg0 = load_config(list(configs), list(overrides), base=base)
    out = Path(out if out is not None else cfg0.run.out_dir)
    rows: List[BatchRow] = read_batch_input(input_path, seeds=seeds, default_seed=int(cfg0.run.seed))
    title = f"{Path(input_path).name} ({len(rows)} rows)"
    t_start = time.time()
    with _batch_lock(out), _ctrl_c_requests() as ctrl_c:
        manifest = Manifest.open(out, rows)
        tasks = {e["id"]: _task(e, out, configs, overrides) for e in manifest.rows()}
        queue: List[str] = []
        rejected = 0
        for e in manifest.rows():
            if e["state"] == "done":
                if is_complete(out / e["run_dir"]):
                    continue
                e["state"] = "pending"  # its folder was removed or left unfinished since: run it again
                manifest.save()
            task = tasks[e["id"]]
            if not RunFolder(task["run_dir"]).is_run():
                try:
                    _check_row(task)
                except UserError as err:
                    manifest.reject(e["id"], str(err))
                    rejected += 1
                    continue
            queue.append(e["id"])
        skipped = manifest.counts()["done"]
        log(f"batch: {len(rows)} rows in '{out}': {skipped} already done, {rejected} rejected, {len(queue)} to run")
        for e in manifest.rows("failed"):
            if e["id"] not in queue:
                log(f"  {e['id']}: {e['error']}")
        attempts_now: Dict[str, int] = {}
        interrupted = False
        bar = None
        ex = None
        try:
            if queue:
                ex = make_executor(executor, workers=workers, ray_address=ray_address, threads=threads, runner=runner)
                log(f"batch: {ex.describe()}")
            bar = _Progress(len(rows), skipped + rejected, progress)
            while queue or (ex is not None and ex.free() < ex.slots):
                if ctrl_c():
                    raise KeyboardInterrupt
                while queue and ex.free() > 0:
                    rid = queue.pop(0)
                    attempts_now[rid] = attempts_now.get(rid, 0) + 1
                    manifest.start(rid, ex.submit(tasks[rid]))
                    bar.steps[rid] = "start"
                    bar.update(manifest)
                for ev in ex.poll(0.5):
                    kind, rid = ev[0], ev[2]
                    if kind == "started":
                        manifest.entries[rid]["history"][-1]["start_step"] = ev[3]
                        manifest.save()
                    elif kind == "progress":
                        bar.steps[rid] = f"{ev[3]}/{ev[4]}"
                        bar.update(manifest)
                    elif kind == "done":
                        bar.steps.pop(rid, None)
                        manifest.finish(rid, ev[3])
                        if ev[3]["status"] == "finished":
                            bar.update(manifest, 1)
                        else:
                            bar.update(manifest)
                    elif kind == "failed":
                        bar.steps.pop(rid, None)
                        error, retryable = ev[3], ev[4]
                        final = not retryable or attempts_now[rid] > retries
                        manifest.fail(rid, error, final)
                        bar.write(f"{rid}: attempt {attempts_now[rid]} failed: {error}"
                                  + ("" if final else " (retrying)"))
                        if final:
                            bar.update(manifest, 1)
                        else:
                            queue.append(rid)
        except KeyboardInterrupt:
            interrupted = True
            if bar is not None:
                bar.write("batch: interrupted; running rows checkpoint and stop ...")
            if ex is not None:
                for ev in ex.close(stop=True):
                    if ev[0] == "done":
                        manifest.finish(ev[2], ev[3])
                    elif ev[0] == "failed":
                        manifest.fail(ev[2], ev[3], final=False)
                ex = None
            for e in manifest.rows("running"):
                manifest.requeue(e["id"])
        finally:
            if ex is not None:
                ex.close()
            if bar is not None:
                bar.close()
            wall = time.time() - t_start
            totals = write_summary(manifest, title, wall)
            write_gallery(manifest, title, wall)
        if interrupted:
            raise KeyboardInterrupt
    totals["summary"] = str(out / "summary.md")
    totals["gallery"] = str(out / "index.html")
    totals["manifest"] = str(out / MANIFEST)
    return totals


__all__ = ["run_batch", "read_batch_input", "BatchRow", "Manifest"]
