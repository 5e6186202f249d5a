"""The web app: the server-side JobManager (no Gradio), and the Gradio API driven by gradio_client.

Tiny runs on the built-in shapes prior (no download); one JobManager (one loaded prior) is shared.
"""

import socket
import time
from pathlib import Path

import pytest
from PIL import Image

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


def test_launch_refuses_a_public_address_without_a_login(manager, monkeypatch, capsys):
    """Changed by issue 17: a non-loopback bind used to only warn; it now needs --auth (or
    THREEDISTILL_AUTH) or an explicit --insecure, and the login goes to Gradio's own auth."""
    gr = pytest.importorskip("gradio")
    from threedistill.errors import UserError
    from threedistill.app.ui import AUTH_ENV, launch

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw) or (None, "http://x/", None))
    monkeypatch.delenv(AUTH_ENV, raising=False)
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        with pytest.raises(UserError) as e:
            launch(host, 7999, manager=manager, prevent_thread_lock=True)
        assert "--auth" in str(e.value) and "--insecure" in str(e.value) and "\n" not in str(e.value)
    assert calls == []  # refused before anything was served
    launch("0.0.0.0", 7999, manager=manager, insecure=True, prevent_thread_lock=True)
    assert "WARNING" in capsys.readouterr().err
    assert calls[0]["server_name"] == "0.0.0.0" and calls[0]["allowed_paths"] == [str(manager.outputs)]
    assert calls[0]["auth"] is None and calls[0]["max_file_size"] == 0
    launch("0.0.0.0", 7999, manager=manager, auth=("alice", "pw"), prevent_thread_lock=True)
    assert "WARNING" not in capsys.readouterr().err and calls[1]["auth"] == [("alice", "pw")]
    launch(manager=manager, prevent_thread_lock=True)
    assert "WARNING" not in capsys.readouterr().err and calls[2]["server_name"] == "127.0.0.1"


