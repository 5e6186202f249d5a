"""The end of a batch: ``summary.md`` (a table per row, totals, ground-truth metrics for
shapes-world rows) and ``index.html``, a gallery that opens from disk (relative links only, no
scripts, no network): per row the turntable GIF (or the last preview), links to the meshes and the
run folder, state, attempts, time and the error of a failed row."""

from __future__ import annotations

import html
from typing import Any, Dict, List, Optional

from pathlib import Path

from threedistill.atomic import atomic_write_text
from threedistill.batch.manifest import Manifest
from threedistill.runs import RunFolder
from threedistill.text import format_duration

MESH_KEYS = ("glb", "obj", "ply", "splat")


def _metrics_cells(m: Optional[Dict[str, Any]]) -> List[str]:
    if not m or "iou" not in m:
        return ["", "", ""]
    return [f"{m['iou']:.3f}", f"{m['color_error']:.3f}",
            f"{m['predicted']} ({'right' if m['prompt_correct'] else 'wrong'})"]


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def shown_state(batch_dir: Path, row: Dict[str, Any]) -> str:
    """A row's state as the report shows it: the manifest's, except that a ``running`` row whose
    run (its refine stage once that started) reads as interrupted (its process is gone) is
    ``interrupted``."""
    if row["state"] != "running":
        return row["state"]
    folder = RunFolder(Path(batch_dir) / row["run_dir"])
    stage = folder.refine if folder.refine.has_status() else folder
    return "interrupted" if stage.status() == "interrupted" else "running"


def batch_totals(rows: List[Dict[str, Any]], wall_s: Optional[float]) -> Dict[str, Any]:
    done = [r for r in rows if r["state"] == "done"]
    scored = [r["metrics"] for r in done if r.get("metrics") and "iou" in r["metrics"]]
    out: Dict[str, Any] = {s: sum(r["state"] == s for r in rows) for s in ("done", "failed", "pending", "running")}
    out["rows"] = len(rows)
    out["row_time_s"] = round(sum(r.get("wall_s", 0.0) for r in rows), 1)
    if wall_s:
        out["batch_wall_s"] = round(wall_s, 1)
    if scored:
        out["mean_iou"] = round(sum(m["iou"] for m in scored) / len(scored), 4)
        out["mean_color_error"] = round(sum(m["color_error"] for m in scored) / len(scored), 4)
        out["prompt_accuracy"] = round(sum(bool(m["prompt_correct"]) for m in scored) / len(scored), 4)
        out["scored_rows"] = len(scored)
    return out


def write_summary(manifest: Manifest, title: str, wall_s: Optional[float] = None) -> Dict[str, Any]:
    rows = manifest.rows()
    t = batch_totals(rows, wall_s)
    out = manifest.path.parent
    lines = [f"# Batch: {_md_escape(title)}", "",
             f"{t['rows']} rows: {t['done']} done, {t['failed']} failed, {t['pending'] + t['running']} not finished. "
             f"Row time {format_duration(t['row_time_s'])}"
             + (f", this session's wall time {format_duration(t['batch_wall_s'])}" if "batch_wall_s" in t else "")
             + ".", ""]
    if "mean_iou" in t:
        lines += [f"Shapes-world ground truth over {t['scored_rows']} finished rows: mean silhouette IoU "
                  f"{t['mean_iou']:.3f}, mean color error {t['mean_color_error']:.3f}, "
                  f"prompt accuracy {t['prompt_accuracy']:.2f}.", ""]
    lines += ["| id | prompt | seed | state | attempts | steps | time | IoU | color err | classified as | mesh | error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = r["outputs"].get("glb") or next((r["outputs"][k] for k in MESH_KEYS if k in r["outputs"]), "")
        cells = [r["id"], _md_escape(r["prompt"]), str(r["seed"]), shown_state(out, r), str(r["attempts"]), str(r.get("step", 0)),
                 format_duration(r.get("wall_s", 0.0)), *_metrics_cells(r.get("metrics")),
                 f"[{mesh.split('/')[-1]}]({mesh})" if mesh else "", _md_escape(r.get("error") or "")]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return t


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.4em} .totals{margin-bottom:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.85em}
.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#fff;display:block}
.noimg{width:100%;aspect-ratio:1;display:flex;align-items:center;justify-content:center;color:#999;background:#f0f0f0}
.state{font-weight:600;padding:1px 6px;border-radius:4px;color:#fff}
.done{background:#2e7d32}.failed{background:#c62828}.pending{background:#757575}.running{background:#1565c0}
.interrupted{background:#ef6c00}
.prompt{font-weight:600;margin:6px 0 2px} .err{color:#c62828;word-break:break-word} a{color:#1565c0}
"""


def write_gallery(manifest: Manifest, title: str, wall_s: Optional[float] = None) -> None:
    rows = manifest.rows()
    t = batch_totals(rows, wall_s)
    e = html.escape
    cards = []
    for r in rows:
        o = r["outputs"]
        pic = o.get("gif") or o.get("preview")
        img = f'<img src="{e(pic)}" alt="{e(r["prompt"])}" loading="lazy">' if pic else '<div class="noimg">no image</div>'
        links = [f'<a href="{e(o[k])}">{k.upper()}</a>' for k in MESH_KEYS if k in o]
        if "turntable" in o:
            links.append(f'<a href="{e(o["turntable"])}">video</a>')
        if (manifest.path.parent / r["run_dir"]).is_dir():
            links.append(f'<a href="{e(r["run_dir"])}/">folder</a>')
        m = r.get("metrics") if r.get("metrics") and "iou" in r["metrics"] else None
        metric = (f'<div>IoU {m["iou"]:.3f} · color err {m["color_error"]:.3f} · '
                  f'{e(m["predicted"])} ({"right" if m["prompt_correct"] else "wrong"})</div>') if m else ""
        err = f'<div class="err">{e(r["error"])}</div>' if r.get("error") else ""
        state = shown_state(manifest.path.parent, r)
        cards.append(
            f'<div class="card" id="{e(r["id"])}">{img}<div class="prompt">{e(r["prompt"])}</div>'
            f'<div><span class="state {e(state)}">{e(state)}</span> seed {r["seed"]} · '
            f'{format_duration(r.get("wall_s", 0.0))} · {r["attempts"]} attempt(s)</div>{metric}'
            f'<div>{" · ".join(links)}</div>{err}</div>')
    totals = (f'{t["rows"]} rows: {t["done"]} done, {t["failed"]} failed, {t["pending"] + t["running"]} not finished; '
              f'row time {format_duration(t["row_time_s"])}')
    if "mean_iou" in t:
        totals += f'; mean IoU {t["mean_iou"]:.3f}, prompt accuracy {t["prompt_accuracy"]:.2f}'
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<style>{_CSS}</style></head><body><h1>{e(title)}</h1><div class="totals">{e(totals)}. '
            f'<a href="summary.md">summary.md</a> · <a href="batch.jsonl">batch.jsonl</a></div>'
            f'<div class="grid">\n' + "\n".join(cards) + "\n</div></body></html>\n")
    atomic_write_text(manifest.path.parent / "index.html", page)
