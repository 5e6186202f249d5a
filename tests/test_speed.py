"""The loop's speed settings: stats read in batches (no device wait per step), run.profile,
Adam's implementation (optim.fused), prior.compile, run.tf32. CPU-only: what a CUDA run gains is
not measured here; what is checked is that nothing reads a tensor between two reads, and that
each setting leaves the numbers as they were."""

import json
import math
import traceback

import pytest
import torch

from threedistill.cameras import CameraBatch, CameraSampler
from threedistill.checkpoint import latest_checkpoint
from threedistill.config import load_config
from threedistill.devices import profile_on, set_tf32, stats_every
from threedistill.distill import Callback, Distiller, adam_implementation, read_stats
from threedistill.errors import UserError

FAST = ["run.resolution=32", "representation.nerf.num_samples=16", "representation.nerf.n_levels=4",
        "representation.nerf.log2_hashmap_size=10", "representation.nerf.max_resolution=32",
        "export.formats=[]", "export.turntable=false", "run.progress=false", "guidance.guidance_scale=7.5",
        "run.preview_every=1000", "run.checkpoint_every=1000"]


def _cfg(prior_path, tmp_path, *extra, name="r"):
    return load_config(overrides=[f"prior.name={prior_path}", "run.prompt=a red cube", f"run.out_dir={tmp_path}",
                                  f"run.name={name}", *FAST, *extra])


# -- reading stats --------------------------------------------------------------------------------
def test_read_stats_reads_every_tensor_as_float_would():
    a, b = torch.tensor(0.1, dtype=torch.float32), torch.tensor([2.5], dtype=torch.float64)
    lines = read_stats([{"step": 1, "loss": a, "lr": 0.01}, {"step": 2, "loss": b, "n": torch.tensor(3)}])
    assert lines == [{"step": 1, "loss": float(a), "lr": 0.01}, {"step": 2, "loss": 2.5, "n": 3.0}]
    assert all(type(v) in (int, float) for line in lines for v in line.values())
    assert read_stats([]) == []


