from collections.abc import Sequence

import pytest

from threedistill.config import load_config, parse_schedule, scheduled
from threedistill.errors import UserError


def test_defaults_and_overrides():
    cfg = load_config(overrides=["run.steps=7", "guidance.guidance_scale=50", "run.resolution=32"])
    assert cfg.run.steps == 7 and cfg.run.resolution == 32
    assert scheduled(cfg.guidance.guidance_scale, 0) == 50.0
    assert cfg.guidance.name == "sds" and cfg.representation.name == "nerf"


def test_design_example_overrides_parse():
    cfg = load_config(overrides=["prior.name=shapes", "guidance.name=ism", "representation.name=gaussians",
                                 "run.steps=500"])
    assert cfg.prior.name == "shapes" and cfg.run.steps == 500


@pytest.mark.parametrize("override, key", [
    ("run.stepz=3", "run.stepz"),
    ("bogus=1", "bogus"),
    ("representation.nerf.num_samplez=3", "representation.nerf.num_samplez"),
    ("run.steps=abc", "run.steps"),
    ("run.seed=1.5", "run.seed"),
    ("run.steps=0", "run.steps"),
    ("run.resolution=-4", "run.resolution"),
    ("guidance.t_max=[1,2]", "guidance.t_max"),
    ("guidance.t_max=1.5", "guidance.t_max"),
    ("guidance.guidance_scale=lots", "guidance.guidance_scale"),
    ("guidance.guidance_scale=-1", "guidance.guidance_scale"),
    ("representation.gaussians.densify_every=-1", "representation.gaussians.densify_every"),
    ("representation.gaussians.max_gaussians=0", "representation.gaussians.max_gaussians"),
    ("camera.fovy_range=[70,40]", "camera.fovy_range"),
    ("guidance.weighting=cubic", "guidance.weighting"),
    ("export.formats=[fbx]", "export.formats"),
    ("run.device=tpu", "run.device"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert key in msg
    assert "\n" not in msg


def test_override_without_equals():
    with pytest.raises(UserError, match="key=value"):
        load_config(overrides=["run.steps"])


def test_yaml_file_and_bad_yaml(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("run:\n  steps: 12\nguidance:\n  t_max: [0.98, 0.5, 0, 100]\n")
    cfg = load_config(good, ["run.seed=3"])
    assert cfg.run.steps == 12 and cfg.run.seed == 3
    assert scheduled(cfg.guidance.t_max, 50) == pytest.approx(0.74)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("run:\n  stepz: 3\n")
    with pytest.raises(UserError, match="run.stepz"):
        load_config(unknown)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_presets_load():
    from threedistill.config import CONFIG_DIR

    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert presets, "threedistill/presets/ should ship presets"
    for p in presets:
        load_config(p)


@pytest.mark.parametrize("loss", ["sds", "vsd", "esd", "ism", "csd", "nfsd"])
def test_loss_presets_compose_with_the_sd_overlay(loss):
    own = load_config(f"{loss}-nerf")
    assert own.guidance.name == loss and own.prior.name == "shapes"
    both = load_config([f"{loss}-nerf", "sd"], ["guidance.lora_rank=8"])
    assert both.guidance.name == loss  # the overlay keeps the loss and its settings ...
    assert both.guidance.guidance_scale == own.guidance.guidance_scale
    assert both.prior.name == "stabilityai/stable-diffusion-2-1-base"  # ... and sets the prior's scale
    assert both.representation.nerf.max_resolution == 512 and both.run.steps == 10000
    assert both.guidance.lora_rank == 8  # overrides still come last
    assert both.guidance.denoise_weight == 0.0  # the papers' losses on SD, whatever the shapes preset adds


@pytest.mark.parametrize("loss", ["sds", "vsd", "esd", "ism", "csd", "nfsd"])
def test_gaussian_presets_are_the_nerf_preset_plus_the_overlay(loss):
    g = load_config(f"{loss}-gaussians")
    n = load_config(f"{loss}-nerf")
    assert g.representation.name == "gaussians" and n.representation.name == "nerf"
    if loss == "sds":  # sds-nerf is the 300-step quick start; sds-gaussians keeps the 800-step recipe,
        # at DreamFusion's constant t range
        assert (g.run.steps, g.guidance.guidance_scale, g.guidance.t_max) == (800, 15.0, 0.98)
        assert (n.run.steps, n.guidance.guidance_scale, list(n.guidance.t_max)) == (300, 20.0, [0.98, 0.5, 0, 300])
        assert g.guidance.name == n.guidance.name and g.guidance.weighting == n.guidance.weighting
    else:
        # the loss's own settings, untouched; the NeRF runs the 300-step recipe (SDS's, with its
        # denoising term added to VSD, ESD and CSD; ISM still 800 steps, nerf-800.yaml), the
        # Gaussians keep their 800 steps with the t schedule stretched over them
        assert (n.run.steps, g.run.steps) == (800 if loss == "ism" else 300, 800)
        same = ("name", "guidance_scale", "t_min", "weighting", "weight", "lora_rank", "state_lr", "camera_dropout",
                "esd_lambda", "delta_t", "xs_delta_t", "xs_inv_steps")
        assert {k: getattr(g.guidance, k) for k in same} == {k: getattr(n.guidance, k) for k in same}
        assert n.representation.nerf.blob_radius == 0.35  # below the objects: these losses do not shrink one
    with_sd = load_config([f"{loss}-gaussians", "sd"])
    assert with_sd.prior.name == "stabilityai/stable-diffusion-2-1-base"
    assert with_sd.representation.name == "gaussians"  # the SD overlay keeps the representation


@pytest.mark.parametrize("loss", ["sds", "vsd", "esd", "ism", "csd", "nfsd"])
@pytest.mark.parametrize("rep", ["nerf", "gaussians"])
def test_a_loss_presets_schedules_finish_within_its_run(loss, rep):
    """The schedules a loss preset sets are stretched over its own run: a linear ``[start, end, from,
    to]`` whose ``to`` lies past ``run.steps`` never reaches its end value (a schedule left at
    another run length, e.g. a Gaussians preset inheriting the 300-step NeRF's t_max switch)."""
    cfg = load_config(f"{loss}-{rep}")
    keys = {"guidance.t_max": cfg.guidance.t_max, "optim.lr": cfg.optim.lr}
    if loss == "ism":
        keys["guidance.delta_t"] = cfg.guidance.delta_t
    if loss == "csd":
        keys["guidance.negative_weight"] = cfg.guidance.negative_weight
    late = {k: list(v) for k, v in keys.items()
            if not isinstance(v, (int, float)) and len(v) == 4 and not isinstance(v[0], Sequence)
            and v[3] > cfg.run.steps}
    assert not late, f"{loss}-{rep}: schedules end after run.steps={cfg.run.steps}: {late}"
    if isinstance(cfg.guidance.t_max, Sequence):  # nor squeezed into a small part of it
        assert cfg.guidance.t_max[3] >= cfg.run.steps / 10


def test_extends_loads_parents_first_and_rejects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  steps: 7\n  resolution: 24\n")
    (tmp_path / "child.yaml").write_text("extends: [sds-nerf, base]\nrun:\n  resolution: 48\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.run.steps == 7 and cfg.run.resolution == 48  # base over sds-nerf, the file over both
    assert cfg.guidance.guidance_scale == 20.0  # from the shipped preset, found by name
    (tmp_path / "single.yaml").write_text("extends: base.yaml\n")
    assert load_config(tmp_path / "single.yaml").run.steps == 7
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: [a]\n")
    with pytest.raises(UserError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("extends: nothing-like-this\n")
    # issue 17: the name is the file's content, never quoted; the message names the file instead
    with pytest.raises(UserError, match="bad.yaml': a file it extends is not found"):
        load_config(tmp_path / "bad.yaml")


def test_schedule_semantics():
    s = [1.0, 3.0, 10, 20]
    assert scheduled(s, 0) == 1.0
    assert scheduled(s, 10) == 1.0
    assert scheduled(s, 15) == pytest.approx(2.0)
    assert scheduled(s, 20) == 3.0
    assert scheduled(s, 1000) == 3.0
    assert scheduled(2.5, 123) == 2.5
    assert scheduled(None, 5) is None
    assert parse_schedule([0.98, 0.5, 0, 0]) == (0.98, 0.5, 0, 0)
    with pytest.raises(UserError):
        parse_schedule([1, 2, 20, 10], "k")


def test_old_run_configs_with_retired_keys_still_load(tmp_path):
    from threedistill.config import load_run_config_file, to_yaml

    text = to_yaml(load_config(overrides=["run.prompt=a red cube"]))
    old = tmp_path / "config.yaml"
    old.write_text(text.replace("optim:\n", "optim:\n  lr_scale_guidance: 0.01\n"))
    assert "lr_scale_guidance" in old.read_text()
    cfg = load_run_config_file(old, ["run.steps=5"])
    assert cfg.run.prompt == "a red cube" and cfg.run.steps == 5
    with pytest.raises(UserError, match="lr_scale_guidance"):
        load_config(old)  # as a preset, an unknown key is still an error


def test_old_run_configs_with_the_retired_nerf_encoding_still_load(tmp_path):
    from threedistill.config import load_run_config_file, to_yaml

    text = to_yaml(load_config(overrides=["run.prompt=a red cube"]))
    old = tmp_path / "config.yaml"
    old.write_text(text.replace("  nerf:\n", "  nerf:\n    encoding: hashgrid\n", 1))
    assert "encoding: hashgrid" in old.read_text()
    cfg = load_run_config_file(old, ["run.steps=5"])
    assert cfg.run.prompt == "a red cube" and cfg.run.steps == 5 and "encoding" not in cfg.representation.nerf
    with pytest.raises(UserError, match="representation.nerf.encoding"):
        load_config(old)  # as a preset, an unknown key is still an error


def test_old_run_configs_keep_the_behaviour_of_keys_added_since(tmp_path):
    """A run folder written before ``representation.nerf.normal_type`` existed was trained with
    autograd normals: it loads with them (today's default is finite differences), so its renders,
    evaluation and export stay as they were; a folder that names the key keeps its own value."""
    from threedistill.config import load_run_config_file, to_yaml

    text = to_yaml(load_config(overrides=["run.prompt=a red cube"]))
    assert "normal_type: finite_difference" in text and "density_activation: softplus" in text
    old = tmp_path / "config.yaml"
    old.write_text("\n".join(line for line in text.splitlines()
                             if "normal_type" not in line and "density_activation" not in line) + "\n")
    cfg = load_run_config_file(old)
    assert cfg.representation.nerf.normal_type == "analytic"
    assert cfg.representation.nerf.density_activation == "softplus"
    assert load_config().representation.nerf.normal_type == "finite_difference"
    new = tmp_path / "new.yaml"
    new.write_text(text)
    assert load_run_config_file(new).representation.nerf.normal_type == "finite_difference"
    # guidance.denoise_weight (issue 18 round 8): its default 0 is the behaviour before it existed,
    # so a VSD run folder from round 7 resumes without the term its preset adds today
    vsd = to_yaml(load_config("vsd-nerf", ["run.prompt=a red cube"]))
    assert "denoise_weight: 0.5" in vsd
    old_vsd = tmp_path / "old-vsd.yaml"
    old_vsd.write_text("\n".join(line for line in vsd.splitlines() if "denoise_weight" not in line) + "\n")
    assert load_run_config_file(old_vsd).guidance.denoise_weight == 0.0


def test_representation_groups_live_beside_their_code_and_keep_their_keys():
    from threedistill import config
    from threedistill.representations import RepresentationConfig
    from threedistill.representations.gaussians import GaussiansConfig
    from threedistill.representations.mesh import MeshConfig
    from threedistill.representations.nerf import NerfConfig

    assert (config.NerfConfig, config.GaussiansConfig, config.MeshConfig, config.RepresentationConfig) == (
        NerfConfig, GaussiansConfig, MeshConfig, RepresentationConfig)
    cfg = load_config(overrides=["representation.nerf.ambient_light=0.3", "representation.mesh.albedo_prob=0.2",
                                 "representation.gaussians.random_background_prob=0.4"])
    r = cfg.representation
    assert r.nerf.ambient_light == 0.3 and r.mesh.albedo_prob == 0.2 and r.gaussians.random_background_prob == 0.4
    # the shared fields with each group's own defaults; the Gaussians' shading fields serve `lit`
    assert (r.nerf.random_background_prob, r.mesh.random_background_prob) == (0.5, 0.0)
    assert "ambient_light" in r.gaussians and "radius" in r.gaussians and r.gaussians.lit is False
    with pytest.raises(UserError, match="representation.mesh.background"):
        load_config(overrides=["representation.mesh.background=mlp"])
    with pytest.raises(UserError, match="representation.nerf.background"):
        load_config(overrides=["representation.nerf.background=red"])


def test_one_override_rule_for_words_lists_and_refine():
    from threedistill.config import is_override

    for word in ("run.steps=5", "guidance.t_max=[0.98,0.5,0,5000]", "_x=1", "prior.negative_prompt=a=b"):
        assert is_override(word), word
    for word in ("a red cube", "outputs/run-1", "./a=b", "1run=3", "=3", "run.steps", "run steps=3", "a-b=1"):
        assert not is_override(word), word
    with pytest.raises(UserError, match="key=value"):
        load_config(overrides=["outputs/x=1"])
    with pytest.raises(UserError, match="refine.overrides"):
        load_config(overrides=["refine.overrides=[./x=1]"])
