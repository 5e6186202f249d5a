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

A scheduled scalar may also be a list of milestones ``[[step, value], ...]``: piecewise constant,
each value holds from its step on (the first value also before its step); steps are whole numbers,
non-negative and strictly increasing. Example: ``run.resolution=[[0,32],[400,64]]``. The two list
forms cannot be confused: the linear form is a list of four numbers, the milestone form a list of
``[step, value]`` pairs. Either way the value depends on the step only, so a resumed run sees the
same values as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from threedistill.errors import UserError

# A scheduled scalar: a float, [start_value, end_value, start_step, end_step] or [[step, value], ...].
Scheduled = Any


class Schedule(tuple):
    """A parsed scheduled scalar. As a tuple it is ``(start, end, start_step, end_step)``: the
    linear form itself, a number as ``(v, v, 0, 0)``, milestones as (first value, last value, first
    step, last step). ``points`` holds every ``(step, value)``; ``values`` every value (for bound
    checks); ``milestones`` says which form it is; :meth:`at` evaluates it."""

    points: Tuple[Tuple[int, float], ...]
    milestones: bool

    def __new__(cls, points: Sequence[Tuple[int, float]], milestones: bool) -> "Schedule":
        (s0, v0), (s1, v1) = points[0], points[-1]
        self = super().__new__(cls, (v0, v1, s0, s1))
        self.points = tuple(points)
        self.milestones = milestones
        return self

    @property
    def values(self) -> Tuple[float, ...]:
        return tuple(v for _, v in self.points)

    @property
    def steps(self) -> Tuple[int, ...]:
        return tuple(s for s, _ in self.points)

    @property
    def constant(self) -> bool:
        return len(set(self.values)) == 1

    def at(self, step: int) -> float:
        """The value at ``step``."""
        if self.milestones:
            value = self.points[0][1]
            for s, v in self.points:
                if step >= s:
                    value = v
            return value
        start, end, s0, s1 = self
        if step <= s0:
            return start
        if step >= s1:
            return end
        return start + (end - start) * (step - s0) / (s1 - s0)

    def is_between(self, step: int) -> bool:
        """Whether ``step`` lies strictly inside a linear ramp (its value interpolated, not given)."""
        return not self.milestones and self[2] < step < self[3] and self[0] != self[1]


def _whole_step(x: Any) -> int:
    """A step count: a whole number (``TypeError`` otherwise, reported by the caller)."""
    if isinstance(x, bool) or x is None or isinstance(x, (list, tuple, ListConfig, DictConfig, str)):
        raise TypeError
    f = float(x)
    if f != int(f):
        raise TypeError
    return int(f)


def _number(x: Any) -> float:
    if isinstance(x, bool) or x is None or isinstance(x, (list, tuple, ListConfig, DictConfig, str)):
        raise TypeError
    return float(x)


def _is_list(x: Any) -> bool:
    return isinstance(x, (ListConfig, list, tuple))


def _parse_milestones(items: list, key: str) -> Schedule:
    points = []
    for item in items:
        if not _is_list(item) or len(item) != 2:
            raise UserError(f"config key '{key}': milestones are [[step, value], ...], got {shown(items)}")
        try:
            step, value = _whole_step(item[0]), _number(item[1])
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"config key '{key}': a milestone is [step, value] with a whole number of steps and "
                            f"a number, got {shown(list(item))}") from None
        if not math.isfinite(value):
            raise UserError(f"config key '{key}': milestone values must be finite numbers, got {shown(list(item))}")
        if step < 0:
            raise UserError(f"config key '{key}': milestone steps must be >= 0, got {shown(step)}")
        if points and step <= points[-1][0]:
            raise UserError(f"config key '{key}': milestone steps must increase, got {shown(step)} after "
                            f"{shown(points[-1][0])}")
        points.append((step, value))
    return Schedule(points, milestones=True)


def parse_schedule(value: Any, key: str = "value") -> Optional[Schedule]:
    """Normalize a scheduled scalar to a :class:`Schedule` (None stays None); one line naming
    ``key`` for anything else (text, a bool, NaN, a number beyond a float, a malformed list)."""
    if value is None:
        return None
    if _is_list(value):
        items = list(value)
        if items and all(_is_list(v) for v in items):
            return _parse_milestones(items, key)
        if any(_is_list(v) for v in items) or len(items) != 4:
            raise UserError(
                f"config key '{key}': a schedule is [start_value, end_value, start_step, end_step] or "
                f"[[step, value], ...], got {shown(items)}"
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
        return Schedule([(s0, start), (s1, end)], milestones=False)
    if isinstance(value, bool):
        raise UserError(f"config key '{key}': expected a number or a schedule, got {shown(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"config key '{key}': expected a number or a schedule, got {shown(value)}") from None
    if not math.isfinite(v):
        raise UserError(f"config key '{key}': expected a finite number, got {shown(value)}")
    return Schedule([(0, v), (0, v)], milestones=False)


def plain_schedule(value: Any) -> Any:
    """A scheduled scalar as plain Python (a number or a list, milestones as lists of lists),
    detached from OmegaConf, so a representation can keep it without holding the config."""
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return [plain_schedule(v) for v in value]
    return value


def scheduled(value: Any, step: int, key: str = "value") -> Optional[float]:
    """Evaluate a scheduled scalar at ``step`` (see module docstring)."""
    sched = parse_schedule(value, key)
    if sched is None:
        return None
    return sched.at(step)


def scheduled_int(value: Any, step: int, key: str = "value", multiple: int = 1) -> Optional[int]:
    """A whole-number scheduled scalar (a resolution, a batch size, a level count) at ``step``:
    given values (a number, a milestone's value, a linear schedule's end values) as they are;
    values interpolated inside a linear ramp rounded down to a multiple of ``multiple`` (at least
    ``multiple``), so a ramp goes through a few sizes rather than every integer."""
    sched = parse_schedule(value, key)
    if sched is None:
        return None
    v = sched.at(step)
    if sched.is_between(step):
        return max(int(math.floor(v / multiple)) * multiple, multiple)
    return int(round(v))


def max_scheduled(value: Any, key: str = "value") -> Optional[float]:
    """The largest value a scheduled scalar takes (a linear ramp's values lie between its ends)."""
    sched = parse_schedule(value, key)
    return None if sched is None else max(sched.values)


def check_whole_schedule(value: Any, key: str, lo: int = 1) -> Optional[Schedule]:
    """A scheduled scalar whose given values are whole numbers ``>= lo`` (a size, a count)."""
    sched = parse_schedule(value, key)
    if sched is None:
        return None
    for v in sched.values:
        if v != int(v) or v < lo:
            raise UserError(f"config key '{key}' must be a whole number >= {lo} (or a schedule of them), "
                            f"got {shown(plain_schedule(value))}")
    return sched


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
            sched = parse_schedule(value, full)
            values = sched.values  # type: ignore[union-attr]
            if not all(0 <= s <= MAX_STEPS for s in sched.steps):  # type: ignore[union-attr]
                raise UserError(f"config key '{full}': schedule steps must lie within [0, {MAX_STEPS}], "
                                f"got {shown(plain_schedule(value))}")
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
    if sched is not None and min(sched.values) < lo:
        raise UserError(f"config key '{key}' must be >= {lo:g}, got {shown(value)}")
    return sched
