"""Coarse-to-fine (threedistill/pipeline.py): a chained run through the CLI, `refine RUN_DIR`,
resuming a chained run interrupted in its refine stage, and bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from threedistill.cli import main
from threedistill.config import load_config, to_yaml
from threedistill.distill import Distiller
from threedistill.pipeline import refine_config

# Tiny stages: a 2-step NeRF at 16 px, then a 3-step mesh at 24 px (refine.overrides).
COARSE = ["run.resolution=16", "representation.nerf.num_samples=16", "representation.nerf.n_levels=4",
          "representation.nerf.log2_hashmap_size=12", "representation.nerf.max_resolution=32", "run.steps=2",
          "export.mesh_resolution=24", "export.turntable=false", "export.formats=[glb]", "export.texture=false",
          "run.progress=false", "guidance.guidance_scale=7.5", "run.preview_every=100"]
REFINE = "refine.overrides=[run.steps=3,run.resolution=24,representation.mesh.ambient_only_steps=1]"


def _chain(out: Path, prior: Path, name: str, *extra: str) -> int:
    return main(["generate", "a red cube", "-c", "sds-nerf-then-mesh", "--out", str(out), f"prior.name={prior}",
                 f"run.name={name}", *COARSE, REFINE, *extra])


def _coarse_vertex_count(run_dir: Path) -> int:
    from threedistill.runs import load_trained_representation
    from threedistill.export.mesh import extract_mesh
    from threedistill.inputs import matching_cameras

    # The refine stage starts from the level whose silhouette matches the render (init_surface).
    cfg, rep, _ = load_trained_representation(run_dir)
    return len(extract_mesh(rep, resolution=24, match_cameras=matching_cameras(cfg.camera)).vertices)


@pytest.fixture(scope="module")
def chained(tmp_path_factory, tiny_sd_path):
    out = tmp_path_factory.mktemp("chain")
    assert _chain(out, tiny_sd_path, "full") == 0
    return out / "full"


def test_chained_run_refines_the_coarse_surface(chained, capsys):
    coarse, refine = chained, chained / "refine"
    cst = json.loads((coarse / "run.json").read_text())
    rst = json.loads((refine / "run.json").read_text())
    assert cst["status"] == "finished" and cst["step"] == 2 and cst["refine"] == str(refine.resolve())
    assert rst["status"] == "finished" and rst["step"] == 3 and rst["coarse"] == str(coarse.resolve())
    assert (coarse / "model.glb").is_file() and (refine / "model.glb").is_file()  # the coarse outputs stay
    ccfg, rcfg = load_config(None, base=_yaml(coarse)), load_config(None, base=_yaml(refine))
    assert ccfg.representation.name == "nerf" and ccfg.run.resolution == 16 and ccfg.refine.enabled
    assert rcfg.representation.name == "mesh" and rcfg.run.resolution == 24 and rcfg.run.steps == 3
    assert rcfg.representation.mesh.init == f"run:{coarse.resolve()}" and not rcfg.refine.enabled
    assert rcfg.prior == ccfg.prior and rcfg.run.prompt == ccfg.run.prompt and rcfg.run.seed == ccfg.run.seed
    assert rcfg.export == ccfg.export
    # The refine stage started from the coarse surface: its mesh has the coarse mesh's vertices.
    t = load_file(str(refine / "checkpoints" / "step_000003.safetensors"))
    assert t["representation.base_vertices"].shape[0] == _coarse_vertex_count(coarse) > 20
    assert float(t["representation.offsets"].abs().max()) > 0


def _yaml(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml")


def test_interrupted_chain_resumes_into_the_refine_stage(chained, tmp_path, tiny_sd_path, monkeypatch, capsys):
    real = Distiller.step_stats  # the loop's step (train_step reads its stats at once)

    def interrupt_refine(self, step, timer=None):
        if self.cfg.representation.name == "mesh" and step == 1:
            raise KeyboardInterrupt
        return real(self, step, timer)

    monkeypatch.setattr(Distiller, "step_stats", interrupt_refine)
    assert _chain(tmp_path, tiny_sd_path, "part") == 130
    part = tmp_path / "part"
    assert json.loads((part / "run.json").read_text())["status"] == "finished"
    assert json.loads((part / "run.json").read_text())["refine"] == str((part / "refine").resolve())
    assert json.loads((part / "refine" / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(Distiller, "step_stats", real)
    # Both folders move together: the refine stage's init follows the coarse run to where it is now.
    moved = tmp_path / "moved"
    part.rename(moved)
    part = moved
    capsys.readouterr()
    assert main(["generate", "--resume", str(part)]) == 0
    printed = capsys.readouterr().out
    assert f"refine finished: {(part / 'refine').resolve()}" in printed
    assert f"final: {(part / 'refine').resolve() / 'model.glb'}" in printed
    assert json.loads((part / "refine" / "run.json").read_text())["status"] == "finished"
    steps = [json.loads(l)["step"] for l in (part / "refine" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    a = load_file(str(chained / "refine" / "checkpoints" / "step_000003.safetensors"))
    b = load_file(str(part / "refine" / "checkpoints" / "step_000003.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # resumed exactly: the same as the uninterrupted chain
        assert torch.equal(a[k], b[k]), k
    assert len(list((part / "checkpoints").glob("*.safetensors"))) == 1  # the coarse stage was not rerun


def test_resume_of_a_chain_killed_between_the_stages_starts_the_refine_stage(chained, tmp_path, tiny_sd_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(chained, copy, ignore=shutil.ignore_patterns("refine"))
    st = json.loads((copy / "run.json").read_text())
    del st["refine"]
    (copy / "run.json").write_text(json.dumps(st))
    assert main(["generate", "--resume", str(copy), "run.steps=1"]) == 0  # overrides go to the stage resumed
    rcfg = load_config(None, base=_yaml(copy / "refine"))
    assert rcfg.representation.mesh.init == f"run:{copy.resolve()}" and rcfg.run.steps == 1
    assert json.loads((copy / "refine" / "run.json").read_text())["status"] == "finished"
    assert json.loads((copy / "run.json").read_text())["step"] == 2  # the coarse stage was not rerun


def test_refine_command_from_an_existing_run(tmp_path, tiny_sd_path, capsys):
    assert main(["generate", "a red cube", "--out", str(tmp_path), f"prior.name={tiny_sd_path}", "run.name=plain",
                 *COARSE]) == 0
    plain = tmp_path / "plain"
    assert not (plain / "refine").exists()  # refine.enabled is off by default
    capsys.readouterr()
    assert main(["refine", str(plain), "run.steps=2", "run.resolution=16"]) == 0
    printed = capsys.readouterr().out
    assert f"final: {(plain / 'refine').resolve() / 'model.glb'}" in printed
    rcfg = load_config(None, base=_yaml(plain / "refine"))
    assert rcfg.representation.name == "mesh" and rcfg.run.steps == 2
    assert rcfg.guidance.name == "sds" and rcfg.prior.name == str(tiny_sd_path)
    t = load_file(str(plain / "refine" / "checkpoints" / "step_000002.safetensors"))
    assert t["representation.base_vertices"].shape[0] == _coarse_vertex_count(plain)
    assert json.loads((plain / "run.json").read_text())["refine"] == str((plain / "refine").resolve())
    capsys.readouterr()
    _one_line_error(capsys, main(["refine", str(plain)]), "already holds", f"--resume {plain / 'refine'}")


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for n in needles:
        assert n in err, err


def test_bad_refine_inputs(chained, tmp_path, tiny_sd_path, capsys):
    capsys.readouterr()
    _one_line_error(capsys, main(["refine", str(tmp_path / "missing")]), "does not exist")
    _one_line_error(capsys, main(["refine", str(tmp_path)]), "not a threedistill run folder")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(to_yaml(load_config(None, ["run.prompt=a red cube"])))
    (unfinished / "run.json").write_text(json.dumps({"status": "running", "step": 1}))
    _one_line_error(capsys, main(["refine", str(unfinished)]), "not a finished run", "--resume")
    assert not (unfinished / "refine").exists()
    # A refine config that is not a mesh representation, from the command line or a chained config.
    before = sorted(p.name for p in chained.iterdir())
    _one_line_error(capsys, main(["refine", str(chained), "--config", "sds-nerf"]), "sds-nerf",
                    "representation.name=gaussians or mesh")
    _one_line_error(capsys, main(["refine", str(chained), "representation.name=nerf"]), "must be gaussians or mesh")
    _one_line_error(capsys, main(["refine", str(chained)]), "already holds a refine stage")
    assert sorted(p.name for p in chained.iterdir()) == before
    out = tmp_path / "o"
    _one_line_error(capsys, main(["generate", "a cube", "-c", "sds-nerf-then-mesh", "--out", str(out),
                                  f"prior.name={tiny_sd_path}", "refine.config=csd-nerf"]), "refine stage")
    _one_line_error(capsys, main(["generate", "a cube", "-c", "sds-nerf-then-mesh", "--out", str(out),
                                  f"prior.name={tiny_sd_path}", "refine.overrides=[run.stepz=2]"]), "run.stepz")
    _one_line_error(capsys, main(["generate", "a cube", "--out", str(out), "refine.overrides=[oops]"]),
                    "refine.overrides")
    assert not out.exists()  # nothing half-written: the refine config is checked before the coarse stage


def test_nerf_then_gaussians_starts_the_gaussians_inside_the_nerf_surface(tmp_path, tiny_sd_path):
    import trimesh

    from threedistill.inputs import surface_of_run

    out = tmp_path / "o"
    assert main(["generate", "a red cube", "-c", "sds-nerf-then-gaussians", "--out", str(out),
                 f"prior.name={tiny_sd_path}", "run.name=ng", *COARSE,
                 "refine.overrides=[run.steps=2,run.resolution=16,representation.gaussians.num_points=300,"
                 "representation.gaussians.init_inset=match]"]) == 0
    coarse, stage = out / "ng", out / "ng" / "refine"
    rcfg = load_config(None, base=_yaml(stage))
    assert rcfg.representation.name == "gaussians" and rcfg.run.steps == 2
    assert rcfg.representation.gaussians.init == f"run:{coarse.resolve()}"
    assert json.loads((stage / "run.json").read_text())["status"] == "finished"
    assert (stage / "model.glb").is_file()
    # The start: the NeRF's silhouette-matched surface, every vertex moved the same distance inwards.
    v0, f0, _ = surface_of_run(coarse, "t", None, torch.device("cpu"), "silhouette")
    from threedistill.meshio import read_mesh

    start = read_mesh(stage / "inputs" / "representation.gaussians.init.npz", "t")
    np.testing.assert_array_equal(start.faces, f0)
    normals = trimesh.Trimesh(v0, f0, process=False).vertex_normals
    depth = ((v0 - start.vertices) * normals).sum(1)  # along the outward normals
    assert depth.min() > 0 and np.ptp(depth) < 1e-9
    # The Gaussians were placed on it (2 steps at lr 1e-3 move a mean by well under 0.01).
    means = load_file(str(stage / "checkpoints" / "step_000002.safetensors"))["representation.means"].numpy()
    assert len(means) <= 300
    _, dist, _ = trimesh.proximity.closest_point_naive(trimesh.Trimesh(start.vertices, start.faces, process=False), means)
    assert dist.max() < 0.01


def test_presets():
    nerf, gauss = load_config("sds-nerf-then-mesh"), load_config("sds-gaussians-then-mesh")
    assert nerf.representation.name == "nerf" and gauss.representation.name == "gaussians"
    for cfg in (nerf, gauss):
        assert cfg.refine.enabled and cfg.refine.config == "sds-mesh"
        assert "run.resolution=64" in cfg.refine.overrides
        # the refine stage samples Magic3D's fine-stage t range, [0.02, 0.5]
        stage = refine_config(cfg, Path("coarse"))
        assert (stage.guidance.t_min, stage.guidance.t_max, stage.run.resolution) == (0.02, 0.5, 64)
    assert nerf.guidance == load_config("sds-nerf").guidance  # the coarse NeRF stage is the quick start's
    assert gauss.guidance == load_config("sds-gaussians").guidance  # the Gaussians keep their 800-step SDS
    assert not load_config("sds-nerf").refine.enabled
    # NeRF -> Gaussians: the coarse NeRF is the quick start's, the stage is sds-gaussians started inside its surface
    chain = load_config("sds-nerf-then-gaussians")
    stage = refine_config(chain, Path("coarse"))
    assert chain.guidance == nerf.guidance and chain.representation.name == "nerf"
    assert stage.representation.name == "gaussians" and stage.representation.gaussians.init_inset == "match"
    assert stage.representation.gaussians.init_opacity == 0.7  # an opaque start (one layer of Gaussians)
    assert stage.guidance == gauss.guidance and stage.run.steps == load_config("sds-gaussians").run.steps


def test_batch_runs_and_resumes_chains(tmp_path, tiny_sd_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "batch"
    args = ["batch", str(prompts), "-c", "sds-nerf-then-mesh", "--out", str(out), "--no-progress",
            f"prior.name={tiny_sd_path}", *COARSE, REFINE]
    assert main(args) == 0
    (entry,) = [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]
    refine = out / entry["run_dir"] / "refine"
    assert json.loads((refine / "run.json").read_text())["status"] == "finished"
    assert entry["outputs"]["glb"] == f"{entry['run_dir']}/refine/model.glb"  # the chain's last stage
    capsys.readouterr()
    assert main(args) == 0
    assert "1 already done, 0 rejected, 0 to run" in capsys.readouterr().out
    # The refine stage left unfinished (killed): the batch resumes it, not the finished coarse stage.
    st = json.loads((refine / "run.json").read_text())
    st["status"] = "running"
    (refine / "run.json").write_text(json.dumps(st))
    for p in (refine / "checkpoints").glob("step_000003.*"):
        p.unlink()
    coarse_status = (out / entry["run_dir"] / "run.json").read_text()
    assert main(args) == 0
    assert "0 already done, 0 rejected, 1 to run" in capsys.readouterr().out
    (entry,) = [json.loads(line) for line in (out / "batch.jsonl").read_text().splitlines()]
    assert entry["attempts"] == 2 and entry["state"] == "done"
    assert (out / entry["run_dir"] / "run.json").read_text() == coarse_status  # the coarse stage was not run again
    assert json.loads((refine / "run.json").read_text())["status"] == "finished"
    assert (refine / "checkpoints" / "step_000003.safetensors").is_file()
