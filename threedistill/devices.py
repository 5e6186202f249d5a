"""Which torch device a run uses (``run.device``: auto, cpu, cuda, cuda:N), and whether an error
means that its memory ran out."""

from __future__ import annotations

from typing import Optional

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