def test_cli_app_needs_a_login_on_a_public_address(monkeypatch, capsys, tmp_path):
    gr = pytest.importorskip("gradio")
    from threedistill.app import ui
    from threedistill.cli import main

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw) or (None, "http://x/", None))
    monkeypatch.delenv(ui.AUTH_ENV, raising=False)
    out = tmp_path / "o"
    for entry in (lambda a: main(["app", *a]), ui.main):
        assert entry(["--host", "0.0.0.0", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "--auth" in err and "--insecure" in err and len(err.splitlines()) == 1
        assert entry(["--host", "0.0.0.0", "--out", str(out), "--auth", "no-colon"]) == 2
        assert "USER:PASSWORD" in capsys.readouterr().err
    assert calls == [] and not out.exists()  # nothing served, no outputs folder made
    # the password from the environment, not the command line; --auth wins over it
    monkeypatch.setenv(ui.AUTH_ENV, "bob:pa:ss")
    assert main(["app", "--host", "0.0.0.0", "--out", str(out)]) == 0
    assert calls[-1]["auth"] == [("bob", "pa:ss")]
    assert ui.main(["--host", "0.0.0.0", "--out", str(out), "--auth", "carol:x"]) == 0
    assert calls[-1]["auth"] == [("carol", "x")]


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
    assert {"/submit", "/status", "/cancel", "/outputs", "/history", "/preview", "/curves"} <= set(api)

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
    title, glb, splat, video, files, config, curves = client.predict(r["job_id"], api_name="/outputs")
    assert Path(glb).is_file() and Path(glb).suffix == ".glb"
    assert Image.open(curves).format == "PNG"  # the run's curves, shown with its results
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0
    assert any(str(f).endswith(".zip") for f in files)
    assert "a yellow cube" in config
    assert s["run_name"] in [h["name"] for h in client.predict(api_name="/history")]
    # a run name that tries to leave the outputs folder gives a message, not a file
    title, glb, *_ = client.predict("../..", api_name="/outputs")
    assert glb is None and "run name" in title


# ----------------------------------------------------------------------------------------------
# Login, uploads (raw HTTP against a running app)
# ----------------------------------------------------------------------------------------------
def _http(url: str, path: str, body: bytes = None, headers=None):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + path, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _files_under(d: Path):
    return sorted(str(p) for p in Path(d).rglob("*") if p.is_file()) if Path(d).is_dir() else []


def test_login_is_required_when_set(manager):
    """With --auth, every API route refuses a request without the login (raw HTTP), and
    gradio_client with the login works."""
    pytest.importorskip("gradio")
    import json

    from gradio_client import Client

    from threedistill.app.ui import launch

    demo, _, url = launch("127.0.0.1", _free_port(), manager=manager, prevent_thread_lock=True, quiet=True,
                          auth=("alice", "s3cret"))
    try:
        jobs_before = len(manager.jobs())
        submit = json.dumps({"data": ["a red cube", "", "sds-nerf", "shapes", 0, 4, None, 16, QUICK]}).encode()
        for path in ("/gradio_api/call/submit", "/gradio_api/call/history", "/gradio_api/queue/join"):
            code, body = _http(url, path, submit, {"Content-Type": "application/json"})
            assert code == 401, (path, code, body)
        for path in ("/config", "/gradio_api/info", f"/gradio_api/file={manager.outputs}"):
            assert _http(url, path)[0] == 401, path
        code, _ = _http(url, "/login", b"username=alice&password=wrong",
                        {"Content-Type": "application/x-www-form-urlencoded"})
        assert code >= 400
        assert len(manager.jobs()) == jobs_before  # nothing was queued
        with pytest.raises(Exception):
            Client(url, verbose=False)
        c = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert isinstance(c.predict(api_name="/history"), list)
    finally:
        demo.close()


def test_upload_route_is_closed(client):
    """Gradio's upload route stores nothing: 5 MB (and a tiny file) are refused with 403."""
    from gradio_client import Client  # noqa: F401  (the app runs: the client fixture)

    import gradio as gr

    url = client.src

    upload_dir = Path(gr.utils.get_upload_folder())
    before = _files_under(upload_dir)
    for size in (5 << 20, 10):
        body = (b"--XX\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" + b"0" * size + b"\r\n--XX--\r\n")
        for path in ("/gradio_api/upload", "/gradio_api/upload/", "/upload"):
            code, text = _http(url, path, body, {"Content-Type": "multipart/form-data; boundary=XX"})
            assert code in (403, 404, 405) and code != 200, (path, code)
        code, text = _http(url, "/gradio_api/upload", body, {"Content-Type": "multipart/form-data; boundary=XX"})
        assert code == 403 and b"uploads are off" in text
    assert _files_under(upload_dir) == before


# ----------------------------------------------------------------------------------------------
# Resume, cancel during the export, a restarted server
# ----------------------------------------------------------------------------------------------
def test_cancel_during_export_then_resume(client, manager, monkeypatch):
    """Cancel while the meshes are written: the export stops before the turntable (the next output),
    the run is `stopped` with its outputs pending; the Resume endpoint writes them without training
    again."""
    import threading

    import threedistill.distill as distill_mod

    in_export, release = threading.Event(), threading.Event()
    real = distill_mod.export_run_meshes

    def slow_meshes(*a, **kw):
        in_export.set()
        assert release.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(distill_mod, "export_run_meshes", slow_meshes)
    r = client.predict("a purple cube", "", "sds-nerf", "shapes", 2, 6, None, 16, QUICK, api_name="/submit")
    assert r["ok"], r
    try:
        assert in_export.wait(120)
        s = client.predict(r["job_id"], api_name="/status")
        assert s["status"] == RUNNING and s["phase"] == "exporting" and s["step"] == s["steps"] == 6
        assert client.predict(r["job_id"], api_name="/cancel")["status"] == RUNNING
    finally:
        release.set()
    job = manager.wait(r["job_id"], timeout=120)
    assert job["status"] == STOPPED and job["export_pending"] and job["step"] == 6
    run = manager.outputs / job["run_name"]
    from threedistill.runs import RunFolder

    folder = RunFolder(run)
    info = folder.read_status()
    assert info["status"] == "stopped" and info["export_pending"] is True and info["step"] == 6
    assert folder.mesh_path("glb").is_file() and not folder.turntable_path.is_file()  # stopped before the video
    assert folder.latest_checkpoint() == 6
    row = next(h for h in client.predict(api_name="/history") if h["name"] == job["run_name"])
    assert row["status"] == "stopped" and row["export_pending"] is True
    metrics_before = folder.metrics_path.read_text()

    monkeypatch.setattr(distill_mod, "export_run_meshes", real)
    assert client.predict("no-such-run", api_name="/resume")["ok"] is False
    assert client.predict("../..", api_name="/resume")["ok"] is False
    res = client.predict(job["run_name"], api_name="/resume")
    assert res["ok"], res
    again = client.predict(job["run_name"], api_name="/resume")  # already queued or running
    assert again["ok"] is False and "already" in again["error"]
    done = manager.wait(res["job_id"], timeout=120)
    assert done["status"] == FINISHED, done["error"]
    assert done["start_step"] == 6 and done["step"] == 6 and done["run_name"] == job["run_name"]
    assert folder.mesh_path("glb").is_file() and folder.read_status()["status"] == "finished"
    assert "export_pending" not in folder.read_status()
    assert folder.metrics_path.read_text() == metrics_before  # no step was trained again
    finished = client.predict(job["run_name"], api_name="/resume")
    assert finished["ok"] is False and "finished" in finished["error"]


def test_resume_button_continues_a_stopped_run(manager):
    """The page's Resume button (its handler): a run stopped mid-way continues from its checkpoint."""
    pytest.importorskip("gradio")
    from threedistill.app.ui import build_ui

    jid = manager.submit(quick(prompt="a white cube", overrides=QUICK.replace("run.steps=6", "run.steps=400")
                               + "\nexport.formats=[glb]\nexport.turntable=false"))
    end = time.time() + 60
    while manager.status(jid)["step"] < 3 and time.time() < end:
        time.sleep(0.05)
    manager.cancel(jid)
    stopped = manager.wait(jid, timeout=60)
    assert stopped["status"] == STOPPED and 3 <= stopped["step"] < 400 and not stopped["export_pending"]
    demo = build_ui(manager)
    on_resume = _ui_fn(demo, "on_resume")
    assert "Pick" in on_resume(None)[2]
    new_jid, progress, msg = on_resume(stopped["run_name"])
    assert new_jid != jid and stopped["run_name"] in msg and "white cube" in progress
    # stop it quickly again: it resumed from the checkpoint the stop wrote, not from step 0
    end = time.time() + 60
    while manager.status(new_jid)["start_step"] is None and time.time() < end:
        time.sleep(0.05)
    assert manager.status(new_jid)["start_step"] == stopped["step"]
    manager.cancel(new_jid)
    assert manager.wait(new_jid, timeout=60)["status"] == STOPPED


_SERVER = r"""
import sys, time
from threedistill.app.jobs import JobManager
m = JobManager(sys.argv[1])
a = m.submit({"prompt": "a red cube", "preset": "sds-nerf", "prior": "shapes", "overrides": sys.argv[2]})
b = m.submit({"prompt": "a blue cube", "preset": "sds-nerf", "prior": "shapes", "overrides": sys.argv[3]})
print(a, b, flush=True)
time.sleep(600)
"""


def test_a_killed_server_resumes_its_queue(tmp_path):
    """kill -9 the server while a job runs and another waits; a new manager on the same outputs
    folder runs the waiting one and resumes the running one from its last checkpoint."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from threedistill.runs import OutputsFolder, RunFolder

    out = tmp_path / "outputs"
    base = "\n".join(["run.resolution=16", "run.preview_every=50", "camera.batch_size=1", "export.formats=[glb]",
                      "export.turntable=false", "export.mesh_resolution=24", "export.texture=false",
                      "representation.nerf.num_samples=16",
                      "representation.nerf.n_levels=4", "representation.nerf.log2_hashmap_size=10",
                      "representation.nerf.max_resolution=32"])
    # a checkpoint on every step by time (checkpoint_every_s), none by the step cadence
    long = base + "\nrun.steps=40\nrun.checkpoint_every=100000\nrun.checkpoint_every_s=0.000001"
    short = base + "\nrun.steps=3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(out), long, short], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        a, b = proc.stdout.readline().split()
        end, folder = time.time() + 180, None
        while time.time() < end:
            runs = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if runs and (RunFolder(runs[0]).latest_checkpoint() or 0) >= 3:
                folder = RunFolder(runs[0])
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        assert folder is not None, "the job made no checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = {e["id"]: e for e in OutputsFolder(out).read_queue()}
    assert saved[a]["status"] == RUNNING and saved[a]["run_name"] == folder.name and saved[b]["status"] == QUEUED
    at_kill = folder.latest_checkpoint()
    assert 3 <= at_kill < 40

    m = JobManager(out)
    try:
        assert m.status(a)["resume_of"] == folder.name and m.status(b)["status"] == QUEUED
        ja = m.wait(a, timeout=300)
        assert ja["status"] == FINISHED, ja["error"]
        assert ja["start_step"] == at_kill and ja["step"] == 40 and ja["run_name"] == folder.name
        steps = [json.loads(l)["step"] for l in folder.metrics_path.read_text().splitlines()]
        assert steps == list(range(1, 41))  # every step once: the killed steps were redone, no others
        # the time-based checkpoints replace each other: only the final one is left
        assert sorted(p.name for p in folder.checkpoints_dir.glob("*.json")) == ["step_000040.json"]
        assert folder.mesh_path("glb").is_file() and folder.read_status()["status"] == "finished"
        jb = m.wait(b, timeout=120)
        assert jb["status"] == FINISHED and jb["start_step"] == 0 and jb["step"] == 3, jb["error"]
        assert OutputsFolder(out).read_queue() == []
    finally:
        m.shutdown()


def test_an_unreadable_saved_queue_is_set_aside(tmp_path):
    from threedistill.runs import OutputsFolder

    store = OutputsFolder(tmp_path)
    store.queue_path.write_text("{not json")
    m = JobManager(tmp_path)
    try:
        assert m.jobs() == [] and (tmp_path / (OutputsFolder.QUEUE + ".bad")).read_text() == "{not json"
        assert store.read_queue() == []
    finally:
        m.shutdown()


def test_a_saved_job_that_no_longer_validates_is_listed_failed(tmp_path):
    from threedistill.runs import OutputsFolder

    OutputsFolder(tmp_path).write_queue([{"id": "abc", "status": QUEUED, "settings": {"prompt": "x", "preset": "gone-nerf"},
                                          "created": 1.0, "run_name": None, "resume_of": None}])
    m = JobManager(tmp_path)
    try:
        j = m.status("abc")
        assert j["status"] == "failed" and "restore" in j["error"] and "gone-nerf" in j["error"]
        assert OutputsFolder(tmp_path).read_queue() == []
    finally:
        m.shutdown()


def test_a_stopped_server_resumes_its_jobs(tmp_path):
    """A server stopped gracefully (Ctrl+C: JobManager.shutdown) stops its job at a step with a
    checkpoint and keeps the queue; the next one continues from that step."""
    from threedistill.runs import OutputsFolder

    long = quick(prompt="a gray cube", overrides=QUICK.replace("run.steps=6", "run.steps=400"))
    m = JobManager(tmp_path)
    a, b = m.submit(long), m.submit(quick(prompt="a black cube"))
    end = time.time() + 60
    while m.status(a)["step"] < 2 and time.time() < end:
        time.sleep(0.05)
    m.shutdown()
    stopped_at = m.status(a)["step"]
    assert m.status(a)["status"] == STOPPED and 2 <= stopped_at < 400
    assert [e["id"] for e in OutputsFolder(tmp_path).read_queue()] == [a, b]
    m2 = JobManager(tmp_path)
    try:
        end = time.time() + 60
        while m2.status(a)["start_step"] is None and time.time() < end:
            time.sleep(0.05)
        assert m2.status(a)["start_step"] == stopped_at and m2.status(b)["status"] == QUEUED
        m2.cancel(b)
        m2.cancel(a)
        assert m2.wait(a, timeout=60)["status"] == STOPPED
        assert OutputsFolder(tmp_path).read_queue() == []
    finally:
        m2.shutdown()


def test_manager_preview_and_curves(manager):
    """The Preview button's samples (the form's settings, validated like a job; nothing queued) and a
    run's curves, drawn again only when its metrics are newer (and not more often than asked)."""
    import os

    from threedistill.errors import UserError
    from threedistill.runs import RunFolder

    before = (len(manager.jobs()), len(run_dirs(manager.outputs)))
    pv = manager.preview(quick("a blue sphere", guidance_scale=6, negative_prompt="green"), samples=2, steps=1)
    assert pv.prompts == ["a blue sphere, front view", "a blue sphere, side view", "a blue sphere, back view"]
    assert pv.guidance_scale == 6.0 and pv.negative_prompt == "green" and pv.images.shape[:2] == (3, 2)
    with pytest.raises(ValidationError) as e:
        manager.preview(quick(""))
    assert e.value.field == "prompt"
    assert (len(manager.jobs()), len(run_dirs(manager.outputs))) == before

    job = manager.wait(manager.submit(quick("a red torus", overrides=QUICK + "\nexport.formats=[]\nexport.turntable=false")))
    assert job["status"] == FINISHED, job["error"]
    folder = RunFolder(job["run_dir"])
    png = manager.curves(job["id"])
    assert png == str(folder.curves_path) and Image.open(png).format == "PNG"
    assert manager.curves(job["run_name"]) == png
    drawn = os.stat(png).st_mtime_ns
    later = time.time() + 5
    os.utime(folder.metrics_path, (later, later))  # new metrics arrived
    manager.curves(job["id"], min_age_s=3600)
    assert os.stat(png).st_mtime_ns == drawn  # too soon: the last figure is kept
    manager.curves(job["id"])
    assert os.stat(png).st_mtime_ns > drawn
    with pytest.raises(UserError):
        manager.curves("../..")


def test_gradio_api_preview_and_curves(client, manager, monkeypatch):
    from threedistill.app import ui

    monkeypatch.setattr(ui, "PREVIEW_SAMPLES", 2)
    monkeypatch.setattr(ui, "PREVIEW_STEPS", 1)
    image, message = client.predict("a red cube", "", "sds-nerf", "shapes", 0, None, 7, None, "", api_name="/preview")
    grid = Image.open(image)
    assert grid.size[0] > 2 * 128 and grid.size[1] > 3 * 128  # 2 columns, 3 rows of >= 128 px cells
    assert "a red cube, front view" in message and "CFG 7" in message and "1 DDIM steps" in message
    image, message = client.predict("", "", "sds-nerf", "shapes", 0, None, None, None, "", api_name="/preview")
    assert image is None and "prompt" in message and "empty" in message
    run = next(r for r in manager.history() if r["status"] == "finished")
    assert Image.open(client.predict(run["name"], api_name="/curves")).format == "PNG"
    assert client.predict("../..", api_name="/curves") is None
