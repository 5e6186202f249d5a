"""Config-group building blocks shared by every group: scheduled scalars and value checks.

A config group is a dataclass that lives beside the code it configures (``CameraConfig`` in
``cameras.py``, ``NerfConfig`` in ``representations/nerf.py``, ...) and checks its own values in
``validate(key)``, where ``key`` is the group's dotted path in the whole config (for messages).
:mod:`threedistill.config` assembles the groups, loads YAML and applies overrides.

Scheduled scalars
-----------------
Scalars that papers anneal (guidance scale, timestep range, loss weights, learning rates) accept
either a number or a linear schedule ``[start_value, end_value, start_step, end_step]``: the value
is ``start_value`` up to ``start_step``, ``end_value`` from ``end_step`` on, linear in between.
Example: ``guidance.t_max=[0.98,0.5,0,5000]``. :func:`scheduled` evaluates one at a step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from omegaconf import ListConfig

from threedistill.errors import UserError

# A scheduled scalar: a float, or [start_value, end_value, start_step, end_step].
Scheduled = Any


# ----------------------------------------------------------------------------------------------
def parse_schedule(value: Any, key: str = "value") -> Optional[tuple[float, float, int, int]]:
    """Normalize a scheduled scalar to ``(start, end, start_step, end_step)`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        items = list(value)
        if len(items) != 4:
            raise UserError(
                f"config key '{key}': a schedule is [start_value, end_value, start_step, end_step], "
                f"got {items}"
            )
        try:
            start, end = float(items[0]), float(items[1])
            s0, s1 = int(items[2]), int(items[3])
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}': schedule entries must be numbers, got {items}") from None
        if s1 < s0:
            raise UserError(f"config key '{key}': schedule end_step {s1} is before start_step {s0}")
        return (start, end, s0, s1)
    if isinstance(value, bool):
        raise UserError(f"config key '{key}': expected a number or a schedule, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{key}': expected a number or a schedule, got {value!r}") from None
    if math.isnan(v):
        raise UserError(f"config key '{key}': NaN is not a valid value")
    return (v, v, 0, 0)


def plain_schedule(value: Any) -> Any:
    """A scheduled scalar as plain Python (a number or a list), detached from OmegaConf, so a
    representation can keep it without holding the config."""
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return value


def scheduled(value: Any, step: int, key: str = "value") -> Optional[float]:
    """Evaluate a scheduled scalar at ``step`` (see module docstring)."""
    sched = parse_schedule(value, key)
    if sched is None:
        return None
    start, end, s0, s1 = sched
    if step <= s0:
        return start
    if step >= s1:
        return end
    return start + (end - start) * (step - s0) / (s1 - s0)


# ----------------------------------------------------------------------------------------------
# Value checks (one line naming the key on failure)
# ----------------------------------------------------------------------------------------------
def check_positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_unit(value: Any, key: str) -> None:
    """``value`` lies within [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"config key '{key}' must lie within [0, 1], got {value}")


def check_choice(value: Any, key: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise UserError(f"config key '{key}' must be {listed}, got '{value}'")


def check_range(value: Any, key: str, lo: float, hi: float) -> None:
    """``value`` is ``[min, max]`` with ``lo <= min <= max <= hi``."""
    r = list(value)
    if len(r) != 2 or r[0] > r[1]:
        raise UserError(f"config key '{key}' must be [min, max] with min <= max, got {r}")
    if r[0] < lo or r[1] > hi:
        raise UserError(f"config key '{key}' must lie within [{lo}, {hi}], got {r}")


def check_schedule_min(value: Any, key: str, lo: float = 0.0) -> Optional[tuple]:
    """A scheduled scalar (or None) whose start and end values are ``>= lo``."""
    sched = parse_schedule(value, key)
    if sched is not None and min(sched[0], sched[1]) < lo:
        raise UserError(f"config key '{key}' must be >= {lo:g}, got {value}")
    return sched
