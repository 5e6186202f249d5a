"""The web app: the server-side JobManager (no Gradio), and the Gradio API driven by gradio_client.

Tiny runs on the built-in shapes prior (no download); one JobManager (one loaded prior) is shared.
"""

import socket
import time
from pathlib import Path

import pytest

from threedistill.app.jobs import CANCELLED, FINISHED, QUEUED, RUNNING, STOPPED, JobManager, ValidationError, parse_overrides

QUICK = "\n".join([
    "run.steps=6", "run.resolution=16", "run.preview_every=2", "export.mesh_resolution=24",
    "export.turntable_frames=4", "export.turntable_resolution=32", "camera.batch_size=1",
])


def quick(prompt="a red cube", **kw):
    return {"prompt": prompt, "preset": "sds-nerf", "prior": "shapes", "overrides": QUICK, **kw}


def run_dirs(root: Path):
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    m = JobManager(tmp_path_factory.mktemp("app-outputs"))
    yield m
    m.shutdown()


# ----------------------------------------------------------------------------------------------
# JobManager
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, field, words", [
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "a\nb"}, "prompt", "single line"),
    ({"prompt": "a red cube", "steps": 0}, "steps", "> 0"),
    ({"prompt": "a red cube", "steps": "many"}, "steps", "whole number"),
    ({"prompt": "a red cube", "resolution": -4}, "resolution", "> 0"),
    ({"prompt": "a red cube", "guidance_scale": "x"}, "guidance_scale", "number"),
    ({"prompt": "a red cube", "preset": "nope-nerf"}, "preset", "unknown preset"),
    ({"prompt": "a red cube", "prior": "/no/such/pipeline"}, "prior", "not allowed"),  # the app policy: listed priors only
    ({"prompt": "a red cube", "overrides": "run.steps=-3"}, "steps", "run.steps"),
    ({"prompt": "a red cube", "overrides": "run.name=../escape"}, "overrides", "plain name"),
    ({"prompt": "a red cube", "overrides": "run.name=/tmp/abs"}, "overrides", "plain name"),
    ({"prompt": "a red cube", "overrides": "run.out_dir=/tmp"}, "overrides", "run.out_dir"),
    ({"prompt": "a red cube", "overrides": "run: [unclosed"}, "overrides", "YAML"),
    ({"prompt": "a red cube", "overrides": "no.such.key=1"}, "overrides", "no"),
])
def test_validation_error_starts_nothing(manager, settings, field, words):
    before = (len(manager.jobs()), len(run_dirs(manager.outputs)))
    with pytest.raises(ValidationError) as e:
        manager.submit(settings)
    assert e.value.field == field
    assert words.lower() in e.value.message.lower()
    assert "\n" not in e.value.message
    assert (len(manager.jobs()), len(run_dirs(manager.outputs))) == before


def test_parse_overrides_yaml_and_key_value():
    assert parse_overrides("run.steps=5\n# comment\n\nguidance.guidance_scale=7.5") == \
        ["run.steps=5", "guidance.guidance_scale=7.5"]
    assert parse_overrides("run:\n  steps: 5\nguidance:\n  t_max: [0.98, 0.5, 0, 800]\n") == \
        ["run.steps=5", "guidance.t_max=[0.98, 0.5, 0, 800]"]
    assert parse_overrides("") == []


