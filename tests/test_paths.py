"""The one path policy (pipeline.PathPolicy: the CLI's and batch's; AppPathPolicy: the web app's)
and the CLI's answer to every bad value: exit 2, one ``error:`` line, nothing left behind,
nothing already written changed."""

import os
import re
from pathlib import Path

import pytest

from threedistill.cli import main
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.pipeline import AppPathPolicy, PathPolicy, PreflightError, RunRequest, prepare_run

SECRET = "s3cr3t-content-xyzzy"


def _tree(root: Path):
    """Every path below ``root`` with its size and mtime (what "nothing changed" compares)."""
    if not root.exists():
        return None
    return sorted((str(p.relative_to(root)), p.is_dir() or p.stat().st_size, p.is_dir() or p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture
def outside(tmp_path):
    """Files outside any outputs folder: a point cloud, a YAML with secret keys, a prior-like folder."""
    o = tmp_path / "outside"
    o.mkdir()
    (o / "cloud.ply").write_text("ply\n" + SECRET + "\n")
    (o / "secret.yaml").write_text(f"{SECRET}: 1\nrun:\n  prompt: {SECRET}\n")
    (o / "passwd").write_text(f"root:x:0:0:{SECRET}:/root:/bin/bash\n")
    (o / "pipeline").mkdir()
    (o / "pipeline" / "model_index.json").write_text("{}")
    return o


# ----------------------------------------------------------------------------------------------
# Config files: errors never quote a file's content
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    f"root:x:0:0:{SECRET}:/root:/bin/bash\n",  # /etc/passwd-like: one odd key
    f"{SECRET}: 1\n",  # an unknown top-level key
    f"run:\n  steps: {SECRET}\n",  # a bad value
    f"run:\n  device: {SECRET}\n",  # a bad choice
    f"run: [{SECRET}\n",  # not YAML
    f"- {SECRET}\n",  # not a mapping
    f"extends: [{SECRET}]\n",  # a parent that does not exist
    f"run:\n  {SECRET}-x: 1\n",
])
def test_config_file_errors_never_quote_its_content(tmp_path, content):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(UserError) as e:
        load_config(f)
    msg = str(e.value)
    assert "\n" not in msg and SECRET not in msg, msg
    assert str(f) in msg, msg


def test_typed_values_are_still_quoted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  steps: 5\n")
    with pytest.raises(UserError, match="got 'gpu'"):
        load_config(f, ["run.device=gpu"])


