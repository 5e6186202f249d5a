"""Batches: input rows and ids, the manifest, both executors, failures, kill-and-resume, summary and gallery."""

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from threedistill.batch import read_batch_input, run_batch
from threedistill.cli import main
from threedistill.errors import UserError

# Tiny, fast rows: 16x16 renders, a small hash grid, no texture bake, a 4-frame turntable.
FAST = [
    "run.resolution=16", "representation.nerf.num_samples=16", "representation.nerf.n_levels=4",
    "representation.nerf.log2_hashmap_size=10", "representation.nerf.max_resolution=32",
    "export.mesh_resolution=24", "export.texture=false", "export.turntable_frames=4",
    "export.turntable_resolution=16", "guidance.guidance_scale=7.5", "run.preview_every=100",
]


def _overrides(prior, *extra):
    return [f"prior.name={prior}", *FAST, *extra]


def _manifest(out: Path):
    lines = (out / "batch.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must parse: the file is never half-written


# ---------------------------------------------------------------------------------------------
# Input rows
# ---------------------------------------------------------------------------------------------
def test_text_jsonl_and_csv_inputs_with_seeds(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na red cube\n\na blue sphere\na red cube\n")
    rows = read_batch_input(txt, seeds=2)
    assert [(r.prompt, r.seed) for r in rows] == [("a red cube", 0), ("a red cube", 1), ("a blue sphere", 0),
                                                 ("a blue sphere", 1)]  # the repeated line is one row
    assert len({r.id for r in rows}) == 4 and all(r.id.startswith(r.prompt.replace(" ", "-")) for r in rows)

    jl = tmp_path / "rows.jsonl"
    jl.write_text('{"prompt": "a red cube", "seed": 7, "preset": "vsd-nerf", "overrides": ["run.steps=5"]}\n'
                  '{"prompt": "a blue sphere", "overrides": {"run.steps": 9, "guidance.guidance_scale": 20}, "id": "ball"}\n')
    a, b = read_batch_input(jl, default_seed=3)
    assert (a.seed, a.presets, a.overrides) == (7, ["vsd-nerf"], ["run.steps=5"])
    assert (b.seed, b.overrides) == (3, ["run.steps=9", "guidance.guidance_scale=20"]) and b.id.startswith("ball-s3-")

    cs = tmp_path / "rows.csv"
    cs.write_text('prompt,seed,preset,overrides\n"a red cube, small",2,,run.steps=5 run.resolution=32\na green cone,,sds-gaussians,\n')
    c, d = read_batch_input(cs)
    assert (c.prompt, c.seed, c.presets, c.overrides) == ("a red cube, small", 2, [], ["run.steps=5", "run.resolution=32"])
    assert (d.seed, d.presets, d.overrides) == (0, ["sds-gaussians"], [])


def test_row_ids_are_stable_when_lines_move(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\na blue sphere\n")
    before = {r.prompt: r.id for r in read_batch_input(f)}
    f.write_text("a green cone\na blue sphere\n# moved\na red cube\n")
    after = {r.prompt: r.id for r in read_batch_input(f)}
    assert after["a red cube"] == before["a red cube"] and after["a blue sphere"] == before["a blue sphere"]
    jl = tmp_path / "r.jsonl"
    jl.write_text('{"prompt": "a red cube", "overrides": ["run.steps=5"]}\n')
    assert read_batch_input(jl)[0].id != before["a red cube"]  # other settings: another row


@pytest.mark.parametrize("name, text, needle", [
    ("bad.jsonl", '{"prompt": "a red cube"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"prompt": "a red cube", "color": "red"}\n', "unknown key(s) color"),
    ("bad.jsonl", '{"prompt": "a red cube", "seed": -1}\n', "'seed' must be a non-negative integer"),
    ("bad.jsonl", '{"prompt": "  "}\n', "needs a non-empty 'prompt'"),
    ("bad.jsonl", '{"prompt": "a", "id": "A B"}\n', "'id' must be a slug"),
    ("bad.csv", "text,seed\nhello,1\n", "header row with a 'prompt' column"),
    ("bad.csv", "prompt,seed\nhello,one\n", "bad.csv:2: 'seed' must be an integer"),
    ("empty.txt", "# nothing\n\n", "has no rows"),
])
def test_bad_input_files_are_one_line_errors(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        read_batch_input(f)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_input_and_bad_options_exit_nonzero(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) != 0
    assert "not found" in capsys.readouterr().err
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n")
    assert main(["batch", str(f), "--out", str(tmp_path / "o"), "--seeds", "0"]) != 0
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert main(["batch", str(f), "--out", str(tmp_path / "o"), "run.stepz=3"]) != 0  # batch-wide typo: nothing runs
    assert "run.stepz" in capsys.readouterr().err
    assert not (tmp_path / "o" / "batch.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Running batches
# ---------------------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(a["src"])
        elif tag == "a":
            self.refs.append(a["href"])


def _check_gallery(out: Path, n_images: int):
    page = (out / "index.html").read_text()
    p = _Links()
    p.feed(page)
    assert p.refs, page
    for ref in p.refs:  # every link and image opens from disk
        assert not ref.startswith(("http:", "https:", "/")), ref
        assert (out / ref).exists(), ref
    assert sum(r.endswith((".gif", ".png")) for r in p.refs) == n_images


def test_local_batch_with_two_workers_and_a_bad_row(tmp_path, tiny_sd_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red cube"}\n'
                    '{"prompt": "a blue sphere", "overrides": ["export.formats=[glb,ply]"]}\n'
                    '{"prompt": "a green cone", "overrides": ["run.stepz=3"]}\n'
                    '{"prompt": "a yellow torus", "preset": "no-such-preset"}\n')
    out = tmp_path / "out"
    args = ["batch", str(rows), "--out", str(out), "--workers", "2", "--threads", "1", "--no-progress",
            *_overrides(tiny_sd_path, "run.steps=3")]
    assert main(args) == 1  # two rows failed
    m = {e["prompt"]: e for e in _manifest(out)}
    assert [e["state"] for e in m.values()] == ["done", "done", "failed", "failed"]
    assert "run.stepz" in m["a green cone"]["error"] and m["a green cone"]["attempts"] == 0
    assert "no-such-preset" in m["a yellow torus"]["error"]
    for prompt in ("a red cube", "a blue sphere"):
        e = m[prompt]
        run = out / e["run_dir"]
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
        assert e["attempts"] == 1 and e["step"] == 3 and e["wall_s"] > 0
        assert e["history"][0]["start_step"] == 0 and e["history"][0]["outcome"] == "done"
        assert (out / e["outputs"]["glb"]).is_file() and (out / e["outputs"]["gif"]).is_file()
    # A row's overrides apply to that row only: the default formats are glb, obj and ply.
    assert "ply" in m["a blue sphere"]["outputs"] and "obj" not in m["a blue sphere"]["outputs"]
    assert {"glb", "obj", "ply"} <= set(m["a red cube"]["outputs"])
    summary = (out / "summary.md").read_text()
    assert "4 rows: 2 done, 2 failed" in summary and "run.stepz" in summary
    _check_gallery(out, n_images=2)
    # Rerun: nothing runs again; the failed rows are still failed, with their errors.
    before = {p: m[p]["history"] for p in m}
    assert main(args) == 1
    again = {e["prompt"]: e for e in _manifest(out)}
    assert {p: again[p]["history"] for p in again} == before


def test_shapes_rows_get_ground_truth_metrics(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\na teapot\n")
    totals = run_batch(f, tmp_path / "out", overrides=["run.steps=2", *FAST], workers=1, threads=2, progress=False)
    assert totals["done"] == 2 and totals["scored_rows"] == 1
    m = {e["prompt"]: e for e in _manifest(tmp_path / "out")}
    metrics = m["a red cube"]["metrics"]
    assert 0.0 <= metrics["iou"] <= 1.0 and metrics["predicted"] and m["a teapot"]["metrics"] is None
    assert "mean silhouette IoU" in (tmp_path / "out" / "summary.md").read_text()


def test_a_raising_row_is_retried_then_failed_alone(tmp_path, tiny_sd_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\nexplode a blue sphere\n")
    out = tmp_path / "out"
    totals = run_batch(f, out, overrides=_overrides(tiny_sd_path, "run.steps=2", "export.turntable=false"),
                       workers=1, threads=2, retries=2, progress=False, runner="batch_runners:raises_on_explode")
    assert (totals["done"], totals["failed"]) == (1, 1)
    bad = next(e for e in _manifest(out) if e["prompt"].startswith("explode"))
    assert bad["state"] == "failed" and bad["attempts"] == 3  # 1 + 2 retries
    assert bad["error"].startswith("RuntimeError: simulated fault")
    assert [h["outcome"] for h in bad["history"]] == ["failed"] * 3


def test_a_worker_killed_mid_row_fails_that_attempt_and_the_retry_runs(tmp_path, tiny_sd_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "out"
    totals = run_batch(f, out, overrides=_overrides(tiny_sd_path, "run.steps=2", "export.turntable=false"),
                       workers=1, threads=2, retries=1, progress=False, runner="batch_runners:worker_dies_once")
    assert totals["done"] == 2
    for e in _manifest(out):
        assert e["attempts"] == 2 and e["state"] == "done"
        assert "worker process died (killed by signal 9)" in e["history"][0]["error"]


def test_one_worker_per_gpu_each_seeing_only_its_own(tmp_path, monkeypatch):
    """The per-GPU split, on a CPU machine: the executor is told there are 2 GPUs (as
    torch.cuda.device_count() would say) and each worker process must see exactly one of them."""
    import threedistill.batch.executors as executors

    monkeypatch.setattr(executors, "visible_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the user's own restriction is respected
    f = tmp_path / "p.txt"
    f.write_text("".join(f"a red cube {i}\n" for i in range(6)))
    totals = run_batch(f, tmp_path / "out", progress=False, runner="batch_runners:report_visible_gpu")
    assert totals["done"] == 6
    seen = {(e["metrics"]["pid"], e["metrics"]["cuda_visible_devices"]) for e in _manifest(tmp_path / "out")}
    by_pid = {}
    for pid, gpu in seen:
        by_pid.setdefault(pid, set()).add(gpu)
    assert sorted(g for gpus in by_pid.values() for g in gpus) == ["3", "5"]  # 2 workers, one GPU each
    assert all(len(gpus) == 1 for gpus in by_pid.values())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # the batch process's own setting is untouched


def test_a_batch_killed_midway_resumes_without_rerunning_rows(tmp_path, tiny_sd_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\na blue sphere\na green cone\n")
    out = tmp_path / "out"
    overrides = _overrides(tiny_sd_path, "run.steps=40", "run.checkpoint_every=4", "export.turntable=false")
    args = ["batch", str(f), "--out", str(out), "--workers", "1", "--threads", "2", "--no-progress", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "threedistill.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it (SIGKILL: no clean-up) once a row is done and the next has a checkpoint (its JSON, written last)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "batch.jsonl").is_file():
                states = [e["state"] for e in _manifest(out)]
                running = [e for e in _manifest(out) if e["state"] == "running"]
                if "done" in states and running and list((out / running[0]["run_dir"] / "checkpoints").glob("step_*.json")):
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = {e["id"]: e for e in _manifest(out)}
    assert [e["state"] for e in at_kill.values()].count("done") >= 1
    assert any(e["state"] != "done" for e in at_kill.values())

    totals = run_batch(f, out, overrides=overrides, workers=1, threads=2, progress=False)
    assert totals["done"] == 3
    final = {e["id"]: e for e in _manifest(out)}
    assert final.keys() == at_kill.keys()
    for rid, e in final.items():
        assert e["state"] == "done" and e["step"] == 40
        assert sum(h["start_step"] == 0 for h in e["history"]) == 1, e["history"]  # never from scratch twice
        if at_kill[rid]["state"] == "done":
            assert e["history"] == at_kill[rid]["history"]  # finished rows were skipped
        elif at_kill[rid]["state"] == "running":
            assert e["history"][0]["outcome"] == "interrupted" and e["history"][1]["start_step"] >= 4
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def test_ctrl_c_checkpoints_the_running_row_and_exits_130(tmp_path, tiny_sd_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "out"
    overrides = _overrides(tiny_sd_path, "run.steps=200", "run.checkpoint_every=50", "export.turntable=false")
    proc = subprocess.Popen([sys.executable, "-m", "threedistill.cli", "batch", str(f), "--out", str(out),
                             "--workers", "1", "--threads", "2", "--no-progress", *overrides],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "batch.jsonl").is_file():
                running = [e for e in _manifest(out) if e["state"] == "running"]
                if running and (out / running[0]["run_dir"] / "metrics.jsonl").is_file():
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before Ctrl-C"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "run the same `threedistill batch` command again" in err
    rows = _manifest(out)
    assert not [e for e in rows if e["state"] == "running"]
    stopped = [e for e in rows if e["history"] and e["history"][-1]["outcome"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["state"] == "pending"
    step = stopped[0]["history"][-1]["end_step"]
    assert 0 < step < 200 and (out / stopped[0]["run_dir"] / "checkpoints" / f"step_{step:06d}.safetensors").is_file()


def test_ctrl_c_inside_a_finalizer_is_not_lost():
    """Python drops an exception raised in ``__del__``: a Ctrl-C that landed there used to vanish and
    the batch ran on to exit 0. The coordinator's handler turns it into a flag instead; a second
    Ctrl-C raises at once, and the previous handler is back afterwards."""
    from threedistill.batch import _ctrl_c_requests

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the finalizer

    # Python's own handler as the one before (a test that ran earlier in the session may have left
    # another installed: the second Ctrl-C gets whatever handler was there, by design).
    session_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        with _ctrl_c_requests() as ctrl_c:
            assert not ctrl_c()
            Finalized()  # collected at once
            assert ctrl_c()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is before
        # Without the handler the same Ctrl-C is swallowed by the finalizer: what the flag fixes.
        dropped = []
        hook, sys.unraisablehook = sys.unraisablehook, lambda u: dropped.append(u.exc_type)
        try:
            Finalized()
        finally:
            sys.unraisablehook = hook
        assert dropped == [KeyboardInterrupt]
    finally:
        signal.signal(signal.SIGINT, session_handler)


@pytest.mark.slow
def test_ray_executor_runs_a_batch(tmp_path, tiny_sd_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red cube"}\n{"prompt": "a blue sphere"}\n'
                    '{"prompt": "a green cone", "overrides": ["guidance.name=nope"]}\n')
    totals = run_batch(rows, out, overrides=_overrides(tiny_sd_path, "run.steps=2"), executor="ray", workers=2,
                       threads=1, progress=False)
    assert (totals["done"], totals["failed"]) == (2, 1)
    m = {e["prompt"]: e for e in _manifest(out)}
    assert "guidance.name" in m["a green cone"]["error"]
    for p in ("a red cube", "a blue sphere"):
        assert m[p]["history"][0]["worker"] == "ray" and m[p]["history"][0]["start_step"] == 0
        assert (out / m[p]["outputs"]["glb"]).is_file()
    _check_gallery(out, n_images=2)
