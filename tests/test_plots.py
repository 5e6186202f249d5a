"""A run's curves (threedistill.plots, ``threedistill plot``): the panels the figure has, the
smoothing, the PNG in the run folder, and the CLI's one-line errors."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from threedistill.cli import main
from threedistill.plots import curves_figure, moving_average, panel_titles, read_metrics, smoothing_window, write_curves
from threedistill.runs import RunFolder


def _rows(n=60, gaussians=False):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, n + 1):
        r = {"step": i, "loss": float(10 ** rng.uniform(1, 4)), "grad_norm": float(rng.uniform(5, 50)),
             "t": float(rng.integers(20, 980)), "lr": 0.01 * (1 - i / (2 * n)), "time_step": 0.2 + 0.01 * i}
        if gaussians:
            r["num_gaussians"] = 1000.0 + 10 * i
        rows.append(r)
    return rows


def _run(tmp_path, rows, eval_result=None, cut_line=False):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.config_path.write_text("run: {}\n")
    folder.update_status({"status": "finished", "prompt": "a red cube", "step": len(rows), "steps": len(rows)})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    folder.metrics_path.write_text(text + ('{"step": 99, "lo' if cut_line else ""))
    if eval_result is not None:
        folder.eval_path.write_text(json.dumps(eval_result))
    return folder


def test_panels_follow_the_data():
    fig = curves_figure(_rows())
    assert panel_titles(fig) == ["total loss (log scale)", "guidance gradient norm (model space)",
                                 "diffusion timestep t sampled", "learning rate (first parameter group)",
                                 "time per step"]
    ev = {"iou": 0.8, "color_error": 0.1, "view_consistency": 0.9, "predicted": "a red cube",
          "prompt_correct": True, "step": 60}
    titles = panel_titles(curves_figure(_rows(gaussians=True), ev))
    assert "number of Gaussians" in titles
    assert titles[-1] == "shapes-world evaluation at step 60, classified 'a red cube' (correct)"
    loss_ax = next(ax for ax in fig.axes if ax.get_title().startswith("total loss"))
    assert loss_ax.get_yscale() == "log" and loss_ax.get_xlabel() == "step" and loss_ax.get_ylabel() == "loss"
    # raw and smoothed lines, the smoothed one the trailing mean over the window
    raw, smooth = loss_ax.get_lines()
    y = np.array([r["loss"] for r in _rows()])
    w = smoothing_window(len(y))
    want = [y[max(0, i - w + 1):i + 1].mean() for i in range(len(y))]
    np.testing.assert_allclose(smooth.get_ydata(), want, rtol=1e-12)
    np.testing.assert_allclose(raw.get_ydata(), y)
    # a loss that does not swing keeps a linear axis
    flat = [dict(r, loss=5.0 + r["step"] * 0.01) for r in _rows()]
    ax = curves_figure(flat).axes[0]
    assert ax.get_yscale() == "linear" and ax.get_title() == "total loss"


def test_moving_average_skips_non_finite():
    assert moving_average([1.0, 3.0, float("nan"), 5.0], 2) == [1.0, 2.0, 2.0, 4.0]
    assert math.isnan(moving_average([float("inf")], 3)[0])


def test_write_curves_and_cli(tmp_path, capsys):
    folder = _run(tmp_path, _rows(30, gaussians=True), {"iou": 0.5, "color_error": 0.2, "step": 30}, cut_line=True)
    assert len(read_metrics(folder)) == 30  # the cut last line is skipped
    png = write_curves(folder)
    assert png == folder.curves_path
    w, h = Image.open(png).size
    assert w == 1100 and h > 900  # two columns of panels, four rows (loss .. evaluation)
    assert main(["plot", str(folder.path), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.strip() == f"curves: {tmp_path / 'c.png'}"
    assert Image.open(tmp_path / "c.png").size == (w, h)


@pytest.mark.parametrize("setup, words", [
    ("missing", "does not exist"),
    ("not_a_run", "not a threedistill run folder"),
    ("empty", "no metrics yet"),
    ("only_cut_line", "no metrics yet"),
    ("bad_out", "must end in .png"),
])
def test_cli_plot_errors_are_one_line(setup, words, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["plot", str(run)]
    if setup == "not_a_run":
        run.mkdir()
    elif setup in ("empty", "only_cut_line"):
        folder = _run(tmp_path, [])
        if setup == "only_cut_line":
            folder.metrics_path.write_text('{"step": 1, "lo')
    elif setup == "bad_out":
        _run(tmp_path, _rows(5))
        argv += ["--out", str(tmp_path / "c.jpg")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not RunFolder(run).curves_path.exists() and not (tmp_path / "c.jpg").exists()
