"""``batch.jsonl``: one line per row with its state, attempts, timings, outputs and metrics.

Only the batch's coordinator writes it, and every write replaces the whole file atomically
(temporary file + rename), so a batch killed at any moment leaves the previous complete manifest.
States: ``pending`` -> ``running`` -> ``done`` | ``failed`` (with the error). A row found
``running`` when a batch starts was interrupted: it goes back to ``pending`` and its run resumes
from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List

from threedistill.atomic import atomic_write_text
from threedistill.batch.rows import BatchRow
from threedistill.errors import UserError
from threedistill.shapes.evaluate import upgrade_metric_names

MANIFEST = "batch.jsonl"
STATES = ("pending", "running", "done", "failed")


def _now() -> float:
    return round(time.time(), 3)


class Manifest:
    def __init__(self, path: Path, entries: Dict[str, Dict[str, Any]]):
        self.path = path
        self.entries = entries  # id -> entry, in input order

    @classmethod
    def open(cls, out_dir: Path, rows: Iterable[BatchRow]) -> "Manifest":
        """The manifest in ``out_dir`` merged with ``rows``: known rows keep their record (a
        ``running`` one becomes ``pending``), new rows are added as ``pending``; rows of earlier
        inputs that this input no longer has are kept at the end, untouched."""
        path = Path(out_dir) / MANIFEST
        old: Dict[str, Dict[str, Any]] = {}
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                    e["metrics"] = upgrade_metric_names(e.get("metrics"))
                    old[e["id"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{n}: not a manifest entry; move the file away to start the batch afresh") from None
        entries: Dict[str, Dict[str, Any]] = {}
        for row in rows:
            e = old.pop(row.id, None)
            if e is None:
                e = {**row.to_dict(), "run_dir": row.id, "state": "pending", "attempts": 0, "error": None,
                     "history": [], "wall_s": 0.0, "step": 0, "outputs": {}, "metrics": None}
            else:
                e["line"] = row.line
                if e.get("state") == "running":
                    e["state"] = "pending"
                    if e.get("history"):
                        e["history"][-1].setdefault("outcome", "interrupted")
            entries[row.id] = e
        for rid, e in old.items():  # rows from an earlier input file: kept as they were
            e["stale"] = True
            entries[rid] = e
        m = cls(path, entries)
        m.save()
        return m

    def save(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries.values()))

    # -- state changes (each saves) -------------------------------------------------------------
    def start(self, rid: str, worker: str, start_step: int | None = None) -> None:
        e = self.entries[rid]
        e["state"] = "running"
        e["attempts"] += 1
        e["error"] = None
        e["history"].append({"attempt": e["attempts"], "worker": worker, "start_step": start_step, "started": _now()})
        self.save()

    def finish(self, rid: str, result: Dict[str, Any]) -> None:
        e = self.entries[rid]
        if e["history"] and result.get("start_step") is not None:
            e["history"][-1]["start_step"] = result["start_step"]
        self._close_attempt(e, "done" if result["status"] == "finished" else "stopped", result.get("step"))
        e["state"] = "done" if result["status"] == "finished" else "pending"
        e["step"] = result.get("step", e["step"])
        e["outputs"] = result.get("outputs", {})
        e["metrics"] = result.get("metrics")
        e["error"] = result.get("eval_error")
        self.save()

    def fail(self, rid: str, error: str, final: bool) -> None:
        """An attempt failed; ``final``: no attempt is left, the row is ``failed``."""
        e = self.entries[rid]
        if e["history"] and "outcome" not in e["history"][-1]:
            self._close_attempt(e, "failed", None)
            e["history"][-1]["error"] = error
        e["state"] = "failed" if final else "pending"
        e["error"] = error
        self.save()

    def reject(self, rid: str, error: str) -> None:
        """The row cannot run at all (a bad preset or override): failed without an attempt."""
        e = self.entries[rid]
        e["state"] = "failed"
        e["error"] = error
        self.save()

    def requeue(self, rid: str) -> None:
        """A running row the batch is leaving (Ctrl-C): pending again, resumable."""
        e = self.entries[rid]
        if e["history"] and "outcome" not in e["history"][-1]:
            self._close_attempt(e, "interrupted", None)
        e["state"] = "pending"
        self.save()

    @staticmethod
    def _close_attempt(e: Dict[str, Any], outcome: str, step) -> None:
        if not e["history"]:
            return
        h = e["history"][-1]
        h["outcome"] = outcome
        h["ended"] = _now()
        h["wall_s"] = round(h["ended"] - h["started"], 2)
        if step is not None:
            h["end_step"] = step
        e["wall_s"] = round(sum(x.get("wall_s", 0.0) for x in e["history"]), 2)

    # -- queries --------------------------------------------------------------------------------
    def rows(self, state: str | None = None, include_stale: bool = False) -> List[Dict[str, Any]]:
        return [e for e in self.entries.values()
                if (state is None or e["state"] == state) and (include_stale or not e.get("stale"))]

    def counts(self) -> Dict[str, int]:
        c = {s: 0 for s in STATES}
        for e in self.rows():
            c[e["state"]] += 1
        return c
