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
from typing import Any, Iterable, Mapping, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from threedistill.errors import UserError

# A scheduled scalar: a float, or [start_value, end_value, start_step, end_step].
Scheduled = Any


# ----------------------------------------------------------------------------------------------
def parse_schedule(value: Any, key: str = "value") -> Optional[tuple[float, float, int, int]]:
    """Normalize a scheduled scalar to ``(start, end, start_step, end_step)`` (None stays None);
    one line naming ``key`` for anything else (text, a bool, NaN, a number beyond a float)."""
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        items = list(value)
        if len(items) != 4:
            raise UserError(
                f"config key '{key}': a schedule is [start_value, end_value, start_step, end_step], "
                f"got {shown(items)}"
            )
        try:
            if any(isinstance(v, bool) or v is None for v in items):
                raise TypeError
            start, end = float(items[0]), float(items[1])
            if float(items[2]) != int(items[2]) or float(items[3]) != int(items[3]):
                raise TypeError
            s0, s1 = int(items[2]), int(items[3])
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"config key '{key}': schedule entries must be numbers (whole numbers of steps "
                            f"for the last two), got {shown(items)}") from None
        if not (math.isfinite(start) and math.isfinite(end)):
            raise UserError(f"config key '{key}': schedule values must be finite numbers, got {shown(items)}")
        if s1 < s0:
            raise UserError(f"config key '{key}': schedule end_step {shown(s1)} is before start_step {shown(s0)}")
        return (start, end, s0, s1)
    if isinstance(value, bool):
        raise UserError(f"config key '{key}': expected a number or a schedule, got {shown(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"config key '{key}': expected a number or a schedule, got {shown(value)}") from None
    if not math.isfinite(v):
        raise UserError(f"config key '{key}': expected a finite number, got {shown(value)}")
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


def exponential_decay(start: float, end: float, step: int, steps: int) -> float:
    """Log-linear interpolation from ``start`` (step 0) to ``end`` (step ``steps`` and after):
    ``start^(1-r) * end^r`` with ``r = clamp(step / steps, 0, 1)`` -- the exponential decay of the
    position learning rate in 3D Gaussian Splatting (Kerbl et al. 2023, without its delay phase).
    Both values must be > 0; ``steps <= 0`` gives ``end``."""
    r = 1.0 if steps <= 0 else min(max(step / steps, 0.0), 1.0)
    return math.exp((1.0 - r) * math.log(start) + r * math.log(end))


# ----------------------------------------------------------------------------------------------
# Value checks (one line naming the key on failure)
# ----------------------------------------------------------------------------------------------
def shown(value: Any, limit: int = 60) -> str:
    """``value`` for a one-line message: long text cut, integers too large to print named as such
    (Python refuses ``str`` of an integer beyond 4300 digits), never more than ``limit`` characters."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        if abs(value) >= 10 ** 18:
            return f"{'-' if value < 0 else ''}an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, ListConfig)):
        text = "[" + ", ".join(shown(v, limit) for v in list(value)[:8]) + (", ..." if len(value) > 8 else "") + "]"
        return text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(value, str):  # quoted, cut inside the quotes
        text = value.replace("\n", " ").replace("\r", " ")
        return "'" + (text if len(text) <= limit else text[: limit - 3] + "...") + "'"
    text = str(value).replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The largest integer a config may hold: what a 64-bit signed integer (JSON readers, torch, numpy)
#: holds; larger ones break run.json's readers.
MAX_INT = 2**63 - 1
#: The longest text a config value may hold (prompts, paths, names): far above any real prompt or
#: path, small enough that a run.json stays small.
MAX_TEXT = 4096
#: The largest step a schedule may name (a schedule's start_step / end_step), as run.steps' bound.
MAX_STEPS = 1_000_000

#: ``(lo, hi)`` bounds of a group's numeric keys (both inclusive); a scheduled key's values are
#: bounded, and its steps lie within ``[0, MAX_STEPS]``.
Bounds = Mapping[str, Tuple[float, float]]


def check_bounds(node: Any, key: str, bounds: Bounds, optional: Iterable[str] = ()) -> None:
    """Each ``name`` of ``bounds`` in ``node`` (a number, a schedule or None) lies within its
    ``(lo, hi)``: one line naming ``key.name`` otherwise. Every number a user can set has a bound,
    so a typo (``run.steps=10**30``) is refused before it holds a worker or reaches a file.
    ``optional``: the names that may be null (the others are numbers; a scheduled key is typed
    ``Any``, so only this check stops a null there)."""
    optional = set(optional)
    for name, (lo, hi) in bounds.items():
        value = node[name] if isinstance(node, (dict, DictConfig)) else getattr(node, name)
        full = f"{key}.{name}"
        if value is None:
            if name in optional:
                continue
            raise UserError(f"config key '{full}' must be a number, got null")
        if isinstance(value, (ListConfig, list, tuple)):
            start, end, s0, s1 = parse_schedule(value, full)  # type: ignore[misc]
            values = (start, end)
            if not (0 <= s0 <= MAX_STEPS and 0 <= s1 <= MAX_STEPS):
                raise UserError(f"config key '{full}': schedule steps must lie within [0, {MAX_STEPS}], "
                                f"got {shown(list(value))}")
        else:
            parse_schedule(value, full)  # a number (not text, not a bool)
            values = (value,)
        for v in values:
            number = v if isinstance(v, (int, float)) else float(v)  # parse_schedule took it
            if not lo <= number <= hi:  # NaN compares false: refused too
                raise UserError(f"config key '{full}' must lie within [{shown(lo)}, {shown(hi)}], got {shown(v)}")


def check_storable(node: Any, key: str = "", interpolations_only: bool = False) -> None:
    """Every value below ``node`` can be written to config.yaml and run.json and read back: finite
    floats, integers within 64 bits, text of at most :data:`MAX_TEXT` characters without NUL, no
    ``${...}`` interpolation (a user's value is taken literally; an interpolation could read the
    environment). One line naming the key otherwise. ``interpolations_only``: only the last check
    (made before anything reads the values, since reading resolves an interpolation)."""
    if isinstance(node, DictConfig):
        for name in node.keys():
            full = f"{key}.{name}" if key else str(name)
            if OmegaConf.is_interpolation(node, str(name)):
                raise UserError(f"config key '{full}': ${{...}} interpolations are not allowed; give the value itself")
            check_storable(node[name], full, interpolations_only)
        return
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            if OmegaConf.is_interpolation(node, i):
                raise UserError(f"config key '{key}': ${{...}} interpolations are not allowed; give the value itself")
            check_storable(node[i], key, interpolations_only)
        return
    if isinstance(node, (list, tuple)):
        for item in node:
            check_storable(item, key, interpolations_only)
        return
    if isinstance(node, dict):
        for name, item in node.items():
            check_storable(item, f"{key}.{name}", interpolations_only)
        return
    if isinstance(node, bool) or node is None or interpolations_only:
        return
    if isinstance(node, int):
        if abs(node) > MAX_INT:
            raise UserError(f"config key '{key}': {shown(node)} is too large (at most {MAX_INT})")
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise UserError(f"config key '{key}' must be a finite number, got {node}")
    elif isinstance(node, str):
        if len(node) > MAX_TEXT:
            raise UserError(f"config key '{key}' is too long ({len(node)} characters; at most {MAX_TEXT})")
        if "\x00" in node:
            raise UserError(f"config key '{key}' contains a NUL character")


def check_positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {shown(value)}")


def check_unit(value: Any, key: str) -> None:
    """``value`` lies within [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"config key '{key}' must lie within [0, 1], got {shown(value)}")


def check_choice(value: Any, key: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise UserError(f"config key '{key}' must be {listed}, got {shown(value)}")


def check_range(value: Any, key: str, lo: float, hi: float) -> None:
    """``value`` is ``[min, max]`` with ``lo <= min <= max <= hi``."""
    r = list(value)
    if len(r) != 2 or not r[0] <= r[1]:  # NaN compares false
        raise UserError(f"config key '{key}' must be [min, max] with min <= max, got {shown(r)}")
    if not (lo <= r[0] and r[1] <= hi):
        raise UserError(f"config key '{key}' must lie within [{lo}, {hi}], got {shown(r)}")


def check_schedule_min(value: Any, key: str, lo: float = 0.0) -> Optional[tuple]:
    """A scheduled scalar (or None) whose start and end values are ``>= lo``."""
    sched = parse_schedule(value, key)
    if sched is not None and min(sched[0], sched[1]) < lo:
        raise UserError(f"config key '{key}' must be >= {lo:g}, got {shown(value)}")
    return sched
