"""Coarse-to-fine schedules (issue 18): milestone lists, scheduled render resolution and views per
step, progressive hash-grid levels, deterministic timestep annealing; all checked against
hand-written expectations or closed forms, and resume across a milestone bit-exact."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from threedistill.cameras import CameraSampler, batch_size_at, max_resolution, resolution_at
from threedistill.config import load_config
from threedistill.distill import Callback, Distiller
from threedistill.errors import UserError
from threedistill.groups import check_bounds, parse_schedule, scheduled, scheduled_int
from threedistill.guidance import build_guidance
from threedistill.representations import RepresentationContext, build_representation
from threedistill.representations.encodings import HashGridEncoding
from threedistill.runs import load_trained_representation


# -- milestone lists ------------------------------------------------------------------------------
def test_milestones_hold_from_their_step_on():
    m = [[0, 32], [400, 64], [900, 128]]
    expected = {0: 32, 1: 32, 399: 32, 400: 64, 899: 64, 900: 128, 10**6: 128}
    for step, value in expected.items():
        assert scheduled(m, step) == value
    # before the first milestone its value holds
    assert scheduled([[100, 2.0], [200, 3.0]], 0) == 2.0
    # the linear form is unchanged: a list of four numbers
    assert scheduled([32, 64, 0, 100], 50) == 48.0
    # four [step, value] pairs are milestones, never the linear form
    four = [[0, 1], [10, 2], [20, 3], [30, 4]]
    assert [scheduled(four, s) for s in (5, 15, 25, 35)] == [1, 2, 3, 4]
    sched = parse_schedule(m)
    assert sched.milestones and sched.values == (32, 64, 128) and sched.steps == (0, 400, 900)


@pytest.mark.parametrize("value, words", [
    ([[0, 1], [0, 2]], "must increase"),
    ([[5, 1], [3, 2]], "must increase"),
    ([[-1, 1]], ">= 0"),
    ([[0.5, 1]], "whole number"),
    ([[0, "x"]], "whole number of steps and a number"),
    ([[0, 1], 2], "[[step, value], ...]"),
    ([[0, 1, 2]], "[[step, value], ...]"),
    ([[0, float("nan")]], "finite"),
])
def test_bad_milestones_are_one_line_naming_the_key(value, words):
    with pytest.raises(UserError) as e:
        parse_schedule(value, "run.resolution")
    assert "'run.resolution'" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_bounds_cover_every_milestone():
    node = {"x": [[0, 1.0], [10, 5.0], [20, 2.0]]}
    with pytest.raises(UserError, match="'g.x' must lie within"):
        check_bounds(node, "g", {"x": (0.0, 4.0)})  # the middle value is out of bounds
    with pytest.raises(UserError, match="steps must lie within"):
        check_bounds({"x": [[0, 1.0], [10**7, 2.0]]}, "g", {"x": (0.0, 4.0)})


def test_whole_number_schedules_round_inside_a_ramp_only():
    assert scheduled_int([[0, 32], [5, 64]], 4, multiple=8) == 32
    assert [scheduled_int([16, 64, 0, 100], s, multiple=8) for s in (0, 10, 50, 99, 100)] == [16, 16, 40, 56, 64]
    assert scheduled_int([1, 4, 0, 30], 15) == 2  # floor(2.5): whole views
    assert scheduled_int(12, 7, multiple=8) == 12  # a given value is used as given


def test_config_accepts_schedules_and_refuses_bad_ones():
    cfg = load_config(overrides=["run.resolution=[[0,32],[400,64]]", "camera.batch_size=[1,4,0,300]",
                                 "representation.nerf.grid_levels=[[0,2],[100,6]]", "guidance.t_schedule=sqrt"])
    assert [resolution_at(cfg.run.resolution, s) for s in (0, 399, 400)] == [32, 32, 64]
    assert max_resolution(cfg.run.resolution) == 64
    assert [batch_size_at(cfg.camera.batch_size, s) for s in (0, 100, 299, 300)] == [1, 2, 3, 4]
    # defaults: what they were
    d = load_config()
    assert d.run.resolution == 32 and d.camera.batch_size == 1 and d.representation.nerf.grid_levels is None
    assert d.guidance.t_schedule == "random"
    for override, key in [("run.resolution=[[0,32],[400,64.5]]", "run.resolution"),
                          ("run.resolution=[[0,32],[400,4096]]", "run.resolution"),
                          ("run.resolution=big", "run.resolution"),
                          ("camera.batch_size=[[0,0]]", "camera.batch_size"),
                          ("camera.batch_size=[[0,1],[10,65]]", "camera.batch_size"),
                          ("representation.nerf.grid_levels=[[0,2],[10,7]]", "representation.nerf.grid_levels"),
                          ("representation.nerf.grid_levels=0", "representation.nerf.grid_levels"),
                          ("guidance.t_schedule=cosine", "guidance.t_schedule"),
                          ("guidance.t_jitter=2", "guidance.t_jitter")]:
        with pytest.raises(UserError, match=f"'{key}"):
            load_config(overrides=[override])


def test_sampler_renders_at_the_step_s_size_and_views():
    cfg = load_config(overrides=["run.resolution=[[0,16],[3,24]]", "camera.batch_size=[[0,1],[2,3]]"])
    s = CameraSampler(cfg.camera, cfg.run.resolution)
    got = [(len(c), c.height, c.width) for c in (s.sample(torch.Generator().manual_seed(0), step=k) for k in range(4))]
    assert got == [(1, 16, 16), (1, 16, 16), (3, 16, 16), (3, 24, 24)]
    assert s.resolution == 24  # the largest
    assert CameraSampler(cfg.camera, 32).sample(torch.Generator(), batch_size=5).height == 32


# -- progressive hash-grid levels -----------------------------------------------------------------
def _level_rows(enc, level):
    o = enc.level_offsets[level]
    return slice(o, o + enc.level_sizes[level])


def test_inactive_levels_are_zero_and_get_no_gradient():
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=5, n_features_per_level=2, log2_hashmap_size=8, base_resolution=2, max_resolution=32)
    with torch.no_grad():
        enc.embeddings.uniform_(-1, 1)
    x = torch.rand(300, 3)
    full = enc(x).detach()
    F_ = enc.n_features_per_level
    for k in (1, 3, 5):
        enc.set_active_levels(k)
        # independent: the full encoding with the levels >= k zeroed
        expected = full.clone()
        expected[:, k * F_:] = 0
        out = enc(x)
        assert torch.equal(out, expected)
        enc.embeddings.grad = None
        (out * torch.randn_like(out)).sum().backward()
        for level in range(enc.n_levels):
            grad = enc.embeddings.grad[_level_rows(enc, level)]
            if level < k:
                assert grad.abs().sum() > 0, level
            else:
                assert torch.count_nonzero(grad) == 0, level
    enc.set_active_levels(None)
    assert enc.active_levels is None and torch.equal(enc(x), full)
    with pytest.raises(ValueError):
        enc.set_active_levels(6)


def test_nerf_grid_levels_follow_the_step():
    cfg = load_config(overrides=["run.steps=300", "representation.nerf.n_levels=4", "representation.nerf.log2_hashmap_size=8",
                                 "representation.nerf.max_resolution=32", "representation.nerf.num_samples=8",
                                 "representation.nerf.grid_levels=[[0,1],[100,2],[200,4]]"])
    rep = build_representation(cfg.representation, RepresentationContext.of_run(cfg.run), torch.device("cpu"))
    assert rep.encoding.active_levels is None  # a finished run's levels: all 4
    cams = CameraSampler(cfg.camera, 8).sample(torch.Generator().manual_seed(0))
    for step, k in [(0, 1), (99, 1), (100, 2), (199, 2), (200, None)]:
        rep.render(cams, step=step, generator=torch.Generator().manual_seed(1), training=True)
        assert rep.encoding.active_levels == k, step
    rep.update(99)  # after step 99 the next step's levels
    assert rep.encoding.active_levels == 2
    rep.render(cams, step=0, training=False)  # an evaluation render keeps them
    assert rep.encoding.active_levels == 2
    plain = load_config(overrides=["representation.nerf.n_levels=4", "representation.nerf.log2_hashmap_size=8"])
    rep = build_representation(plain.representation, RepresentationContext.of_run(plain.run), torch.device("cpu"))
    rep.render(cams, step=0, generator=torch.Generator().manual_seed(1), training=True)
    assert rep.encoding.active_levels is None


# -- timestep annealing ---------------------------------------------------------------------------
def _timesteps(steps, *overrides):
    cfg = load_config(overrides=list(overrides))
    prior = SimpleNamespace(num_train_timesteps=1000)  # sample_timesteps needs only T
    return build_guidance(cfg.guidance, prior, steps=steps)


@pytest.mark.parametrize("kind", ["linear", "sqrt"])
def test_deterministic_timesteps_match_the_closed_form(kind):
    N, t_min, t_max = 1000, 0.02, 0.98
    g = _timesteps(N, f"guidance.t_schedule={kind}", "guidance.t_jitter=0", f"guidance.t_max={t_max}",
                   f"guidance.t_min={t_min}")
    for step in (0, 1, 10, 123, 250, 500, 777, 999, 1000):
        f = step / N
        frac = t_max - (t_max - t_min) * (math.sqrt(f) if kind == "sqrt" else f)  # HiFA / DreamTime
        t = g.sample_timesteps(3, step, torch.Generator().manual_seed(step))
        assert t.tolist() == [round(frac * 1000)] * 3, step
    # with t_max annealed in the config, the deterministic schedules start from its step-0 value
    g = _timesteps(N, f"guidance.t_schedule={kind}", "guidance.t_jitter=0", "guidance.t_max=[0.98,0.5,0,800]")
    assert g.sample_timesteps(1, 0, None).item() == 980 and g.sample_timesteps(1, N, None).item() == 20


def test_jitter_stays_near_the_closed_form_within_the_range():
    N = 100
    g = _timesteps(N, "guidance.t_schedule=linear", "guidance.t_jitter=0.05", "guidance.t_max=0.9",
                   "guidance.t_min=0.1")
    for step in (0, 50, 100):
        centre = (0.9 - 0.8 * step / N) * 1000
        t = g.sample_timesteps(2000, step, torch.Generator().manual_seed(0)).double()
        assert (t - centre).abs().max() <= 50.5 and t.min() >= 100 and t.max() <= 900
        assert t.unique().numel() > 50  # jittered
        again = g.sample_timesteps(2000, step, torch.Generator().manual_seed(0))
        assert torch.equal(t.long(), again)


def test_deterministic_schedule_needs_the_run_steps():
    g = _timesteps(None, "guidance.t_schedule=sqrt")
    with pytest.raises(UserError, match="t_schedule"):
        g.sample_timesteps(1, 0, None)


# -- the loop -------------------------------------------------------------------------------------
def test_views_are_averaged_in_the_loss(tiny_sd_path):
    from threedistill.cameras import make_cameras
    from threedistill.priors import load_prior

    cfg = load_config(overrides=[f"prior.name={tiny_sd_path}"])
    prior = load_prior(cfg.prior, torch.device("cpu"))
    g = build_guidance(cfg.guidance, prior, steps=10)
    g.set_prompt("a red cube", "", True, cfg.camera)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    cams = make_cameras(torch.zeros(3), torch.tensor([0.0, 90.0, 180.0]), torch.full((3,), 2.0), torch.full((3,), 50.0), 64)
    t = torch.tensor([100, 400, 800])
    noise = torch.randn(prior.model_space_shape(3))
    together = g(images, cams, 0, t=t, noise=noise).loss
    alone = [g(images[i:i + 1], cams[i], 0, t=t[i:i + 1], noise=noise[i:i + 1]).loss for i in range(3)]
    assert together.item() == pytest.approx(sum(a.item() for a in alone) / 3, rel=1e-5)


FAST = ["representation.nerf.num_samples=8", "representation.nerf.n_levels=4", "representation.nerf.log2_hashmap_size=8",
        "representation.nerf.max_resolution=32", "representation.nerf.skip_refresh_every=2", "export.formats=[]",
        "export.turntable=false", "run.progress=false", "guidance.guidance_scale=7.5", "run.steps=5",
        "run.checkpoint_every=100", "run.preview_every=100", "run.preview_resolution=8",
        # every schedule of issue 18, with a milestone between the interruption and the end
        "run.resolution=[[0,16],[3,24]]", "camera.batch_size=[[0,1],[2,2]]",
        "representation.nerf.grid_levels=[[0,2],[3,4]]", "guidance.t_schedule=linear"]


class _Sizes(Callback):
    def __init__(self, interrupt_at=None):
        self.sizes, self.interrupt_at = [], interrupt_at

    def on_start(self, d):
        render = d.representation.render

        def recording(cameras, **kw):
            out = render(cameras, **kw)
            if kw.get("training", True):  # the levels the render used
                self.sizes.append((len(cameras), out.rgb.shape[-1], d.representation.encoding.active_levels))
            return out

        d.representation.render = recording

    def on_step(self, d, step, stats):
        if step == self.interrupt_at:
            raise KeyboardInterrupt


def test_schedules_in_a_run_and_resume_across_a_milestone_is_exact(tiny_sd_path, tmp_path):
    def cfg(where):
        return load_config(overrides=[f"prior.name={tiny_sd_path}", "run.prompt=a red cube", f"run.out_dir={where}",
                                      "run.name=r", *FAST])

    ref = _Sizes()
    Distiller(cfg(tmp_path / "ref"), callbacks=[ref]).run()
    # (views, size, active levels: None = all 4) at steps 0..4
    assert ref.sizes == [(1, 16, 2), (1, 16, 2), (2, 16, 2), (2, 24, None), (2, 24, None)]
    with pytest.raises(KeyboardInterrupt):
        Distiller(cfg(tmp_path), callbacks=[_Sizes(interrupt_at=2)]).run()  # checkpoint at step 2
    resumed = _Sizes()
    Distiller.resume(tmp_path / "r", callbacks=[resumed]).run()
    assert resumed.sizes == ref.sizes[2:]
    _, a, _ = load_trained_representation(tmp_path / "ref" / "r")
    _, b, _ = load_trained_representation(tmp_path / "r")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    ta = (tmp_path / "ref" / "r" / "metrics.jsonl").read_text().splitlines()
    tb = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["t"] for x in ta] == [json.loads(x)["t"] for x in tb]
    assert [json.loads(x)["loss"] for x in ta] == [json.loads(x)["loss"] for x in tb]
