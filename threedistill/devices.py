"""Which torch device a run uses (``run.device``: auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

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
