"""Batch input: a text file (one prompt per line), a JSONL or a CSV file, expanded over seeds into
rows with stable ids.

* ``.txt`` (any other suffix): one prompt per line; blank lines and ``#`` comments are skipped.
* ``.jsonl``: one object per line, ``{"prompt": ..., "seed": 3, "preset": "vsd-nerf",
  "overrides": ["run.steps=400"]}``; ``preset`` may be a list (merged in order, after the batch's own
  ``--config``), ``overrides`` a list of ``key=value`` strings or a ``{key: value}`` object, ``id``
  an optional name for the row's folder.
* ``.csv``: a header row with ``prompt`` and optionally ``seed``, ``preset``, ``overrides``
  (space-separated ``key=value``), ``id``.

A row's id (and its run folder's name) depends only on what the row asks for (prompt, seed,
preset, overrides), not on its line number, so inserting or reordering lines keeps every finished
row's folder; ``--seeds N`` gives each input row N rows with seeds ``seed .. seed + N - 1`` (``seed``
is the row's own, else the batch's ``run.seed``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from threedistill.runs import slugify
from threedistill.errors import UserError

ROW_KEYS = {"prompt", "seed", "preset", "overrides", "id"}


@dataclass
class BatchRow:
    id: str
    prompt: str
    seed: int
    presets: List[str] = field(default_factory=list)  # the row's own presets (after the batch's --config)
    overrides: List[str] = field(default_factory=list)  # the row's own key=value (after the batch's)
    line: int = 0  # where it came from in the input file (1-based)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _overrides_of(value: Any, where: str) -> List[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{where}: 'overrides' must be a list of key=value strings or an object, got {value!r}")


def _presets_of(value: Any, where: str) -> List[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{where}: 'preset' must be a preset name or a list of them, got {value!r}")


def _seed_of(value: Any, where: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: 'seed' must be an integer, got {value!r}") from None
    if seed < 0 or str(seed) != str(value).strip():
        raise UserError(f"{where}: 'seed' must be a non-negative integer, got {value!r}")
    return seed


def _record(obj: Dict[str, Any], where: str) -> Dict[str, Any]:
    unknown = set(obj) - ROW_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(ROW_KEYS))})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: a row needs a non-empty 'prompt'")
    rid = obj.get("id")
    if rid is not None and (not isinstance(rid, str) or slugify(rid) != rid):
        raise UserError(f"{where}: 'id' must be a slug (lower-case letters, digits and '-'), got {rid!r}")
    return {"prompt": prompt.strip(), "seed": _seed_of(obj.get("seed"), where),
            "presets": _presets_of(obj.get("preset"), where), "overrides": _overrides_of(obj.get("overrides"), where),
            "id": rid}


def _read_records(path: Path) -> List[tuple[int, Dict[str, Any]]]:
    if not path.is_file():
        raise UserError(f"batch input '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"batch input '{path}' is not UTF-8 text") from None
    records = []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object with a 'prompt'")
            records.append((n, _record(obj, f"{path}:{n}")))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "prompt" not in [f.strip() for f in reader.fieldnames]:
            raise UserError(f"{path}: a CSV batch needs a header row with a 'prompt' column")
        for n, obj in enumerate(reader, 2):
            obj = {k.strip(): (v or "").strip() for k, v in obj.items() if k is not None}
            obj = {k: v for k, v in obj.items() if v != "" or k == "prompt"}
            records.append((n, _record(obj, f"{path}:{n}")))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.strip().startswith("#"):
                records.append((n, _record({"prompt": line}, f"{path}:{n}")))
    if not records:
        raise UserError(f"batch input '{path}' has no rows (one prompt per line, or JSONL/CSV rows with a 'prompt')")
    return records


def row_id(prompt: str, seed: int, presets: List[str], overrides: List[str], name: Optional[str] = None) -> str:
    """``<slug>-s<seed>-<hash>``: readable, and the same for the same request wherever it sits."""
    digest = hashlib.sha1(json.dumps([prompt, seed, presets, overrides]).encode()).hexdigest()[:6]
    return f"{name or slugify(prompt, 40)}-s{seed}-{digest}"


def read_batch_input(path: str | Path, seeds: int = 1, default_seed: int = 0) -> List[BatchRow]:
    """The rows of a batch input file, each input row repeated over ``seeds`` seeds (from its own
    ``seed``, else ``default_seed``). Identical rows (same id) are kept once."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    path = Path(path)
    rows: List[BatchRow] = []
    seen: Dict[str, int] = {}
    for n, rec in _read_records(path):
        base = rec["seed"] if rec["seed"] is not None else default_seed
        for k in range(seeds):
            seed = base + k
            rid = row_id(rec["prompt"], seed, rec["presets"], rec["overrides"], rec["id"])
            if rid in seen:
                if rec["id"] is not None:
                    raise UserError(f"{path}:{n}: id '{rec['id']}' is used by line {seen[rid]} too")
                continue
            seen[rid] = n
            rows.append(BatchRow(rid, rec["prompt"], seed, rec["presets"], rec["overrides"], n))
    return rows
