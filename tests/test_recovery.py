"""Runs that survive their process: checkpoints that do not load are skipped for the previous one,
temp files a killed write left are removed, and a run whose process died reads as interrupted
(through RunFolder, the app's history, the CLI and the batch report) while a live one reads as
running."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from threedistill.atomic import atomic_path, is_temp_name
from threedistill.checkpoint import checkpoint_paths
from threedistill.cli import main
from threedistill.config import load_config
from threedistill.distill import Callback, Distiller
from threedistill.errors import UserError
from threedistill.runs import HEARTBEAT_STALE_S, RunFolder, runner_alive

FAST = ["run.resolution=32", "representation.nerf.num_samples=16", "representation.nerf.n_levels=4",
        "representation.nerf.log2_hashmap_size=10", "representation.nerf.max_resolution=32",
        "export.formats=[]", "export.turntable=false", "run.progress=false", "guidance.guidance_scale=7.5"]


def _cfg(prior_path, out, *extra):
    return load_config(overrides=[f"prior.name={prior_path}", "run.prompt=a red cube", f"run.out_dir={out}",
                                  "run.name=r", *FAST, *extra])


@pytest.fixture(scope="module")
def trained(tiny_sd_path, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("trained")
    Distiller(_cfg(tiny_sd_path, out, "run.steps=4", "run.checkpoint_every=2")).run()
    run = out / "r"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000002.json", "step_000002.safetensors", "step_000004.json", "step_000004.safetensors"]
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _resume_to(run: Path, steps: int) -> dict:
    d = Distiller.resume(run, [f"run.steps={steps}"])
    result = d.run()
    assert result.status == "finished" and result.step == steps
    return {k: v.clone() for k, v in d.representation.state_dict().items()}


@pytest.fixture(scope="module")
def from_step_2(trained, tmp_path_factory) -> dict:
    """The reference: the run resumed from its step-2 checkpoint directly (step 4's removed)."""
    run = _copy(trained, tmp_path_factory.mktemp("ref") / "r")
    for p in checkpoint_paths(run / "checkpoints", 4):
        p.unlink()
    return _resume_to(run, 6)


def _truncate(st: Path, js: Path) -> None:
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])


def _empty(st: Path, js: Path) -> None:
    st.write_bytes(b"")


def _garbage(st: Path, js: Path) -> None:
    st.write_bytes(os.urandom(4096))


def _bad_json(st: Path, js: Path) -> None:
    js.write_text('{"step": 4, "optim')


def _json_not_an_object(st: Path, js: Path) -> None:
    js.write_text("[1, 2]")


def _wrong_shape(st: Path, js: Path) -> None:
    tensors = load_file(str(st))
    key = next(k for k in sorted(tensors) if k.startswith("representation.") and tensors[k].dim() >= 1
               and tensors[k].shape[0] > 1)
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(st))


def _wrong_optimizer_shape(st: Path, js: Path) -> None:
    tensors = load_file(str(st))
    key = next(k for k in sorted(tensors) if k.startswith("optim.") and k.endswith(".exp_avg") and tensors[k].numel() > 1)
    tensors[key] = tensors[key].flatten()[:-1].contiguous()
    save_file(tensors, str(st))


CORRUPTIONS = [_truncate, _empty, _garbage, _bad_json, _json_not_an_object, _wrong_shape, _wrong_optimizer_shape]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_newest_checkpoint_is_skipped_for_the_previous_one(trained, from_step_2, tmp_path, caplog, corrupt):
    run = _copy(trained, tmp_path / "r")
    corrupt(*checkpoint_paths(run / "checkpoints", 4))
    with caplog.at_level(logging.WARNING, logger="threedistill.checkpoint"):
        state = _resume_to(run, 6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped checkpoint step 4" in warnings[0] and "using step 2" in warnings[0]
    assert "\n" not in warnings[0]
    # Exactly the run resumed from step 2 directly: what step 4 left in the modules was overwritten.
    assert state.keys() == from_step_2.keys()
    for k in state:
        assert torch.equal(state[k], from_step_2[k]), k
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]  # the metrics continue from step 2


def test_a_missing_sidecar_means_an_incomplete_checkpoint(trained, from_step_2, tmp_path):
    run = _copy(trained, tmp_path / "r")
    checkpoint_paths(run / "checkpoints", 4)[1].unlink()  # the JSON is written last: killed in between
    state = _resume_to(run, 6)
    assert all(torch.equal(state[k], from_step_2[k]) for k in state)


