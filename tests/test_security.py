"""The running web app under attack: every path-taking field and every numeric field of ``/submit``,
through ``gradio_client`` and raw HTTP (with values JSON cannot represent), is refused with a
field message; nothing outside the outputs folder is read, listed or served.

One app on a free loopback port, over a JobManager whose outputs folder sits beside a folder of
secrets (a point cloud, a YAML file, a passwd-like file, a pipeline-like folder) and holds
symlinks that lead to them.
"""

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from threedistill.app.jobs import JobManager  # noqa: E402

SECRET = "s3cr3t-c0ntent-plugh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "cloud.ply").write_text(f"ply\n{SECRET}\n")
    (secrets / "conf.yaml").write_text(f"{SECRET}: 1\nrun:\n  prompt: {SECRET}\n  device: {SECRET}\n")
    (secrets / "passwd").write_text(f"root:x:0:0:{SECRET}:/root:/bin/bash\n")
    (secrets / "pipeline").mkdir()
    (secrets / "pipeline" / "model_index.json").write_text("{}")
    run = secrets / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"run:\n  prompt: {SECRET}\n")
    (run / "run.json").write_text(json.dumps({"status": "finished", "prompt": SECRET, "step": 1, "steps": 1}))
    (run / "model.glb").write_text(SECRET)
    outputs = root / "outputs"
    outputs.mkdir()
    (outputs / "link-cloud.ply").symlink_to(secrets / "cloud.ply")
    (outputs / "link-conf.yaml").symlink_to(secrets / "conf.yaml")
    (outputs / "link-run").symlink_to(run, target_is_directory=True)
    (outputs / "link-pipeline").symlink_to(secrets / "pipeline", target_is_directory=True)
    manager = JobManager(outputs, priors=["shapes"])
    from threedistill.app.ui import launch

    demo, _, url = launch("127.0.0.1", _free_port(), manager=manager, prevent_thread_lock=True, quiet=True)
    try:
        yield {"root": root, "secrets": secrets, "outputs": outputs, "manager": manager, "url": url.rstrip("/")}
    finally:
        demo.close()
        manager.shutdown()


@pytest.fixture(scope="module")
def client(world):
    from gradio_client import Client

    return Client(world["url"], verbose=False)


FORM = {"prompt": "a red cube", "negative_prompt": "", "preset": "sds-nerf", "prior": "shapes", "seed": None,
        "steps": None, "guidance_scale": None, "resolution": None, "overrides": ""}
ORDER = list(FORM)


def _path_attacks(world):
    """(what, form changes) for every path-taking field, each for a path that exists outside, one
    that does not, and a link in the outputs folder that leads outside."""
    s, o = world["secrets"], world["outputs"]
    targets = {
        "gaussians.init": ("representation.gaussians.init=file:{}", [s / "cloud.ply", s / "nope.ply", o / "link-cloud.ply"]),
        "mesh.init file": ("representation.mesh.init=file:{}", [s / "cloud.ply", s / "nope.ply", o / "link-cloud.ply"]),
        "mesh.init run": ("representation.mesh.init=run:{}", [s / "run", s / "nope", o / "link-run"]),
        "gaussians.init run": ("representation.gaussians.init=run:{}", [s / "run", s / "nope", o / "link-run"]),
        "refine.config": ("refine.enabled=true\nrefine.config={}", [s / "passwd", s / "nope.yaml", o / "link-conf.yaml",
                                                                   "/etc/passwd", "../../../../etc/passwd"]),
        "refine prior": ("refine.enabled=true\nrefine.overrides=[prior.name={}]", [s / "pipeline", s / "nope"]),
        "prior.cache_dir": ("prior.cache_dir={}", [s, s / "nope"]),
        "prior.name (advanced)": ("prior.name={}", [s / "pipeline", s / "nope", o / "link-pipeline"]),
        "run.out_dir": ("run.out_dir={}", [s, s / "nope"]),
        "run.name": ("run.name={}", ["../escape", "/tmp/abs", "link-run", "a/b"]),
    }
    for what, (template, paths) in targets.items():
        for p in paths:
            yield what, str(p), {"overrides": template.format(p)}
    for p in (s / "pipeline", s / "nope", o / "link-pipeline", "/etc", "~"):
        yield "prior field", str(p), {"prior": str(p)}
    for p in (s / "conf.yaml", "../secrets/conf", "/etc/passwd"):
        yield "preset field", str(p), {"preset": str(p)}


NUMBERS = [0, -1, -3, 10**30, 2**63, 2**64, 1e12, 1e308, 0.5, "1e999", "nan", "inf", "-inf", "many", [], [1], {"a": 1},
           True]
NUMERIC_FIELDS = ["seed", "steps", "guidance_scale", "resolution"]
NUMERIC_KEYS = ["run.steps", "run.seed", "run.resolution", "camera.batch_size", "export.texture_size",
                "export.mesh_resolution", "export.turntable_frames", "export.turntable_resolution", "guidance.guidance_scale",
                "optim.lr", "representation.gaussians.num_points", "representation.gaussians.max_gaussians"]
KEY_VALUES = ["1e999", ".nan", ".inf", "-.inf", str(10**30), str(2**64), "1e12", "-5", "${oc.env:HOME}", "'"]