def test_short_job_finishes_with_a_glb(manager):
    import trimesh

    jid = manager.submit(quick(seed=3, guidance_scale=10))
    job = manager.wait(jid, timeout=120)
    assert job["status"] == FINISHED, job["error"]
    assert job["step"] == job["steps"] == 6 and job["loss"] is not None and job["eta_s"] == 0.0
    assert job["preview"] and Path(job["preview"]).is_file()
    out = manager.run_outputs(jid)
    mesh = trimesh.load(out["glb"], force="mesh")
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
    assert Path(out["turntable"]).is_file() and Path(out["zip"]).is_file()
    # every mesh download is offered: the app writes GLB, OBJ and PLY by default
    assert len(trimesh.load(out["ply"], force="mesh").faces) == len(mesh.faces)
    assert Path(out["obj"]).is_file()
    assert "guidance_scale: 10.0" in Path(out["config"]).read_text() and "seed: 3" in Path(out["config"]).read_text()
    names = [r["name"] for r in manager.history()]
    assert job["run_name"] in names
    # the run name is a slug inside the outputs folder, also for a hostile prompt
    jid2 = manager.submit(quick(prompt="../../etc/passwd"))
    job2 = manager.wait(jid2, timeout=120)
    assert Path(job2["run_dir"]).parent == manager.outputs and ".." not in job2["run_name"]


def test_chained_preset_runs_its_refine_stage(manager):
    """A coarse-to-fine preset: the job follows the refine stage; its results are the refined mesh's."""
    extra = "\nexport.formats=[glb]\nexport.turntable=false\nrefine.overrides=[run.steps=2,run.resolution=16]"
    with pytest.raises(ValidationError) as e:
        manager.submit(quick(preset="sds-nerf-then-mesh", overrides=QUICK + "\nrefine.config=sds-nerf"))
    assert e.value.field == "overrides" and "mesh" in e.value.message
    jid = manager.submit(quick(preset="sds-nerf-then-mesh", overrides=QUICK + extra))
    job = manager.wait(jid, timeout=120)
    assert job["status"] == FINISHED, job["error"]
    coarse = manager.outputs / job["run_name"]
    assert job["run_dir"] == str(coarse / "refine") and job["step"] == job["steps"] == 2
    assert manager.run_outputs(jid)["glb"] == str(coarse / "refine" / "model.glb")
    assert (coarse / "model.glb").is_file() and job["run_name"] in [r["name"] for r in manager.history()]


def test_queue_position_and_cancel(manager):
    long = quick(prompt="a blue sphere", overrides=QUICK.replace("run.steps=6", "run.steps=2000"))
    first = manager.submit(long)
    second = manager.submit(quick(prompt="a green cone"))
    s2 = manager.status(second)
    assert s2["status"] == QUEUED and s2["position"] == 1
    # wait until the first is running and has made a step or two
    end = time.time() + 60
    while manager.status(first)["step"] < 2 and time.time() < end:
        time.sleep(0.05)
    assert manager.status(first)["status"] == RUNNING
    assert manager.active_job()["id"] == first  # what a reloaded page shows
    assert manager.cancel(second) == CANCELLED
    assert manager.status(second)["position"] == 0
    at = manager.status(first)["step"]
    manager.cancel(first)
    job = manager.wait(first, timeout=60)
    assert job["status"] == STOPPED
    assert at <= job["step"] <= at + 2 < 2000
    run_dir = Path(job["run_dir"])
    assert any((run_dir / "checkpoints").iterdir())
    assert (run_dir / "config.yaml").is_file()
    from threedistill.runs import RunFolder

    assert RunFolder(run_dir).read_status()["status"] == "stopped"
    assert manager.status(second)["run_dir"] is None  # never started


def test_path_safety(manager, tmp_path):
    from threedistill.errors import UserError

    root = manager.outputs
    assert manager.safe_path("x/y.glb") == root / "x" / "y.glb"
    assert manager.safe_path(root / "x") == root / "x"
    for bad in ("../secret", "a/../../secret", "/etc/passwd", str(tmp_path), "", "a\x00b"):
        with pytest.raises(UserError):
            manager.safe_path(bad)
    (tmp_path / "secret.txt").write_text("no")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UserError):
        manager.safe_path("link/secret.txt")
    for bad in ("..", "../x", "/etc", ".", "a/b", "no-such-run"):
        with pytest.raises(UserError):
            manager.run_outputs(bad)
    (root / "link").unlink()


