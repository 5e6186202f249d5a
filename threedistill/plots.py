"""A run's curves as one figure: ``threedistill plot RUN_DIR`` and the web app's live curves.

:func:`read_metrics` reads a run folder's ``metrics.jsonl`` (one JSON object per step; a line cut
short by a kill is skipped), :func:`curves_figure` lays the series out as panels (loss raw and
smoothed, the guidance's gradient norm, the timestep t, the learning rate, the Gaussians count
when the run has one, the time per step, and a shapes-world run's evaluation when ``eval.json``
exists), :func:`write_curves` renders it to ``curves.png`` (:attr:`RunFolder.curves_path`).
matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from threedistill.atomic import atomic_write
from threedistill.errors import UserError
from threedistill.runs import RunFolder

def smoothing_window(n: int) -> int:
    """Width (steps) of the moving average drawn over ``n`` raw values: about 1/20 of them, 5 to 200."""
    return int(min(200, max(5, n // 20))) if n >= 10 else 1


def read_metrics(folder: RunFolder) -> List[Dict[str, Any]]:
    """The run's metric lines, in step order (a kill may leave a cut line: it is skipped). Raises
    :class:`UserError` when the folder is not a run, or it has no metrics yet."""
    if not folder.path.is_dir():
        raise UserError(f"run folder '{folder.path}' does not exist")
    if not folder.metrics_path.is_file() and not folder.is_run():
        raise UserError(f"'{folder.path}' is not a threedistill run folder (no {RunFolder.CONFIG})")
    rows: List[Dict[str, Any]] = []
    if folder.metrics_path.is_file():
        for line in folder.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
    if not rows:
        raise UserError(f"run '{folder.path}' has no metrics yet ({RunFolder.METRICS} is empty or missing); "
                        "plot it once it has run a step")
    rows.sort(key=lambda r: r["step"])
    return rows


def read_eval(folder: RunFolder) -> Optional[Dict[str, Any]]:
    """``eval.json`` (``threedistill eval``) as a dict, or None when it is missing or unreadable."""
    try:
        data = json.loads(folder.eval_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over the last ``window`` finite values (NaN-free output where any value was seen)."""
    out: List[float] = []
    buf: List[float] = []
    for v in values:
        if v is not None and math.isfinite(v):
            buf.append(float(v))
            if len(buf) > window:
                buf.pop(0)
        out.append(sum(buf) / len(buf) if buf else float("nan"))
    return out


def _series(rows: List[Dict[str, Any]], key: str):
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _swings(values: Sequence[float]) -> bool:
    """Whether a positive series spans more than a factor 30 (then a log axis reads better)."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return len(pos) == len(values) and len(pos) > 1 and max(pos) / min(pos) > 30


#: Evaluation entries drawn as bars (all within [0, 1]) and their labels.
EVAL_BARS = (("iou", "IoU"), ("color_error", "color error"), ("view_consistency", "view consistency"))


def curves_figure(rows: List[Dict[str, Any]], eval_result: Optional[Dict[str, Any]] = None, title: str = ""):
    """A matplotlib ``Figure`` of the run's curves (see the module docstring); panels without data
    (no Gaussians, no evaluation) are left out. Each panel's title names what it shows."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels: List[str] = ["loss", "grad_norm", "t", "lr"]
    steps_g, gauss = _series(rows, "num_gaussians")
    if gauss:
        panels.append("num_gaussians")
    panels.append("time_step")
    if eval_result is not None and any(isinstance(eval_result.get(k), (int, float)) for k, _ in EVAL_BARS):
        panels.append("eval")
    ncols = 2
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(11, 3.0 * nrows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if title:
        fig.suptitle(title, fontsize=13)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        if panel == "eval":
            _eval_panel(ax, eval_result)
            continue
        if panel == "num_gaussians":
            x, y = steps_g, gauss
        else:
            x, y = _series(rows, panel)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if panel == "loss":
            w = smoothing_window(len(y))
            ax.plot(x, y, color="tab:blue", alpha=0.35, linewidth=0.8, label="raw")
            if w > 1:
                ax.plot(x, moving_average(y, w), color="tab:blue", linewidth=2.0, label=f"mean of last {w} steps")
            if _swings(y):
                ax.set_yscale("log")
            ax.set_title("total loss" + (" (log scale)" if _swings(y) else ""))
            ax.set_ylabel("loss")
            ax.legend(loc="upper right", fontsize=8)
        elif panel == "grad_norm":
            _noisy_series(ax, x, y, raw=("tab:orange", 0.35), mean=("tab:orange", 2.0))
            ax.set_title("guidance gradient norm (model space)")
            ax.set_ylabel("||w(t) g||")
        elif panel == "t":
            ax.scatter(x, y, s=4, color="tab:green")
            ax.set_title("diffusion timestep t sampled")
            ax.set_ylabel("t (of 1000)")
        elif panel == "lr":
            ax.plot(x, y, color="tab:purple")
            ax.set_title("learning rate (first parameter group)")
            ax.set_ylabel("lr")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        elif panel == "num_gaussians":
            ax.plot(x, y, color="tab:red")
            ax.set_title("number of Gaussians")
            ax.set_ylabel("Gaussians")
        elif panel == "time_step":
            _noisy_series(ax, x, y, raw=("tab:gray", 0.5), mean=("black", 1.5))
            ax.set_title("time per step")
            ax.set_ylabel("seconds")
    return fig


def _noisy_series(ax, x, y, raw, mean) -> None:
    """A noisy per-step series: the raw values faint (``raw`` = color, alpha), their trailing mean
    over it once there are 10 steps (``mean`` = color, line width), log scale when it swings."""
    ax.plot(x, y, color=raw[0], alpha=raw[1], linewidth=0.8)
    if len(y) >= 10:
        ax.plot(x, moving_average(y, smoothing_window(len(y))), color=mean[0], linewidth=mean[1])
    if _swings(y):
        ax.set_yscale("log")


def _eval_panel(ax, result: Dict[str, Any]) -> None:
    names, values = [], []
    for key, label in EVAL_BARS:
        v = result.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            names.append(label)
            values.append(float(v))
    bars = ax.bar(names, values, color=["tab:green", "tab:red", "tab:blue"][: len(values)])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.1)
    verdict = ""
    if "predicted" in result:
        verdict = f", classified '{result['predicted']}' ({'correct' if result.get('prompt_correct') else 'wrong'})"
    ax.set_title(f"shapes-world evaluation at step {result.get('step', '?')}{verdict}", fontsize=10)
    ax.set_ylabel("score (0..1)")


def panel_titles(fig) -> List[str]:
    """The titles of the figure's visible panels (for tests and logs)."""
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def write_curves(run_dir: Union[str, Path, RunFolder], out: Optional[Union[str, Path]] = None) -> Path:
    """Render the run's curves to ``out`` (default the run's ``curves.png``) atomically; returns the path."""
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    rows = read_metrics(folder)
    status = folder.read_status()
    prompt = status.get("prompt", "")
    title = f"{folder.name}: \"{prompt}\", step {rows[-1]['step']}" + (f" of {status['steps']}" if status.get("steps") else "")
    fig = curves_figure(rows, read_eval(folder), title=title)
    path = Path(out) if out is not None else folder.curves_path
    if path.suffix.lower() != ".png":
        raise UserError(f"--out '{path}' must end in .png")
    if not path.parent.is_dir():
        raise UserError(f"--out '{path}': folder '{path.parent}' does not exist")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


__all__ = ["read_metrics", "read_eval", "moving_average", "smoothing_window", "curves_figure", "panel_titles",
           "write_curves", "EVAL_BARS"]
