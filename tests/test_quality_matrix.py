"""The quality matrix's ablation bookkeeping (benchmarks/quality_matrix.py): variants become cells
named <preset>+<variant>, and the ablation table shows each variant against its preset."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_matrix as qm  # noqa: E402


def test_parse_variants_splits_name_and_overrides():
    v = qm.parse_variants(['perp=guidance.perp_neg=true camera.batch_size=2', 'lr=optim.lr=0.02'])
    assert v == {"perp": ["guidance.perp_neg=true", "camera.batch_size=2"], "lr": ["optim.lr=0.02"]}
    for bad in ["noequals", "=x=1", "a/b=x=1", "name="]:
        with pytest.raises(SystemExit):
            qm.parse_variants([bad])


def _write(out: Path, cell: str, **summary):
    (out / cell).mkdir(parents=True)
    (out / cell / "results.json").write_text(json.dumps({"summary": {"all": {"runs": 2, **summary}}, "runs": []}))


def test_ablation_table_reports_variant_minus_preset(tmp_path):
    _write(tmp_path, "sds-nerf", iou=0.80, size=1.10, haze=0.05)
    _write(tmp_path, "sds-nerf+perp", iou=0.86, size=1.00, haze=0.02)
    table = qm.ablation(tmp_path, ["sds-nerf"], {"perp": ["guidance.perp_neg=true"], "missing": ["x=1"]})
    row = next(l for l in table.splitlines() if "| perp |" in l)
    assert "0.860 (+0.060)" in row and "1.00 (-0.10)" in row and "0.020 (-0.030)" in row
    assert "`guidance.perp_neg=true`" in row
    missing = next(l for l in table.splitlines() if "| missing |" in l)
    assert "0.860" not in missing and "–" in missing
    assert (tmp_path / "ablation.md").read_text() == table


def test_variant_cells_write_to_their_own_folder(tmp_path):
    cmd = qm.cell_command("sds-nerf", tmp_path, ["a red cube"], [0], ["guidance.perp_neg=true"], folder="sds-nerf+perp")
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "sds-nerf+perp")
    assert cmd[cmd.index("--config") + 1] == "sds-nerf"
    assert cmd[-1] == "guidance.perp_neg=true"


def test_plan_has_one_training_job_per_run_then_the_cells_scoring(tmp_path):
    cells = {"sds-nerf": ("sds-nerf", [0, 1], ["a=1"]), "sds-nerf+v": ("sds-nerf", [0], ["a=1", "b=2"])}
    jobs = qm.plan_jobs(cells, ["a red cube", "a blue sphere"], tmp_path)
    assert [j.name for j in jobs] == [
        "sds-nerf/a-red-cube-seed0", "sds-nerf/a-red-cube-seed1", "sds-nerf/a-blue-sphere-seed0",
        "sds-nerf/a-blue-sphere-seed1", "sds-nerf/score",
        "sds-nerf+v/a-red-cube-seed0", "sds-nerf+v/a-blue-sphere-seed0", "sds-nerf+v/score"]
    run, score = jobs[1], jobs[4]
    assert "--runs-only" in run.cmd and "--runs-only" not in score.cmd
    assert run.cmd[run.cmd.index("--out") + 1] == str(tmp_path / "sds-nerf")
    assert run.cmd[run.cmd.index("--seeds") + 1:run.cmd.index("--prompts")] == ["1"]
    assert run.cmd[run.cmd.index("--prompts") + 1:run.cmd.index("--")] == ["a red cube"]
    assert score.cmd[score.cmd.index("--prompts") + 1:score.cmd.index("--")] == ["a red cube", "a blue sphere"]
    assert score.cmd[score.cmd.index("--seeds") + 1:score.cmd.index("--prompts")] == ["0", "1"]
    v = jobs[-1]
    assert v.cmd[v.cmd.index("--out") + 1] == str(tmp_path / "sds-nerf+v") and v.cmd[-2:] == ["a=1", "b=2"]
    assert v.cmd[v.cmd.index("--config") + 1] == "sds-nerf" and v.cell == "sds-nerf+v" and v.scores_cell


class _FakeProcs:
    """A stand-in for subprocess.Popen over ``jobs``: each process ends after ``polls`` polls,
    exit code 1 for the jobs named in ``failing`` and 0 otherwise; records start order and the
    most processes alive at once."""

    def __init__(self, jobs, failing=(), polls=2):
        self.codes = {j.name: (1 if j.name in failing else 0) for j in jobs}
        self.names = {tuple(j.cmd): j.name for j in jobs}
        self.polls, self.started, self.alive, self.most = polls, [], 0, 0

    def __call__(self, cmd, env=None, stdout=None, stderr=None):
        fake = self
        name = fake.names[tuple(cmd)]
        fake.started.append(name)
        fake.alive += 1
        fake.most = max(fake.most, fake.alive)
        assert env["OMP_NUM_THREADS"] == "1"

        class P:
            left = fake.polls

            def poll(self):
                P.left -= 1
                if P.left > 0:
                    return None
                if P.left == 0:
                    fake.alive -= 1
                return fake.codes[name]
        return P()


def _run_fake(tmp_path, cells, prompts, lanes, failing=()):
    jobs = qm.plan_jobs(cells, prompts, tmp_path)
    procs = _FakeProcs(jobs, failing)
    codes = qm.run_jobs(jobs, lanes, tmp_path / "logs", popen=procs, poll_s=0.0)
    return jobs, procs, codes


def test_jobs_fill_the_lanes_and_each_cell_is_scored_after_its_runs(tmp_path):
    cells = {"a": ("sds-nerf", [0], []), "b": ("vsd-nerf", [0], [])}
    prompts = ["a red cube", "a blue sphere", "a red mug"]
    jobs, procs, codes = _run_fake(tmp_path, cells, prompts, lanes=2)
    assert procs.most == 2 and sorted(procs.started) == sorted(j.name for j in jobs)
    assert all(c == 0 for c in codes.values()) and len(codes) == len(jobs)
    for cell in cells:  # the scoring starts after every run of its cell has started (and ended)
        order = procs.started
        assert all(order.index(f"{cell}/score") > order.index(j.name) for j in jobs if j.cell == cell and not j.scores_cell)
    # the second cell's runs did not wait for the first cell's scoring
    assert procs.started.index("b/a-red-cube-seed0") < procs.started.index("a/score")
    assert (tmp_path / "logs" / "a__a-red-cube-seed0.log").is_file()


def test_a_failed_run_skips_its_cells_scoring_only(tmp_path):
    cells = {"a": ("sds-nerf", [0], []), "b": ("vsd-nerf", [0], [])}
    jobs, procs, codes = _run_fake(tmp_path, cells, ["a red cube", "a blue sphere"], lanes=3,
                                   failing={"a/a-blue-sphere-seed0"})
    assert codes["a/a-blue-sphere-seed0"] == 1 and codes["a/score"] == -1 and "a/score" not in procs.started
    assert codes["b/score"] == 0 and "b/score" in procs.started and procs.most <= 3


def test_runs_only_trains_without_scoring_and_the_plain_call_scores_without_retraining(tmp_path, monkeypatch):
    """shapes_quality.py --runs-only trains the run and writes no results; the plain call over the
    same folder then scores it (results.json) and does not train it again."""
    import shapes_quality as sq

    from threedistill.runs import RunFolder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--out", str(tmp_path), "--seeds", "0", "--prompts", "a red cube", "--device", "cpu", "--",
            "run.steps=2", "run.resolution=16", "export.formats=[]",
            "export.splat=false", "representation.nerf.num_samples=8"]
    assert sq.main(["--runs-only", *args]) == 0
    run = RunFolder(tmp_path / "a-red-cube-seed0")
    assert run.is_finished() and not (tmp_path / "results.json").exists() and not run.eval_path.exists()
    before = {f.name: f.stat().st_mtime_ns for f in run.checkpoints_dir.iterdir()}
    assert run.latest_checkpoint() == 2 and before
    assert sq.main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["prompt"], r["seed"], r["steps"]) for r in rows] == [("a red cube", 0, 2)]
    assert 0.0 <= rows[0]["iou"] <= 1.0 and run.eval_path.is_file()
    assert {f.name: f.stat().st_mtime_ns for f in run.checkpoints_dir.iterdir()} == before