def test_binary_file_as_config_is_one_line(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="config file") as e:
        load_config(f)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The CLI's policy: reads what the user names; output names stay inside --out
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", "..", ".", "a\\b"])
def test_cli_run_name_stays_inside_out(tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as e:
        prepare_run(RunRequest(prompt="a red cube", out_dir=out, run_name=name))
    assert e.value.check == "paths" and "run.name" in e.value.message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_run_name_through_a_link_out_of_out_is_refused(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(PreflightError, match="leads outside"):
        prepare_run(RunRequest(prompt="a red cube", out_dir=out, run_name="link"))
    cfg, folder = prepare_run(RunRequest(prompt="a red cube", out_dir=out, run_name="fine"))
    assert folder.path == out / "fine" and not folder.path.exists()


def test_cli_may_read_what_the_user_names(tmp_path, outside):
    (outside / "ok.yaml").write_text("run:\n  steps: 7\n")
    cfg, _ = prepare_run(RunRequest(prompt="a red cube", configs=[outside / "ok.yaml"], out_dir=tmp_path / "o",
                                    overrides=[f"representation.gaussians.init=file:{outside / 'cloud.ply'}"]))
    assert cfg.run.steps == 7


# ----------------------------------------------------------------------------------------------
# The app's policy: only the outputs folder, the presets, the listed priors; one message
# ----------------------------------------------------------------------------------------------
def _app_request(outputs, *overrides, **kw):
    return RunRequest(prompt="a red cube", configs=kw.pop("configs", ["sds-nerf"]), overrides=list(overrides),
                      values={"run.out_dir": str(outputs)}, path_policy=AppPathPolicy(outputs), **kw)


def _refusal(outputs, *overrides, **kw):
    with pytest.raises(PreflightError) as e:
        prepare_run(_app_request(outputs, *overrides, **kw))
    assert "\n" not in e.value.message and SECRET not in e.value.message
    return e.value


#: Every path-taking config value: (overrides or request kwargs for a path P).
PATH_FIELDS = {
    "config file": lambda p: ((), {"configs": [str(p)]}),
    "refine.config": lambda p: (("refine.enabled=true", f"refine.config={p}"), {}),
    "gaussians.init": lambda p: ((f"representation.gaussians.init=file:{p}",), {}),
    "mesh.init file": lambda p: ((f"representation.mesh.init=file:{p}",), {}),
    "mesh.init run": lambda p: ((f"representation.mesh.init=run:{p}",), {}),
    "prior.name": lambda p: ((f"prior.name={p}",), {}),
    "prior.cache_dir": lambda p: ((f"prior.cache_dir={p}",), {}),
    "refine prior": lambda p: (("refine.enabled=true", f"refine.overrides=[prior.name={p}]"), {}),
    "refine init": lambda p: (("refine.enabled=true", f"refine.overrides=[representation.gaussians.init=file:{p}]"), {}),
    "resume": lambda p: ((), {"resume": p, "configs": []}),
    "refine_of": lambda p: ((), {"refine_of": p, "configs": []}),
    "run_dir": lambda p: ((), {"run_dir": p}),
}


@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_app_refuses_every_path_outside_with_one_message(tmp_path, outside, field):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    target = {"prior.name": outside / "pipeline", "prior.cache_dir": outside, "refine prior": outside / "pipeline",
              "mesh.init run": outside, "resume": outside, "refine_of": outside, "run_dir": outside,
              "config file": outside / "secret.yaml", "refine.config": outside / "passwd"}.get(field, outside / "cloud.ply")
    missing = outside / "no-such-thing"
    messages = []
    for p in (target, missing):
        overrides, kw = PATH_FIELDS[field](p)
        err = _refusal(outputs, *overrides, **kw)
        assert "not allowed" in err.message, err.message
        messages.append(err.message.replace(str(p), "P"))
    assert messages[0] == messages[1]  # existence cannot be probed
    assert sorted(os.listdir(outputs)) == []


@pytest.mark.parametrize("field", ["gaussians.init", "mesh.init file", "config file", "mesh.init run"])
def test_app_follows_links_out_of_the_outputs_folder(tmp_path, outside, field):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    target = {"config file": outside / "secret.yaml", "mesh.init run": outside}.get(field, outside / "cloud.ply")
    link = outputs / "innocent"
    link.symlink_to(target)
    overrides, kw = PATH_FIELDS[field](link)
    assert "not allowed" in _refusal(outputs, *overrides, **kw).message


def test_app_allows_files_inside_outputs_and_the_presets(tmp_path):
    outputs = tmp_path / "outputs"
    (outputs / "clouds").mkdir(parents=True)
    (outputs / "clouds" / "pc.ply").write_text("ply\n")
    cfg, folder = prepare_run(_app_request(outputs, f"representation.gaussians.init=file:{outputs}/clouds/pc.ply",
                                           "refine.enabled=true", "refine.config=sds-mesh"))
    assert str(cfg.representation.gaussians.init).endswith("pc.ply") and folder.path.parent == outputs


@pytest.mark.parametrize("value", ["../x", "/abs", "a/b", "UPPER", "a b"])
def test_app_run_name_is_a_slug(tmp_path, value):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    assert "run.name" in _refusal(outputs, f"run.name={value}").message


def test_app_prior_list(tmp_path, outside):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    a = _refusal(outputs, f"prior.name={outside / 'pipeline'}").message
    b = _refusal(outputs, f"prior.name={outside / 'nope'}").message
    assert a.replace(str(outside / "pipeline"), "P") == b.replace(str(outside / "nope"), "P")
    ok = AppPathPolicy(outputs, priors=["shapes", str(outside / "pipeline")])
    with pytest.raises(PreflightError) as e:  # listed: the policy lets it through; the loader checks it
        prepare_run(RunRequest(prompt="a red cube", overrides=[f"prior.name={outside / 'pipeline'}"],
                               values={"run.out_dir": str(outputs)}, path_policy=ok))
    assert e.value.check == "prior"


def test_app_history_and_downloads_skip_links_out(tmp_path, outside):
    from threedistill.app.jobs import JobManager
    from threedistill.runs import RunFolder

    outputs = tmp_path / "outputs"
    foreign = outside / "run"
    RunFolder(foreign).path.mkdir()
    (foreign / "run.json").write_text('{"status": "finished", "prompt": "x", "step": 1, "steps": 1}')
    (foreign / "config.yaml").write_text("run:\n  prompt: x\n")
    m = JobManager(outputs, priors=["shapes"])
    try:
        (outputs / "linked").symlink_to(foreign, target_is_directory=True)
        real = outputs / "real"
        real.mkdir()
        (real / "run.json").write_text('{"status": "finished", "prompt": "y", "step": 10000000000000000000000, '
                                       '"steps": "NaN"}')
        (real / "config.yaml").write_text("run:\n  prompt: y\n")
        (real / "model.glb").symlink_to(outside / "passwd")
        names = [r["name"] for r in m.history()]
        assert names == ["real"]  # the linked folder is not this app's
        assert m.history()[0]["step"] == 0 and m.history()[0]["steps"] == 0  # a damaged run.json stays showable
        with pytest.raises(UserError):
            m.run_dir("linked")
        out = m.run_outputs("real")
        assert out["glb"] is None  # a link out is not served
        import zipfile

        with zipfile.ZipFile(out["zip"]) as z:
            assert all("model.glb" not in n for n in z.namelist())
            assert all(SECRET.encode() not in z.read(n) for n in z.namelist())
    finally:
        m.shutdown()


# ----------------------------------------------------------------------------------------------
# The CLI: every bad value is one `error:` line, exit 2, nothing left behind or changed
# ----------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_refused(capsys, needle, *args):
    code, err = _cli(capsys, *args)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("override, needle", [
    (f"run.steps={10**30}", "run.steps"), ("run.steps=1000000000000", "run.steps"), ("run.steps=1e12", "run.steps"),
    ("run.resolution=100000", "run.resolution"), (f"run.seed={2**64}", "run.seed"), ("run.seed=-1", "run.seed"),
    ("guidance.guidance_scale=nan", "guidance.guidance_scale"), ("guidance.guidance_scale=inf", "guidance.guidance_scale"),
    ("camera.batch_size=100000", "camera.batch_size"), ("export.texture_size=100000", "export.texture_size"),
    ("export.mesh_resolution=100000", "export.mesh_resolution"), ("export.turntable_frames=0", "export.turntable_frames"),
    ("representation.gaussians.num_points=1000000000", "num_points"), ("optim.lr=1e300", "optim.lr"),
    ("run.name=../x", "run.name"), ("run.name=/tmp/x", "run.name"), ("prior.name=${oc.env:HOME}", "interpolation"),
    ("guidance.t_max=[0.98,0.5,0,1e30]", "guidance.t_max"), ("run.steps='", "override"),
])
def test_generate_bad_values(tmp_path, capsys, override, needle):
    out = tmp_path / "o"
    _assert_refused(capsys, needle, "generate", "a red cube", "--out", out, override)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def finished_run(tmp_path):
    """A run folder (what the flag checks must not touch: they come before it is read)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  prompt: a red cube\n")
    (run / "run.json").write_text('{"status": "finished"}')
    (run / "model.glb").write_bytes(b"glb")
    return run


@pytest.mark.parametrize("args, needle", [
    (["export", "--resolution", "0"], "--resolution"), (["export", "--resolution", "1"], "--resolution"),
    (["export", "--resolution", "-3"], "--resolution"), (["export", "--resolution", "100000"], "--resolution"),
    (["export", "--texture-size", "0"], "--texture-size"), (["export", "--threshold", "nan"], "--threshold"),
    (["export", "--threshold", "inf"], "--threshold"),
    (["render", "--frames", "0"], "--frames"), (["render", "--frames", "100000000"], "--frames"),
    (["render", "--resolution", "-3"], "--resolution"), (["render", "--resolution", "100000"], "--resolution"),
    (["render", "--fps", "0"], "--fps"),
])
def test_export_and_render_flags(finished_run, capsys, args, needle):
    before = _tree(finished_run)
    _assert_refused(capsys, needle, args[0], finished_run, *args[1:])
    assert _tree(finished_run) == before


@pytest.mark.parametrize("flag, value", [("--workers", 0), ("--workers", 100000), ("--threads", 0), ("--threads", -1),
                                         ("--retries", -1), ("--retries", 10**6), ("--seeds", 0), ("--seeds", 10**7)])
def test_batch_flags_leave_nothing(tmp_path, capsys, flag, value):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "batch"
    _assert_refused(capsys, flag, "batch", prompts, "--out", out, flag, value)
    assert not out.exists()


def test_bad_value_does_not_change_an_existing_run(tmp_path, capsys, finished_run):
    before = _tree(finished_run)
    _assert_refused(capsys, "run.steps", "generate", "--resume", finished_run, f"run.steps={10**30}")
    assert _tree(finished_run) == before