def test_export_and_load_skip_a_bad_checkpoint(trained, tmp_path, caplog):
    run = _copy(trained, tmp_path / "r")
    _truncate(*checkpoint_paths(run / "checkpoints", 4))
    with caplog.at_level(logging.WARNING, logger="threedistill.checkpoint"):
        _, rep, step = RunFolder(run).load_representation()
    assert step == 2 and any("skipped checkpoint step 4" in r.getMessage() for r in caplog.records)
    direct = RunFolder(_copy(trained, tmp_path / "direct"))
    for p in checkpoint_paths(direct.checkpoints_dir, 4):
        p.unlink()
    _, rep2, _ = direct.load_representation()
    assert all(torch.equal(a, b) for a, b in zip(rep.state_dict().values(), rep2.state_dict().values()))
    # Through the CLI the warning is one line on stderr, and the export says which step it used.
    done = subprocess.run([sys.executable, "-m", "threedistill.cli", "export", str(run), "-f", "ply", "--resolution", "32"],
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 2)" in done.stdout and (run / "model.ply").is_file()
    warning = [l for l in done.stderr.splitlines() if "skipped checkpoint" in l]
    assert len(warning) == 1 and warning[0].startswith("WARNING") and "step 4" in warning[0], done.stderr
    assert "Traceback" not in done.stderr