def test_loopback_detection():
    from threedistill.app.ui import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("")


def test_launch_warns_on_a_public_address(manager, monkeypatch, capsys):
    gr = pytest.importorskip("gradio")
    from threedistill.app.ui import launch

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw) or (None, "http://x/", None))
    launch("0.0.0.0", 7999, manager=manager)
    assert "WARNING" in capsys.readouterr().err
    assert calls[0]["server_name"] == "0.0.0.0" and calls[0]["allowed_paths"] == [str(manager.outputs)]
    launch(manager=manager)
    assert "WARNING" not in capsys.readouterr().err and calls[1]["server_name"] == "127.0.0.1"


def test_cli_app_rejects_bad_port(capsys):
    from threedistill.cli import main

    assert main(["app", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


def _ui_fn(demo, name):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", None) == name)


def test_page_handlers_show_field_errors_and_the_servers_job(manager):
    """The page's own handlers (without a browser): a field error lands next to its field; a fresh
    page (no job of its own) follows the server's job and shows its results once."""
    pytest.importorskip("gradio")
    from threedistill.app.jobs import FIELDS
    from threedistill.app.ui import build_ui

    demo = build_ui(manager)
    on_submit, tick = _ui_fn(demo, "on_submit"), _ui_fn(demo, "tick")
    out = on_submit("", "", "sds-nerf", "shapes", 0, None, None, None, "")
    errs = dict(zip(FIELDS, out[2:]))
    assert errs["prompt"]["visible"] is True and "empty" in errs["prompt"]["value"]
    assert all(errs[f]["visible"] is False for f in FIELDS if f != "prompt")

    newest = manager.active_job()
    assert newest is not None  # earlier tests ran jobs on this manager
    jid, progress, _preview, table, shown, title, glb, *_ = tick(None, None)
    assert jid == newest["id"] and newest["settings"]["prompt"][:5] in progress
    assert any(row[0] == jid for row in table)
    if newest["run_name"] and newest["status"] not in (QUEUED, RUNNING):
        assert shown == newest["run_name"]
        again = tick(jid, shown)  # already shown: the viewer is not reloaded
        assert again[4] == shown and again[5] == {"__type__": "update"}  # gr.skip()


# ----------------------------------------------------------------------------------------------
# The Gradio API through gradio_client
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(manager):
    pytest.importorskip("gradio")
    from gradio_client import Client

    from threedistill.app.ui import launch

    demo, _, url = launch("127.0.0.1", _free_port(), manager=manager, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(url, verbose=False)
    finally:
        demo.close()


def test_gradio_api_submit_status_outputs(client):
    import trimesh

    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/submit", "/status", "/cancel", "/outputs", "/history"} <= set(api)

    bad = client.predict("", "", "sds-nerf", "shapes", 0, None, None, None, "", api_name="/submit")
    assert bad["ok"] is False and bad["field"] == "prompt" and "empty" in bad["error"]
    assert client.predict("nope", api_name="/cancel")["ok"] is False

    r = client.predict("a yellow cube", "", "sds-nerf", "shapes", 1, 6, None, 16, QUICK, api_name="/submit")
    assert r["ok"], r
    end = time.time() + 120
    while True:
        s = client.predict(r["job_id"], api_name="/status")
        if s["status"] not in (QUEUED, RUNNING) or time.time() > end:
            break
        time.sleep(0.5)
    assert s["status"] == FINISHED, s
    title, glb, splat, video, files, config = client.predict(r["job_id"], api_name="/outputs")
    assert Path(glb).is_file() and Path(glb).suffix == ".glb"
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0
    assert any(str(f).endswith(".zip") for f in files)
    assert "a yellow cube" in config
    assert s["run_name"] in [h["name"] for h in client.predict(api_name="/history")]
    # a run name that tries to leave the outputs folder gives a message, not a file
    title, glb, *_ = client.predict("../..", api_name="/outputs")
    assert glb is None and "run name" in title
