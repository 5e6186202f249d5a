"""End to end through the CLI: generate, resume, export, render, batch, and every bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trimesh
from safetensors.torch import load_file

from threedistill.cli import main

# Small, fast settings: 32x32 renders, 24 samples per ray, a small hash grid, a short turntable.
FAST = [
    "run.resolution=32", "representation.nerf.num_samples=24", "representation.nerf.n_levels=6",
    "representation.nerf.log2_hashmap_size=12", "representation.nerf.max_resolution=64",
    "export.mesh_resolution=40", "export.turntable_frames=6", "export.turntable_resolution=32",
    "run.progress=false", "guidance.guidance_scale=7.5",
]


def _generate(tmp_path, prior_path, *extra, name="run", prompt="a red cube"):
    args = ["generate", prompt, "--out", str(tmp_path), f"prior.name={prior_path}", f"run.name={name}", *FAST, *extra]
    return main(args), tmp_path / name


@pytest.mark.slow
def test_generate_writes_every_output(tmp_path, tiny_sd_path, capsys):
    code, run = _generate(tmp_path, tiny_sd_path, "run.steps=50", "run.preview_every=25", "run.checkpoint_every=20",
                          "export.formats=[glb,obj,ply]")
    assert code == 0, capsys.readouterr().err
    for f in ("config.yaml", "metrics.jsonl", "run.json", "turntable.mp4", "model.glb", "model.obj", "model.ply"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step_000025.png", "step_000050.png"]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.safetensors"))
    assert ckpts == ["step_000020.safetensors", "step_000040.safetensors", "step_000050.safetensors"]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 51))
    for key in ("loss", "grad_norm", "t", "time_render", "time_guidance", "time_backward", "time_step"):
        assert all(key in l for l in lines), key
    assert all(20 <= l["t"] <= 980 for l in lines)
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 50
    # The mesh reloads in trimesh: PLY with vertex colors, GLB and OBJ (+ MTL + PNG) with the baked texture.
    ply = trimesh.load(run / "model.ply", force="mesh")
    assert len(ply.faces) > 0 and ply.visual.kind == "vertex"
    assert (run / "model.mtl").is_file() and (run / "model.png").is_file()
    obj = trimesh.load(run / "model.obj", force="mesh")
    assert len(obj.faces) == len(ply.faces) and obj.visual.kind == "texture"
    (geom,) = trimesh.load(run / "model.glb").geometry.values()
    assert len(geom.faces) == len(ply.faces) and geom.visual.material.baseColorTexture.size == (1024, 1024)
    # The turntable has the configured number of frames.
    import imageio.v3 as iio

    assert len(list(iio.imiter(run / "turntable.mp4"))) == 6
    # Checkpoints hold the representation and optimizer state, never the prior.
    tensors = load_file(str(run / "checkpoints" / "step_000050.safetensors"))
    assert any(k.startswith("representation.") for k in tensors)
    assert any(k.startswith("optim.") for k in tensors)
    assert not any("unet" in k or "text_encoder" in k or "vae" in k for k in tensors)

    # export / render subcommands on the finished run
    assert main(["export", str(run), "--format", "ply", "--output", str(tmp_path / "again.ply")]) == 0
    assert len(trimesh.load(tmp_path / "again.ply").faces) > 0
    assert main(["render", str(run), "--frames", "4", "--resolution", "16", "--output", str(tmp_path / "t.mp4")]) == 0
    assert len(list(iio.imiter(tmp_path / "t.mp4"))) == 4


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, tiny_sd_path):
    # The skip grid refreshes at steps 0, 4, 8: the resumed run must restore the step-4 grid.
    steps = ["run.checkpoint_every=6", "export.formats=[]", "export.turntable=false", "run.preview_every=100",
             "representation.nerf.skip_refresh_every=4"]
    code, full = _generate(tmp_path, tiny_sd_path, "run.steps=12", *steps, name="full")
    assert code == 0
    # A run killed after step 6: simulate by running 6 steps, then resume it to 12.
    code, part = _generate(tmp_path, tiny_sd_path, "run.steps=6", *steps, name="part")
    assert code == 0
    # A killed run also leaves metric lines past its last checkpoint; resume must drop them.
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    assert main(["generate", "--resume", str(part), "run.steps=12"]) == 0
    a = load_file(str(full / "checkpoints" / "step_000012.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000012.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_logged = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 13))


@pytest.mark.slow
def test_resume_is_exact_with_the_clean_up_schedules(tmp_path, tiny_sd_path):
    """The tapering blob, the transmittance target and the albedo smoothness depend on the step
    only: a run stopped mid-taper and resumed equals the uninterrupted one bit for bit."""
    steps = ["run.checkpoint_every=3", "export.formats=[]", "export.turntable=false", "run.preview_every=100",
             "representation.nerf.skip_refresh_every=2", "representation.nerf.blob_density=[10.0,0.0,0,8]",
             "representation.nerf.lambda_transmittance=[0.0,1.0,0,6]", "representation.nerf.transmittance_target=0.9",
             "representation.nerf.lambda_albedo_smooth=[1.0,5.0,0,6]", "representation.nerf.ambient_only_steps=0",
             "representation.nerf.lambda_normal_smooth_3d=[1.0,5.0,0,6]"]
    code, full = _generate(tmp_path, tiny_sd_path, "run.steps=6", *steps, name="full")
    assert code == 0
    code, part = _generate(tmp_path, tiny_sd_path, "run.steps=3", *steps, name="part")
    assert code == 0
    assert main(["generate", "--resume", str(part), "run.steps=6"]) == 0
    a = load_file(str(full / "checkpoints" / "step_000006.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000006.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_albedo_smooth" in m for m in logged) and any("loss_transmittance" in m for m in logged)
    assert all("loss_normal_smooth_3d" in m for m in logged)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sds", "vsd", "esd", "ism", "csd", "nfsd"])
def test_every_loss_runs_and_resumes_exactly(tmp_path, tiny_sd_path, loss):
    """Each loss end to end through the CLI; 3 steps + resume to 6 equals 6 straight steps,
    including the VSD/ESD LoRA, its camera embedding and their optimizer state."""
    steps = [f"guidance.name={loss}", "prior.negative_prompt=blurry", "run.checkpoint_every=3", "export.formats=[ply]",
             "export.turntable=false", "run.preview_every=100", "export.mesh_resolution=24"]
    code, full = _generate(tmp_path, tiny_sd_path, "run.steps=6", *steps, name="full")
    assert code == 0
    assert (full / "model.ply").is_file()
    code, part = _generate(tmp_path, tiny_sd_path, "run.steps=3", *steps, name="part")
    assert code == 0
    assert main(["generate", "--resume", str(part), "run.steps=6"]) == 0
    a = load_file(str(full / "checkpoints" / "step_000006.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000006.safetensors"))
    assert a.keys() == b.keys()
    lora_keys = [k for k in a if k.startswith("guidance.")]
    assert bool(lora_keys) == (loss in ("vsd", "esd"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if lora_keys:  # the LoRA trained: some adapter weight moved away from its zero start
        assert any(float(a[k].abs().sum()) > 0 for k in lora_keys if "lora_B" in k)
    lines = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(math.isfinite(l["loss"]) for l in lines)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sds", "vsd", "esd", "ism", "csd", "nfsd"])
def test_every_loss_runs_with_gaussians(tmp_path, tiny_sd_path, loss):
    code, run = _generate(tmp_path, tiny_sd_path, f"guidance.name={loss}", "prior.negative_prompt=blurry",
                          "representation.name=gaussians", "representation.gaussians.num_points=300",
                          "run.steps=3", "export.formats=[]", "export.turntable=false", "run.preview_every=100")
    assert code == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(l["loss"]) for l in lines)
    tensors = load_file(str(run / "checkpoints" / "step_000003.safetensors"))
    assert any(k.startswith("representation.") for k in tensors)
    assert any(k.startswith("guidance.") for k in tensors) == (loss in ("vsd", "esd"))


@pytest.mark.slow
# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, nothing half-written.
# ---------------------------------------------------------------------------------------------
def _run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "threedistill.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, err


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_sd_path):
    prior = f"prior.name={tiny_sd_path}"
    out = str(tmp_path / "o")
    _assert_one_line_error(_run_cli("generate", "", "--out", out, prior), "prompt is empty")
    _assert_one_line_error(_run_cli("generate", "   ", "--out", out, prior), "prompt is empty")
    _assert_one_line_error(_run_cli("generate", "run.steps=5", "--out", out, prior), "prompt is missing")
    _assert_one_line_error(_run_cli("generate", "a cube", "--out", out, prior, "run.stepz=5"), "run.stepz")
    _assert_one_line_error(_run_cli("generate", "a cube", "--out", out, prior, "run.steps=many"), "run.steps")
    _assert_one_line_error(_run_cli("generate", "a cube", "--out", out, prior, "guidance.name=nope"), "guidance.name")
    _assert_one_line_error(_run_cli("generate", "a cube", "--config", str(tmp_path / "nope.yaml")), "not found")
    _assert_one_line_error(_run_cli("generate", "a cube", "--out", out, "prior.name=no-such/model",
                                    f"prior.cache_dir={tmp_path / 'hf'}"), "no-such/model")
    _assert_one_line_error(_run_cli("generate", "--resume", str(tmp_path / "missing")), "does not exist")
    _assert_one_line_error(_run_cli("export", str(tmp_path)), "config.yaml")
    _assert_one_line_error(_run_cli("render", str(tmp_path / "missing")), "missing")
    _assert_one_line_error(_run_cli("batch", str(tmp_path / "none.txt")), "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    _assert_one_line_error(_run_cli("batch", str(empty)), "has no rows")
    _assert_one_line_error(_run_cli("frobnicate"), "invalid choice")
    # Nothing was left behind by the failed generates.
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(tmp_path, tiny_sd_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _run_cli("generate", "a cube", "--out", str(blocker / "sub"), f"prior.name={tiny_sd_path}")
    _assert_one_line_error(proc, "not writable")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        _assert_one_line_error(_run_cli("generate", "a cube", "--out", str(ro), f"prior.name={tiny_sd_path}"), "not writable")


def test_existing_run_folder_is_not_clobbered(tmp_path, tiny_sd_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  prompt: old\n")
    proc = _run_cli("generate", "a cube", "--out", str(tmp_path), "run.name=r", f"prior.name={tiny_sd_path}")
    _assert_one_line_error(proc, "already holds a run")
    assert (run / "config.yaml").read_text() == "run:\n  prompt: old\n"


@pytest.mark.parametrize("error, message", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "error: GPU out of memory; lower"),
    (MemoryError(), "error: out of memory; lower"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
     "error: out of memory; lower"),
])
def test_out_of_memory_is_one_line_and_exit_1(monkeypatch, capsys, error, message):
    def run_out(args):
        raise error

    monkeypatch.setattr("threedistill.cli.cmd_eval", run_out)
    assert main(["eval", "some-run"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
    def fail(args):
        raise RuntimeError("out of memory, says a message that is not the allocator's")

    monkeypatch.setattr("threedistill.cli.cmd_eval", fail)
    with pytest.raises(RuntimeError):
        main(["eval", "some-run"])