def _refused(result, what):
    assert isinstance(result, dict) and result.get("ok") is False, (what, result)
    assert result.get("field") in ORDER, (what, result)
    assert result["error"] and "\n" not in result["error"] and SECRET not in result["error"], (what, result)


def _nothing_started(world):
    from threedistill.runs import OutputsFolder

    assert world["manager"].jobs() == []
    # The app's own saved queue (empty) may be there; nothing else was added.
    names = sorted(p.name for p in world["outputs"].iterdir() if p.name != OutputsFolder.QUEUE)
    assert names == ["link-cloud.ply", "link-conf.yaml", "link-pipeline", "link-run"]


def test_every_path_field_is_refused_through_gradio_client(world, client):
    tried = refused = 0
    by_field = {}
    for what, path, change in _path_attacks(world):
        form = {**FORM, **change}
        r = client.predict(*[form[k] for k in ORDER], api_name="/submit")
        tried += 1
        _refused(r, what)
        refused += 1
        unquoted = re.sub(r"'[^']*'", "'P'", r["error"])  # the message without the path it quotes
        if path and "nope" not in path and "link" not in path:
            by_field.setdefault(what, {})["exists"] = unquoted
        elif "nope" in path:
            by_field.setdefault(what, {})["missing"] = unquoted
    for what, m in by_field.items():  # existence cannot be probed
        if len(m) == 2:
            assert m["exists"] == m["missing"], (what, m)
    assert tried == refused and tried >= 30
    _nothing_started(world)


def test_every_numeric_field_is_refused_through_gradio_client(world, client):
    tried = 0
    for name in NUMERIC_FIELDS:
        for v in NUMBERS:
            if name == "guidance_scale" and v in (0.5, 1e12) or name in ("seed",) and v in (0, 0.5):
                continue  # valid for that field (checked below), or a fraction
            if v in (0, 0.5) and name == "guidance_scale":
                continue
            form = {**FORM, name: v}
            try:
                r = client.predict(*[form[k] for k in ORDER], api_name="/submit")
            except Exception as e:  # the client itself may refuse to encode a value: then nothing was sent
                assert isinstance(e, (ValueError, TypeError)), e
                continue
            tried += 1
            if name == "seed" and v == 0:
                continue
            _refused(r, (name, v))
    for key in NUMERIC_KEYS:
        for v in KEY_VALUES:
            r = client.predict(*[{**FORM, "overrides": f"{key}={v}"}[k] for k in ORDER], api_name="/submit")
            tried += 1
            _refused(r, (key, v))
    assert tried > 100
    _nothing_started(world)


def _raw_submit(url, body: str):
    """POST /submit's JSON body as written (NaN, Infinity, 1e999, huge ints: what JSON libraries of
    other languages send), then read its result from the event stream."""
    req = urllib.request.Request(f"{url}/gradio_api/call/submit", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            event = json.loads(resp.read())["event_id"]
    except urllib.error.HTTPError as e:  # refused by the server before the app: nothing submitted
        return {"http": e.code}
    with urllib.request.urlopen(f"{url}/gradio_api/call/submit/{event}", timeout=60) as resp:
        text = resp.read().decode()
    kind = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("event:")), None)
    data = [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("data:")]
    if kind == "complete":
        return json.loads(data[-1])[0]
    return {"event": kind, "data": data}


def test_raw_http_values_json_cannot_represent(world):
    url = world["url"]
    raw_numbers = ["NaN", "Infinity", "-Infinity", "1e999", str(10**30), str(2**64), "-1", "\"nan\"", "[]", "{}",
                   "true", "\"1e999\""]
    tried = refused = 0
    for i, field in enumerate(ORDER):
        values = raw_numbers if field in NUMERIC_FIELDS else ["NaN", "[]", "{}", "123", "true",
                                                               json.dumps("x" * 200_000), json.dumps("a\u0000b")]
        for raw in values:
            data = [json.dumps(FORM[k]) if k != field else raw for k in ORDER]
            r = _raw_submit(url, '{"data": [' + ", ".join(data) + "]}")
            tried += 1
            if "http" in r:
                refused += 1
                continue
            if "event" in r:  # an error event: refused before the app, nothing submitted
                assert r["event"] == "error", r
                refused += 1
                continue
            _refused(r, (field, raw))
            refused += 1
    assert tried == refused
    _nothing_started(world)


def test_nothing_outside_is_listed_or_served(world, client):
    url, secrets = world["url"], world["secrets"]
    hist = client.predict(api_name="/history")
    assert all(r["name"] != "link-run" and SECRET not in json.dumps(r) for r in hist)
    out = client.predict("link-run", api_name="/outputs")
    assert SECRET not in json.dumps(out, default=str)
    for target in (secrets / "passwd", world["outputs"] / "link-cloud.ply", world["outputs"] / "link-run" / "model.glb",
                   "/etc/passwd"):
        for route in (f"/gradio_api/file={target}", f"/file={target}"):
            try:
                with urllib.request.urlopen(url + route, timeout=30) as resp:
                    body = resp.read()
            except urllib.error.HTTPError:
                continue
            assert SECRET.encode() not in body and b"root:x:0:0" not in body, route
