"""Row functions for the batch tests' failure cases (``run_batch(runner="batch_runners:...")``);
worker processes import this module by name."""

import os
import signal
from pathlib import Path

from threedistill.batch.worker import execute_row


def raises_on_explode(task, progress=None, should_stop=None, started=None):
    """A row whose prompt says "explode" raises (like a bug or a CUDA fault would); others run."""
    if "explode" in task["prompt"]:
        raise RuntimeError(f"simulated fault in {task['id']}")
    return execute_row(task, progress, should_stop, started)


def worker_dies_once(task, progress=None, should_stop=None, started=None):
    """The worker process is killed (like the kernel's out-of-memory killer would) on a row's first
    attempt; the retry runs the row."""
    marker = Path(task["run_dir"]).parent / f".{task['id']}.died"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return execute_row(task, progress, should_stop, started)


def report_visible_gpu(task, progress=None, should_stop=None, started=None):
    """Reports which GPU the worker was given, instead of running the row."""
    return {"status": "finished", "step": 0, "outputs": {},
            "metrics": {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}}
