"""Where batch rows run: local worker processes or Ray tasks, behind one small interface.

An executor has ``slots`` (rows it runs at once), ``submit(task)``, ``poll(timeout)`` returning
events and ``close(stop)``. Events are tuples:

* ``("started", worker, id, start_step)`` (local only; Ray reports the start step with the result),
* ``("progress", worker, id, step, total)`` (local only),
* ``("done", worker, id, result)``,
* ``("failed", worker, id, error, retryable)``: the row raised, or its worker process died
  (crash, out-of-memory kill): a failed row never takes the batch down.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any, Dict, List, Optional, Tuple

from threedistill.errors import UserError

Event = Tuple[Any, ...]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


class LocalExecutor:
    """One worker process per visible GPU (each sees only its own, ``CUDA_VISIBLE_DEVICES``), or
    ``workers`` CPU processes sharing the cores (``threads`` torch threads each)."""

    def __init__(self, workers: Optional[int] = None, threads: Optional[int] = None, runner: Optional[str] = None):
        self.runner = runner
        self.gpus = visible_gpus()
        n = workers or max(1, self.gpus)
        if n < 1:
            raise UserError(f"--workers must be >= 1, got {n}")
        self.slots = n
        self.threads = threads or max(1, (os.cpu_count() or 1) // n)
        self._ctx = mp.get_context("spawn")
        self._outbox = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._procs: List[Any] = [None] * n
        self._inboxes: List[Any] = [None] * n
        self._busy: Dict[int, str] = {}
        for i in range(n):
            self._spawn(i)

    def describe(self) -> str:
        if self.gpus:
            return f"local: {self.slots} worker process(es) over {self.gpus} GPU(s)"
        return f"local: {self.slots} CPU worker process(es), {self.threads} torch thread(s) each"

    def _spawn(self, i: int) -> None:
        from threedistill.batch.worker import local_worker_main

        env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
        if self.gpus:
            visible = (env_before.split(",") if env_before else [str(k) for k in range(self.gpus)])
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[i % len(visible)].strip()
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        try:
            inbox = self._ctx.Queue()
            p = self._ctx.Process(target=local_worker_main, name=f"threedistill-batch-{i}",
                                  args=(i, self.threads, inbox, self._outbox, self._stop, os.getpid(), self.runner),
                                  daemon=True)
            p.start()
        finally:
            if env_before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_before
        self._procs[i], self._inboxes[i] = p, inbox

    def free(self) -> int:
        return self.slots - len(self._busy)

    def submit(self, task: Dict[str, Any]) -> str:
        i = next(k for k in range(self.slots) if k not in self._busy)
        self._busy[i] = task["id"]
        self._inboxes[i].put(task)
        return f"local-{i}"

    def poll(self, timeout: float) -> List[Event]:
        events: List[Event] = []
        try:
            events.append(self._outbox.get(timeout=timeout))
            while True:
                events.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        for ev in events:
            if ev[0] in ("done", "failed"):
                self._busy.pop(ev[1], None)
        for i, rid in list(self._busy.items()):  # a worker that died mid-row fails that row
            p = self._procs[i]
            if not p.is_alive():
                time.sleep(0.2)
                try:  # its last words may still be in the queue
                    while True:
                        ev = self._outbox.get_nowait()
                        events.append(ev)
                        if ev[0] in ("done", "failed"):
                            self._busy.pop(ev[1], None)
                except queue.Empty:
                    pass
                if i in self._busy:
                    code = p.exitcode
                    why = "killed by signal %d" % -code if code is not None and code < 0 else f"exit code {code}"
                    hint = " (out of memory?)" if code in (-9, 137) else ""
                    events.append(("failed", i, rid, f"worker process died ({why}){hint}", True))
                    self._busy.pop(i, None)
                self._spawn(i)
        for i in range(self.slots):  # idle workers that exited (e.g. after an out-of-memory error)
            if i not in self._busy and not self._procs[i].is_alive():
                self._spawn(i)
        return events

    def close(self, stop: bool = False, grace: float = 120.0) -> List[Event]:
        """Shut the workers down. ``stop``: running rows checkpoint and stop first (their "done"
        events, status "stopped", are returned)."""
        events: List[Event] = []
        if stop and self._busy:
            self._stop.set()
            deadline = time.monotonic() + grace
            while self._busy and time.monotonic() < deadline:
                events += self.poll(0.5)
        for q in self._inboxes:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        return events


def _ray_execute(task: Dict[str, Any], threads: int, runner: Optional[str]) -> Dict[str, Any]:
    """A Ray task: one row in a Ray worker process (which keeps its loaded prior between rows)."""
    import torch

    from threedistill.batch.worker import describe_failure, resolve_runner

    torch.set_num_threads(threads)
    try:
        return resolve_runner(runner)(task)
    except BaseException as e:  # noqa: BLE001 - returned, so the driver sees one line, not a pickled traceback
        error, retryable = describe_failure(e)
        return {"status": "error", "error": error, "retryable": retryable}


class RayExecutor:
    """One Ray task per row, asking for one GPU (or ``threads`` CPUs on a CPU-only cluster).
    Connects to ``address`` or starts a local Ray (``workers`` x ``threads`` CPUs)."""

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None, threads: Optional[int] = None,
                 runner: Optional[str] = None):
        self.runner = runner
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'threedistill[ray]'") from None
        self.ray = ray
        env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
               if k in os.environ}
        init = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                    runtime_env={"env_vars": env} if env else None)
        if address:
            try:
                ray.init(address=address, **init)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot connect to the Ray cluster at '{address}': {str(e).splitlines()[0]}") from None
            self.started_local = False
        else:
            n = workers or max(1, visible_gpus())
            t = threads or max(1, (os.cpu_count() or 1) // n)
            ray.init(num_cpus=n * t, **init)
            self.started_local = True
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        if self.gpus:
            self.threads = threads or max(1, cpus // self.gpus)
            self.slots = workers or self.gpus
            opts = dict(num_gpus=1, num_cpus=min(self.threads, cpus))
        else:
            self.threads = threads or (max(1, cpus // workers) if workers else 1)
            self.slots = workers or max(1, cpus // self.threads)
            opts = dict(num_cpus=self.threads)
        # Our own retry logic counts attempts; Ray must not re-run a row behind our back.
        self._remote = ray.remote(max_retries=0, **opts)(_ray_execute)
        self._refs: Dict[Any, str] = {}

    def describe(self) -> str:
        where = "local Ray" if self.started_local else "Ray cluster"
        per = "1 GPU" if self.gpus else f"{self.threads} CPU(s)"
        return f"ray: {where}, up to {self.slots} task(s) at once, {per} each"

    def free(self) -> int:
        return self.slots - len(self._refs)

    def submit(self, task: Dict[str, Any]) -> str:
        ref = self._remote.remote(task, self.threads, self.runner)
        self._refs[ref] = task["id"]
        return "ray"

    def poll(self, timeout: float) -> List[Event]:
        if not self._refs:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout)
        events: List[Event] = []
        for ref in ready:
            rid = self._refs.pop(ref)
            try:
                result = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker process died (crash, out-of-memory kill)
                events.append(("failed", "ray", rid, f"Ray worker failed: {type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}", True))
                continue
            if result.get("status") == "error":
                events.append(("failed", "ray", rid, result["error"], result["retryable"]))
            else:
                events.append(("done", "ray", rid, result))
        return events

    def close(self, stop: bool = False, grace: float = 0.0) -> List[Event]:
        for ref in list(self._refs):
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        self.ray.shutdown()
        return []


def make_executor(name: str, workers: Optional[int] = None, ray_address: Optional[str] = None,
                  threads: Optional[int] = None, runner: Optional[str] = None):
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if name == "local":
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        return LocalExecutor(workers, threads, runner)
    if name == "ray":
        return RayExecutor(ray_address, workers, threads, runner)
    raise UserError(f"--executor must be local or ray, got '{name}'")
