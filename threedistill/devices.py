"""Which torch device a run uses (``run.device``: auto, cpu, cuda, cuda:N), how many CPU threads
torch may use (``run.threads``), and whether an error means that its memory ran out."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Tuple

import torch

from threedistill.errors import UserError
from threedistill.groups import shown


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
    ``OMP_NUM_THREADS`` when the user set it, else takes the usable cores (:func:`usable_cores`)
    that the processes already running leave free (the cores minus the 1-minute load average,
    rounded), at least 1. torch's default (one thread per core) makes its threads spin against any
    other busy process: on 2 cores beside other busy processes a step took 6 s at torch's 2 threads
    and 0.4-0.6 s at one. A process that starts after the run is not in the load average yet:
    :class:`ThreadGovernor` looks again while the run goes on."""
    environ = os.environ if environ is None else environ
    if setting is not None and str(setting).strip().lower() != "auto":
        return int(setting), "run.threads"
    env = str(environ.get("OMP_NUM_THREADS", "")).strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n = (cores or usable_cores)()
    busy = (load or _load_average)()
    free = max(1, min(n, int(n - busy + 0.5)))
    return free, f"{n} core(s), load average {busy:.2f}"


class ThreadGovernor:
    """``run.threads=auto`` while a run goes on: every ``every_s`` seconds, the cores other
    processes leave free (the cores minus the 1-minute load average less this run's own threads)
    decide the thread count again. Fewer threads as soon as others need the cores (threads that
    spin against another busy process slow every process several-fold); one more when at least
    half a core is free beyond the current count (the estimate rounds to the same count both ways,
    so the count does not swing). Inactive for a fixed ``run.threads`` or a set
    ``OMP_NUM_THREADS``."""

    def __init__(self, setting: Any, threads: int, every_s: float = 10.0, environ: Optional[dict] = None,
                 cores: Optional[Callable[[], int]] = None, load: Optional[Callable[[], float]] = None,
                 clock: Callable[[], float] = time.monotonic, set_threads: Callable[[int], None] = torch.set_num_threads):
        environ = os.environ if environ is None else environ
        env = str(environ.get("OMP_NUM_THREADS", "")).strip()
        self.active = (setting is None or str(setting).strip().lower() == "auto") and not (env.isdigit() and int(env) > 0)
        self.threads = int(threads)
        self.every_s = float(every_s)
        self._cores = cores or usable_cores
        self._load = load or _load_average
        self._clock = clock
        self._set = set_threads
        self._last = clock()

    def tick(self) -> Optional[int]:
        """Call once per step; the new thread count when it changed, else None."""
        if not self.active:
            return None
        now = self._clock()
        if now - self._last < self.every_s:
            return None
        self._last = now
        n = self._cores()
        avail = n - max(0.0, self._load() - self.threads)  # cores not used by other processes
        if avail < self.threads - 0.5:
            new = max(1, int(avail + 0.5))
        elif avail >= self.threads + 0.5:
            new = min(n, self.threads + 1)
        else:
            new = self.threads
        if new != self.threads:
            self.threads = new
            self._set(new)
            return new
        return None


def check_threads(value: Any, key: str) -> None:
    """``run.threads``: ``auto`` or a positive whole number."""
    if str(value).strip().lower() == "auto":
        return
    try:
        ok = int(str(value)) > 0 and float(str(value)) == int(str(value))
    except ValueError:
        ok = False
    if not ok or isinstance(value, bool):
        raise UserError(f"config key '{key}' must be auto or a positive whole number of threads, got {shown(value)}")


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


# ----------------------------------------------------------------------------------------------
# Speed settings that depend on the device ("auto": the CPU's value or CUDA's)
# ----------------------------------------------------------------------------------------------
#: ``run.stats_every`` "auto": reading stats on the CPU costs nothing; on CUDA each read waits for
#: the GPU, so it is read once in this many steps.
STATS_EVERY_CUDA = 20


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def check_auto_count(value: Any, key: str, what: str) -> None:
    """``auto`` or a whole number >= 1 (``what`` names it in the message)."""
    if _is_auto(value):
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, str))
    if ok:
        try:
            ok = int(str(value)) >= 1 and str(value).strip().lstrip("+").isdigit()
        except ValueError:
            ok = False
    if not ok or int(str(value)) > 1_000_000:
        raise UserError(f"config key '{key}' must be auto or a whole number of {what} in [1, 1000000], got {shown(value)}")


def check_auto_bool(value: Any, key: str) -> None:
    """``auto``, true or false."""
    if not (_is_auto(value) or isinstance(value, bool)):
        raise UserError(f"config key '{key}' must be auto, true or false, got {shown(value)}")


def stats_every(setting: Any, device: torch.device) -> int:
    """``run.stats_every`` resolved: ``auto`` is 1 on the CPU, :data:`STATS_EVERY_CUDA` elsewhere."""
    if _is_auto(setting):
        return 1 if device.type == "cpu" else STATS_EVERY_CUDA
    return int(str(setting))


def profile_on(setting: Any, device: torch.device) -> bool:
    """``run.profile`` resolved: ``auto`` is on for the CPU only (where timing sections waits for nothing)."""
    return device.type == "cpu" if _is_auto(setting) else bool(setting)


def set_tf32(enabled: bool, device: torch.device) -> None:
    """``run.tf32``: TensorFloat-32 for CUDA matmuls and cuDNN convolutions (process-wide flags; the
    CPU ignores them, so nothing is set there)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor.to(device)`` that does not wait for the GPU: a plain host-to-CUDA copy of pageable
    memory waits for the stream's queued work; from pinned memory with ``non_blocking`` it is queued
    like any kernel (the source is a fresh tensor here; torch's pinned allocator keeps it until
    the copy is done). Other moves are ``tensor.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