def test_no_checkpoint_loads_one_line_error_and_nothing_changed(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "r")
    _empty(*checkpoint_paths(run / "checkpoints", 4))
    _garbage(*checkpoint_paths(run / "checkpoints", 2))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="no checkpoint of the 2"):
        Distiller.resume(run, ["run.steps=6"]).run()
    capsys.readouterr()
    assert main(["generate", "--resume", str(run), "run.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no checkpoint of the 2") and "remove" in err[-1]
    assert not [l for l in err if l.startswith(("Traceback", "WARNING"))]
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["export", str(run)]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint of the 2")


def test_a_changed_configuration_fitting_no_checkpoint_says_so(trained, tmp_path, caplog):
    run = _copy(trained, tmp_path / "r")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as e:
        Distiller.resume(run, ["representation.nerf.log2_hashmap_size=11"]).run()
    assert "no checkpoint of the 2" in str(e.value) and "fits this configuration" in str(e.value)
    assert "resume with the run's own config.yaml" in str(e.value) and "\n" not in str(e.value)
    assert not caplog.records  # nothing was skipped: nothing loaded


# ----------------------------------------------------------------------------------------------
# Temp files a killed write left
# ----------------------------------------------------------------------------------------------
def _temp_like_the_writers(folder: Path, name: str) -> list:
    """Temp files with the names atomic_write and atomic_path give them, left as a kill leaves them."""
    fd, a = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")  # atomic_write's own call
    os.write(fd, b"half")
    os.close(fd)
    with pytest.raises(RuntimeError):
        with atomic_path(folder / name) as tmp:  # the real atomic_path; its temp file is copied away
            tmp.write_bytes(b"half")
            kept = tmp.with_name(tmp.name + ".keep")
            shutil.copy(tmp, kept)
            raise RuntimeError  # the writer removes its temp file ...
    made = [Path(a), kept.rename(tmp)]  # ... which a kill would have left
    assert all(is_temp_name(p.name) and p.is_file() for p in made)
    return made


USER_FILES = ["notes.tmp", ".hidden", ".step_000004.json.tmp", "model.tmp.glb", ".my.backup.tmp", "a.0123456789ab.tmp",
              ".x.abcdefgh.tmp.bak"]


def test_resume_removes_temp_leftovers_and_keeps_user_files(trained, tmp_path):
    run = _copy(trained, tmp_path / "r")
    folder = RunFolder(run)
    temps = _temp_like_the_writers(folder.checkpoints_dir, "step_000006.safetensors")
    temps += _temp_like_the_writers(run, "run.json")
    folder.previews_dir.mkdir(exist_ok=True)
    temps += _temp_like_the_writers(folder.previews_dir, "step_000006.png")
    users = []
    for d in (run, folder.checkpoints_dir, folder.previews_dir):
        for name in USER_FILES:
            (d / name).write_text("mine")
            users.append(d / name)
    sub = run / "notes"  # not a folder the run writes: left alone even with a temp-like name in it
    sub.mkdir()
    (sub / temps[0].name).write_text("mine")
    users.append(sub / temps[0].name)
    assert not any(is_temp_name(p.name) for p in users[:-1])
    _resume_to(run, 5)
    assert not [p for p in temps if p.exists()]
    assert all(p.read_text() == "mine" for p in users)
    # The checkpoints are all real ones.
    assert sorted(p.name for p in folder.checkpoints_dir.iterdir() if not p.name in USER_FILES) == [
        "step_000002.json", "step_000002.safetensors", "step_000004.json", "step_000004.safetensors",
        "step_000005.json", "step_000005.safetensors"]


def test_load_removes_temp_leftovers_unless_the_run_is_live(trained, tmp_path):
    run = _copy(trained, tmp_path / "r")
    folder = RunFolder(run)
    temps = _temp_like_the_writers(folder.checkpoints_dir, "step_000006.safetensors")
    with folder.attend():  # a live run (this process): its writes in flight are not touched
        folder.set_status("running", "a red cube", 4, 6)
        folder.load_representation()
        assert all(p.exists() for p in temps)
        folder.set_status("finished", "a red cube", 4, 6)
    folder.load_representation()
    assert not [p for p in temps if p.exists()]


# ----------------------------------------------------------------------------------------------
# Who runs a run
# ----------------------------------------------------------------------------------------------
def test_runner_record_and_heartbeat(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    step = [3]
    with folder.attend(step=lambda: step[0], every_s=0.05):
        folder.set_status("running", "a cube", 3, 10)
        first = folder.read_status(as_stored=True)
        assert first["runner"]["pid"] == os.getpid() and first["runner"]["token"]
        assert folder.status() == "running" and folder.runner_alive() is True
        step[0] = 7
        deadline = time.monotonic() + 20
        while folder.read_status(as_stored=True)["step"] != 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        beat = folder.read_status(as_stored=True)
        assert beat["step"] == 7 and beat["heartbeat"] > first["heartbeat"] and beat["runner"] == first["runner"]
        with pytest.raises(UserError, match=f"is running in process {os.getpid()}"):
            folder.check_not_running()
    # The body ended without a final status (a thread that died): the run reads as interrupted.
    assert folder.status() == "interrupted" and folder.read_status(as_stored=True)["status"] == "running"
    folder.check_not_running()
    with folder.attend(every_s=0.05):
        folder.set_status("running", "a cube", 3, 10)
        folder.set_status("stopped", "a cube", 3, 10)
        time.sleep(0.2)  # the heartbeat never revives an ended status
    info = folder.read_status(as_stored=True)
    assert info["status"] == "stopped" and "runner" not in info and "heartbeat" not in info


def test_runner_alive_decisions(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.path.mkdir()
    with folder.attend():
        folder.set_status("running", "a cube", 1, 10)
        me = folder.read_status(as_stored=True)
    now = time.time()
    assert runner_alive({**me, "status": "finished"}) is None
    # Another process of this machine: the pid's start time must match (a recycled pid does not).
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(f"/proc/{child.pid}/stat") as f:
            text = f.read()
        started = int(text[text.rindex(")") + 2:].split()[19])
        other = {**me, "runner": {**me["runner"], "pid": child.pid, "started": started, "token": "x"}}
        assert runner_alive(other) is True
        assert runner_alive({**other, "heartbeat": 0.0}) is True  # its own machine: the process decides
        assert runner_alive({**other, "runner": {**other["runner"], "started": started + 1}}) is False
    finally:
        child.kill()
        child.wait()
    assert runner_alive(other) is False
    # Another machine: the heartbeat decides.
    remote = {**me, "runner": {**me["runner"], "host": "elsewhere", "boot_id": "b", "pid": 1}}
    assert runner_alive({**remote, "heartbeat": now - 10}, now=now) is True
    assert runner_alive({**remote, "heartbeat": now - HEARTBEAT_STALE_S - 1}, now=now) is False
    assert runner_alive({**remote, "runner": {**remote["runner"], "host": me["runner"]["host"]},
                         "heartbeat": now - HEARTBEAT_STALE_S - 1}, now=now) is False  # rebooted (new boot id)
    # No runner record (an older version's run.json, or by hand): the file's age decides.
    legacy = {"status": "running", "step": 1}
    assert runner_alive(legacy, mtime=now - 5, now=now) is True
    assert runner_alive(legacy, mtime=now - HEARTBEAT_STALE_S - 1, now=now) is False
    folder.status_path.write_text(json.dumps(legacy))
    os.utime(folder.status_path, (now - 3600, now - 3600))
    assert folder.status() == "interrupted" and folder.read_status(as_stored=True) == legacy


class Boom(Callback):
    def on_step(self, d, step, stats):
        if step == 2:
            raise RuntimeError("boom\nsecond line")


def test_an_error_in_the_loop_leaves_the_run_interrupted(tiny_sd_path, tmp_path):
    with pytest.raises(RuntimeError):
        Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=6"), callbacks=[Boom()]).run()
    info = RunFolder(tmp_path / "r").read_status(as_stored=True)
    assert info["status"] == "interrupted" and info["error"] == "RuntimeError: boom" and "runner" not in info


def _wait_for(cond, what: str, proc=None, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_run_shows_interrupted_everywhere_and_a_live_one_running(tiny_sd_path, tmp_path, capsys):
    from threedistill.app.jobs import JobManager
    from threedistill.batch.manifest import Manifest
    from threedistill.batch.report import write_gallery, write_summary
    from threedistill.batch.rows import BatchRow

    out = tmp_path / "out"
    run = RunFolder(out / "k")
    proc = subprocess.Popen([sys.executable, "-m", "threedistill.cli", "generate", "a red cube", "--out", str(out),
                             "run.name=k", f"prior.name={tiny_sd_path}", "run.steps=100000", "run.checkpoint_every=2",
                             *FAST], env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    manager = JobManager(out)
    try:
        _wait_for(lambda: run.latest_checkpoint() is not None and run.read_status(as_stored=True).get("status") == "running",
                  "its first checkpoint", proc)
        # Live: running everywhere, and a second process may not resume it.
        assert run.status() == "running" and run.read_status(as_stored=True)["runner"]["pid"] == proc.pid
        assert [(h["name"], h["status"]) for h in manager.history()] == [("k", "running")]
        capsys.readouterr()
        assert main(["list", str(out)]) == 0
        assert capsys.readouterr().out.split()[:2] == ["k", "running"]
        assert main(["generate", "--resume", str(run.path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"is running in process {proc.pid}" in err
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Killed: run.json still says running, every front end says interrupted.
    assert run.read_status(as_stored=True)["status"] == "running"
    assert run.status() == "interrupted" and run.runner_alive() is False
    assert [(h["name"], h["status"]) for h in manager.history()] == [("k", "interrupted")]
    capsys.readouterr()
    assert main(["list", str(out)]) == 0
    assert capsys.readouterr().out.split()[:2] == ["k", "interrupted"]
    # A batch report of a row that was running in it (e.g. a coordinator that crashed) shows it interrupted.
    row = BatchRow(id="k", prompt="a red cube", seed=0)
    manifest = Manifest.open(out, [row])
    manifest.start("k", "local-0")
    write_summary(manifest, "t")
    write_gallery(manifest, "t")
    assert "| k | a red cube | 0 | interrupted |" in (out / "summary.md").read_text()
    assert '<span class="state interrupted">interrupted</span>' in (out / "index.html").read_text()
    # It resumes from its last checkpoint, and the message says where it was.
    step = run.latest_checkpoint()
    assert main(["generate", "--resume", str(run.path), f"run.steps={step + 1}"]) == 0
    captured = capsys.readouterr()
    assert f"resuming {run.path}: interrupted at step" in captured.err
    assert run.status() == "finished" and "runner" not in run.read_status(as_stored=True)


def test_a_zombie_runner_counts_as_dead():
    """A runner that exited but was never reaped (an orphaned batch worker where nothing reaps it)
    is a zombie: it runs nothing, so its run reads as interrupted."""
    import subprocess
    import sys
    import time as _time

    from threedistill.runs import _process_start

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = _time.time() + 30
    while _time.time() < deadline:  # exited, not yet waited for: a zombie
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        _time.sleep(0.05)
    try:
        assert _process_start(child.pid) is None
        assert _process_start(os.getpid()) is not None
    finally:
        child.wait()
