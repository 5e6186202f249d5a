"""Which torch device a run uses (``run.device``: auto, cpu, cuda, cuda:N), how many CPU threads
torch may use (``run.threads``), and whether an error means that its memory ran out."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import torch

from threedistill.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; a CUDA name without a GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={name} but no CUDA GPU is available; use run.device=cpu or auto")
    return dev


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where the
    platform has no affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(setting: Any = "auto", environ: Optional[dict] = None,
                   cores: Optional[Callable[[], int]] = None,
                   load: Optional[Callable[[], float]] = None) -> Tuple[int, str]:
    """How many threads torch should use on the CPU, and why (one phrase for the log).

    ``setting`` is ``run.threads``: a positive number is taken as it is; ``auto`` respects
    ``OMP_NUM_THREADS`` when the user set it, else takes half the usable cores
    (:func:`usable_cores`), fewer when the processes already running leave less free (the
    cores minus the 1-minute load average, rounded), at least 1. torch's default (one thread
    per core) makes its threads spin against any other busy process: on 2 cores beside other
    busy processes a step took 6 s at torch's 2 threads and 0.4-0.6 s at one. Half the cores
    also leaves room for a process that starts after the run (the load average has not seen it
    yet)."""
    environ = os.environ if environ is None else environ
    if setting is not None and str(setting).strip().lower() != "auto":
        return int(setting), "run.threads"
    env = str(environ.get("OMP_NUM_THREADS", "")).strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n = (cores or usable_cores)()
    busy = (load or _load_average)()
    free = max(1, min(n // 2, int(n - busy + 0.5)))
    return free, f"{n} core(s), load average {busy:.2f}"


def check_threads(value: Any, key: str) -> None:
    """``run.threads``: ``auto`` or a positive whole number."""
    if str(value).strip().lower() == "auto":
        return
    try:
        ok = int(str(value)) > 0 and float(str(value)) == int(str(value))
    except ValueError:
        ok = False
    if not ok or isinstance(value, bool):
        raise UserError(f"config key '{key}' must be auto or a positive whole number of threads, got '{value}'")


#: What to lower when a run runs out of memory (the front ends' one-line message).
OOM_HINT = "lower run.resolution, camera.batch_size or representation.nerf.num_samples"

# torch >= 2.5 names it torch.OutOfMemoryError; older releases only torch.cuda.OutOfMemoryError (the same class).
_TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def out_of_memory(error: BaseException) -> Optional[str]:
    """Which memory ran out when ``error`` was raised: ``"gpu"`` for torch's out-of-memory error (an
    accelerator allocator's), ``"cpu"`` for Python's :class:`MemoryError` and for the CPU allocator's
    failure (torch raises a plain RuntimeError there, so only that one is recognised by its message),
    None for any other error."""
    if isinstance(error, _TORCH_OOM):
        return "gpu"
    if isinstance(error, MemoryError):
        return "cpu"
    if type(error) is RuntimeError and "DefaultCPUAllocator" in str(error):
        return "cpu"
    return None
