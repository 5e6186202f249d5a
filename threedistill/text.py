"""Small text formatting shared by the front ends."""

from __future__ import annotations

from typing import Optional


def format_duration(seconds: Optional[float]) -> str:
    """A duration as a clock: ``m:ss`` under an hour, ``h:mm:ss`` from one (``"?"`` when unknown)."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