class _Reads:
    """Counts Python-level reads of tensor values (each one waits for the device on CUDA)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.count, self.active, self.host, self.where = 0, False, False, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            # torch's own reads (Adam's step counters) are of host tensors, on CUDA too
            if self.active and not self.host and "/torch/" not in traceback.extract_stack(limit=2)[0].filename:
                self.count += 1
                frame = traceback.extract_stack(limit=2)[0]
                self.where.append((name, frame.filename.split("/")[-1], frame.lineno))
            return original(t, *args, **kwargs)
        return counted


def test_no_tensor_read_between_stats_reads(tiny_sd_path, tmp_path, monkeypatch):
    reads = _Reads(monkeypatch)
    per_step = []
    original = Distiller.step_stats

    def step_stats(self, step, timer=None):
        reads.active, reads.count = True, 0
        try:
            return original(self, step, timer)
        finally:
            reads.active = False
            per_step.append((reads.count, list(reads.where)))
            reads.where.clear()

    monkeypatch.setattr(Distiller, "step_stats", step_stats)
    sample = CameraSampler.sample

    def host_sample(self, *args, **kwargs):  # cameras are drawn on the CPU by design, then moved
        reads.host = True
        try:
            return sample(self, *args, **kwargs)
        finally:
            reads.host = False

    monkeypatch.setattr(CameraSampler, "sample", host_sample)
    labels = CameraBatch.view_labels

    def host_labels(self, *args, **kwargs):  # read from the CPU copies the move kept (host_angles)
        assert self.host_angles is not None and self.host_angles[0].device.type == "cpu"
        reads.host = True
        try:
            return labels(self, *args, **kwargs)
        finally:
            reads.host = False

    monkeypatch.setattr(CameraBatch, "view_labels", host_labels)
    seen = []

    class Seen(Callback):
        def on_step(self, d, step, stats):
            seen.append((step, d.step, stats["loss"]))

    cfg = _cfg(tiny_sd_path, tmp_path, "run.steps=8", "run.stats_every=3", "run.profile=false")
    result = Distiller(cfg, callbacks=[Seen()]).run()
    assert result.status == "finished"
    assert [c for c, _ in per_step] == [0] * 8, sorted(set(w for _, ws in per_step for w in ws))
    # on_step sees every step, in batches of 3 (and the rest at the end), as Python floats
    assert [s for s, _, _ in seen] == list(range(1, 9))
    assert [d for _, d, _ in seen] == [3, 3, 3, 6, 6, 6, 8, 8]
    assert all(type(loss) is float and math.isfinite(loss) for _, _, loss in seen)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9))
    # profile off: only the step's wall time, no section split (no waits for the device)
    assert all("time_step" in l and "time_render" not in l and "time_encode" not in l for l in lines)


def test_stats_every_changes_no_number(tiny_sd_path, tmp_path):
    """Reading every step or every 4 steps: the same metrics (bar the wall times) and parameters."""
    runs = {}
    for every in (1, 4):
        d = Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=6", f"run.stats_every={every}", name=f"e{every}"))
        d.run()
        lines = [json.loads(l) for l in (tmp_path / f"e{every}" / "metrics.jsonl").read_text().splitlines()]
        runs[every] = ([{k: v for k, v in l.items() if not k.startswith("time_")} for l in lines],
                       [p.detach().clone() for p in d.representation.parameters()])
    assert runs[1][0] == runs[4][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[4][1]))


def test_a_nonfinite_loss_is_caught_before_the_next_checkpoint(tiny_sd_path, tmp_path, monkeypatch):
    original = Distiller.step_stats

    def step_stats(self, step, timer=None):
        stats = original(self, step, timer)
        if step + 1 >= 5:  # from step 5 on the loss is NaN (still a tensor, unread)
            stats["loss"] = stats["loss"] * float("nan")
        return stats

    monkeypatch.setattr(Distiller, "step_stats", step_stats)
    cfg = _cfg(tiny_sd_path, tmp_path, "run.steps=20", "run.stats_every=10", "run.checkpoint_every=3")
    with pytest.raises(UserError, match="loss became nan at step 5"):
        Distiller(cfg).run()
    run = tmp_path / "r"
    # read before the step-6 checkpoint: the newest checkpoint is step 3's, metrics end at step 4
    assert latest_checkpoint(run / "checkpoints") == 3
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 4 and "step 5" in status["error"]


# -- Adam's implementation ------------------------------------------------------------------------
def test_adam_implementation_choice():
    cpu = [torch.zeros(3, requires_grad=True)]
    assert adam_implementation("auto", cpu) == {"fused": None, "foreach": True}
    assert adam_implementation("loop", cpu) == {"fused": None, "foreach": False}
    assert adam_implementation("fused", cpu) == {"fused": True, "foreach": None}
    assert adam_implementation("auto", []) == {"fused": None, "foreach": True}


def test_foreach_adam_matches_the_loop_and_resumes(tiny_sd_path, tmp_path):
    params = {}
    for impl in ("loop", "foreach"):
        d = Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=5", f"optim.fused={impl}", name=impl))
        d.run()
        params[impl] = [p.detach().clone() for p in d.representation.parameters()]
    for a, b in zip(params["loop"], params["foreach"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    # a checkpoint written by the loop implementation resumes under foreach, which stays in force
    d = Distiller.resume(tmp_path / "loop", ["run.steps=7", "optim.fused=auto"])
    d.run()
    assert all(g["foreach"] is True and not g["fused"] for g in d.optimizer.param_groups)


# -- settings resolved per device ---------------------------------------------------------------------
def test_auto_settings_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert stats_every("auto", cpu) == 1 and stats_every("auto", cuda) == 20 and stats_every(7, cuda) == 7
    assert profile_on("auto", cpu) is True and profile_on("auto", cuda) is False and profile_on(True, cuda) is True
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(not before[0], cpu)  # a no-op on the CPU
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("override, words", [
    ("run.stats_every=0", "run.stats_every"), ("run.stats_every=often", "run.stats_every"),
    ("run.stats_every=2.5", "run.stats_every"), ("run.profile=sometimes", "run.profile"),
    ("run.tf32=maybe", "run.tf32"), ("optim.fused=yes", "optim.fused"), ("prior.compile=fast", "prior.compile"),
])
def test_bad_speed_settings_name_their_key(override, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")) as e:
        load_config(overrides=["run.prompt=x", override])
    assert "\n" not in str(e.value)


def test_speed_defaults_validate():
    cfg = load_config(overrides=["run.prompt=x", "run.stats_every=5", "run.profile=true", "run.tf32=false",
                                 "optim.fused=loop", "prior.compile=reduce-overhead"])
    assert cfg.run.stats_every == 5 and cfg.prior.compile == "reduce-overhead"
    d = load_config(overrides=["run.prompt=x"])
    assert (d.run.stats_every, d.run.profile, d.run.tf32, d.optim.fused, d.prior.compile) == \
        ("auto", "auto", True, "auto", False)


# -- prior.compile ------------------------------------------------------------------------------------
def test_compiled_unet_predicts_the_same(tiny_sd_path):
    pytest.importorskip("torch._dynamo")
    from threedistill.priors import load_prior

    prior = load_prior(load_config(overrides=["run.prompt=x", f"prior.name={tiny_sd_path}"]).prior, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(prior.model_space_shape(2), generator=g)
    t = torch.tensor([100, 700])
    text, _ = prior.encode_text(["a red cube", ""])
    plain = prior.predict_noise(x, t, text)
    prior.compile_unet("default", backend="aot_eager")  # inductor needs minutes on a small CPU
    try:
        compiled = prior.predict_noise(x, t, text)
    finally:
        prior.compile_unet(False)
    assert torch.allclose(plain, compiled, atol=1e-5, rtol=0)
    assert "_compiled_unet" not in dict(prior.named_modules())  # never a submodule (never saved)


def test_prior_compile_reaches_the_unet_call(tiny_sd_path, tmp_path, monkeypatch):
    calls = []

    def fake_compile(module, mode=None, backend="inductor", **kw):
        calls.append((mode, backend))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    d = Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=1", "prior.compile=max-autotune"))
    d.build()
    assert calls == [("max-autotune", "inductor")]
    d.train_step(0)
    d.prior.compile_unet(False)  # the prior may be cached: leave it plain


# -- generate --plan ------------------------------------------------------------------------------------
def test_largest_settings_of_numbers_and_schedules():
    from threedistill.pipeline import largest_settings

    cfg = load_config(overrides=["run.prompt=x", "run.resolution=48", "camera.batch_size=3"])
    assert largest_settings(cfg) == (48, 3)
    # a schedule (as another key takes them): its larger end, whichever way it runs
    from omegaconf import OmegaConf

    node = OmegaConf.create({"run": {"resolution": [64, 128, 0, 500]}, "camera": {"batch_size": [4, 1, 0, 100]}})
    assert largest_settings(node) == (128, 4)


def test_generate_plan_prints_the_estimate_and_leaves_nothing(tiny_sd_path, tmp_path, capsys, monkeypatch):
    from threedistill import pipeline
    from threedistill.cli import main

    planned = []
    original = pipeline.plan_run

    def spy(cfg, *args, **kwargs):
        planned.append(cfg)
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr("threedistill.cli.plan_run", spy)
    out = tmp_path / "out"
    code = main(["generate", "a red cube", "--plan", "--out", str(out), f"prior.name={tiny_sd_path}", *FAST,
                 "run.resolution=24", "camera.batch_size=2", "run.steps=300", "run.preview_every=100",
                 "export.formats=[]", "export.turntable=false"])
    assert code == 0
    text = capsys.readouterr().out
    assert "24 px, camera batch 2" in text and "peak memory:" in text
    per_step = float(text.split("time per step:")[1].split()[0])
    assert per_step > 0
    assert "for 300 steps" in text and "total:" in text
    assert not out.exists()  # no run folder, no output root
    assert planned[0].run.resolution == 24  # the config it got is the user's, not changed by the plan


def test_generate_plan_refuses_resume(tmp_path, capsys):
    from threedistill.cli import main

    assert main(["generate", "--resume", str(tmp_path), "--plan"]) != 0
    assert "--plan" in capsys.readouterr().err


def test_run_plan_arithmetic():
    from threedistill.pipeline import RunPlan

    plan = RunPlan(device="cpu", resolution=64, batch_size=1, steps=1000, seconds_per_step=0.25,
                   peak_memory=3 * 2**30, memory_kind="m", previews_s=30.0, export_s=12.0,
                   not_estimated=["mesh extraction"])
    assert plan.total_s == 1000 * 0.25 + 30 + 12
    text = "\n".join(plan.lines())
    assert "3.00 GiB" in text and "4m10s for 1000 steps" in text and "about 4m52s plus those" in text
    assert "not counting mesh extraction" in text
    assert "n/a" in "\n".join(RunPlan("cpu", 8, 1, 10, 1.0, None, "m", 0.0, 0.0).lines())


def test_to_device_moves_like_to():
    from threedistill.devices import to_device

    x = torch.arange(6, dtype=torch.float32).view(2, 3).expand(4, 2, 3)
    y = to_device(x, "cpu")
    assert y.device.type == "cpu" and torch.equal(y, x)
