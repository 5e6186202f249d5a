"""The loop through its Python API: callbacks, stop requests, interrupts, a pixel-space prior."""

import json

import pytest
import torch

from threedistill.config import load_config
from threedistill.distill import Callback, Distiller
from threedistill.runs import load_trained_representation
from threedistill.checkpoint import latest_checkpoint

FAST = ["run.resolution=32", "representation.nerf.num_samples=16", "representation.nerf.n_levels=4",
        "representation.nerf.log2_hashmap_size=10", "representation.nerf.max_resolution=32",
        "export.formats=[]", "export.turntable=false", "run.progress=false", "guidance.guidance_scale=7.5"]


def _cfg(prior_path, tmp_path, *extra):
    return load_config(overrides=[f"prior.name={prior_path}", "run.prompt=a red cube", f"run.out_dir={tmp_path}",
                                  "run.name=r", *FAST, *extra])


class Recorder(Callback):
    def __init__(self, stop_at=None, interrupt_at=None):
        self.events = []
        self.stop_at, self.interrupt_at = stop_at, interrupt_at

    def on_start(self, d):
        self.events.append(("start", d.step))

    def on_step(self, d, step, stats):
        self.events.append(("step", step))
        assert {"loss", "t", "grad_norm"} <= stats.keys()
        if step == self.stop_at:
            d.request_stop()
        if step == self.interrupt_at:
            raise KeyboardInterrupt

    def on_preview(self, d, step, path):
        assert path.is_file()
        self.events.append(("preview", step))

    def on_checkpoint(self, d, step, path):
        self.events.append(("checkpoint", step))

    def on_end(self, d, result):
        self.events.append(("end", result.status))


def test_callbacks_see_every_event(tiny_sd_path, tmp_path):
    rec = Recorder()
    result = Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=4", "run.preview_every=2", "run.checkpoint_every=3"),
                       callbacks=[rec]).run()
    assert result.status == "finished" and result.step == 4
    assert rec.events == [("start", 0), ("step", 1), ("step", 2), ("preview", 2), ("step", 3), ("checkpoint", 3),
                          ("step", 4), ("preview", 4), ("checkpoint", 4), ("end", "finished")]
    for key in ("render_s", "guidance_s", "backward_s", "train_s"):
        assert key in result.timings


def test_request_stop_leaves_a_resumable_run(tiny_sd_path, tmp_path):
    cfg = _cfg(tiny_sd_path, tmp_path, "run.steps=6")
    result = Distiller(cfg, callbacks=[Recorder(stop_at=2)]).run()
    assert result.status == "stopped" and result.step == 2
    run = tmp_path / "r"
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    assert latest_checkpoint(run / "checkpoints") == 2
    result = Distiller.resume(run).run()
    assert result.status == "finished" and result.step == 6


def test_interrupt_writes_a_checkpoint_first(tiny_sd_path, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=10"), callbacks=[Recorder(interrupt_at=3)]).run()
    run = tmp_path / "r"
    assert latest_checkpoint(run / "checkpoints") == 3
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    _, rep, step = load_trained_representation(run)
    assert step == 3


def test_pixel_space_prior_end_to_end(tiny_if_path, tmp_path):
    """DeepFloyd-IF-like pixel prior with learned variance: same loop, no special case."""
    result = Distiller(_cfg(tiny_if_path, tmp_path, "run.steps=3")).run()
    assert result.status == "finished"
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(torch.isfinite(torch.tensor(l["loss"])) for l in lines)


def test_parameters_change_and_prior_stays_frozen(tiny_sd_path, tmp_path):
    d = Distiller(_cfg(tiny_sd_path, tmp_path, "run.steps=2", "representation.nerf.ambient_only_steps=0"))
    d.build()
    before = {k: v.clone() for k, v in d.representation.state_dict().items()}
    unet_before = {k: v.clone() for k, v in d.prior.unet.state_dict().items()}
    d.train_step(0)
    changed = [k for k, v in d.representation.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoding" in k for k in changed) and any("mlp" in k for k in changed)
    assert all(torch.equal(v, unet_before[k]) for k, v in d.prior.unet.state_dict().items())
    assert all(p.grad is None for p in d.prior.unet.parameters())


class OraclePrior:
    """An analytic pixel-space 'diffusion model' whose data distribution is one flat image per
    prompt color: eps(x_t) = (x_t - sqrt(abar) x*) / sqrt(1 - abar) is the exact noise for the
    target x*. The text embedding carries the target color (red/blue prompt, grey for ""), so
    CFG, prompts and the SDS sign are all exercised: distillation must pull renders to x*."""

    from threedistill.priors.base import DiffusionPrior as _Base

    class Impl(_Base):
        def __init__(self):
            torch.nn.Module.__init__(self)
            betas = torch.linspace(1e-4, 0.02, 1000)
            self.alphas_cumprod = torch.cumprod(1 - betas, 0)
            self.num_train_timesteps, self.is_latent, self.image_resolution, self.name = 1000, False, 32, "oracle"

        def encode_text(self, prompts):
            colors = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0)}
            rows = []
            for p in prompts:
                rgb = next((c for k, c in colors.items() if k in p), (0.5, 0.5, 0.5))
                rows.append(torch.tensor(rgb)[None, :] * 2 - 1)
            return torch.stack(rows), None

        def encode_images(self, images):
            return torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False) * 2 - 1

        def decode(self, x):
            return (x + 1) / 2

        def predict_noise(self, x_t, t, text, text_mask=None, **kw):
            target = text[:, 0, :, None, None]
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x_t - a.sqrt() * target) / (1 - a).sqrt()

        def model_space_shape(self, batch_size):
            return (batch_size, 3, 32, 32)


@pytest.mark.parametrize("color, channel", [("red", 0), ("blue", 2)])
def test_sds_distills_the_prompted_color(tmp_path, color, channel):
    """End to end: NeRF + SDS + the loop converge to what the prior wants (independent of weights)."""
    cfg = load_config(overrides=[f"run.prompt=a {color} ball", f"run.out_dir={tmp_path}", "run.name=r", *FAST,
                                 "run.steps=60", "guidance.guidance_scale=3", "representation.nerf.background=white",
                                 "representation.nerf.lambda_sparsity=0", "representation.nerf.lambda_orient=0"])
    d = Distiller(cfg, prior=OraclePrior.Impl())
    d.build()
    from threedistill.cameras import preview_cameras

    cams = preview_cameras(32)

    def foreground_color():
        with torch.no_grad():
            out = d.representation.render(cams, training=False)
        mask = (out.alpha > 0.5).expand_as(out.rgb)
        assert mask.any()
        return torch.stack([out.rgb[:, c][mask[:, c]].mean() for c in range(3)])

    before = foreground_color()
    d.run()
    after = foreground_color()
    others = [c for c in range(3) if c != channel]
    # The object takes the prompted color: its albedo inside, and its rendered pixels.
    albedo = d.representation.albedo(torch.zeros(1, 3))[0]
    assert albedo[channel] > 0.6 and all(albedo[c] < 0.4 for c in others), albedo
    margin_before = before[channel] - before[others].max()
    margin_after = after[channel] - after[others].max()
    assert abs(margin_before) < 0.1 and margin_after > 0.12, (before, after)


def _checkpoint_snapshots(d):
    from threedistill.checkpoint import checkpoint_steps

    class Snap(Callback):
        def __init__(self):
            self.seen = []

        def on_checkpoint(self, dist, step, path):
            self.seen.append((step, checkpoint_steps(dist.folder.checkpoints_dir)))

    return Snap()


def test_time_based_checkpoints_replace_each_other(tiny_sd_path, tmp_path):
    """run.checkpoint_every_s: a checkpoint whenever that much time passed (here: every step); such
    a checkpoint is removed once a newer one is written, those on the step cadence are kept."""
    snap = _checkpoint_snapshots(None)
    cfg = _cfg(tiny_sd_path, tmp_path, "run.steps=5", "run.checkpoint_every=3", "run.checkpoint_every_s=1e-9")
    assert Distiller(cfg, callbacks=[snap]).run().status == "finished"
    assert snap.seen == [(1, [1]), (2, [2]), (3, [3]), (4, [3, 4]), (5, [3, 5])]
    # off by default (the CLI): only the step cadence and the final checkpoint
    snap = _checkpoint_snapshots(None)
    cfg = _cfg(tiny_sd_path, tmp_path / "b", "run.steps=5", "run.checkpoint_every=3")
    assert cfg.run.checkpoint_every_s == 0
    Distiller(cfg, callbacks=[snap]).run()
    assert snap.seen == [(3, [3]), (5, [3, 5])]


def test_resuming_from_a_time_based_checkpoint_cleans_up_and_matches(tiny_sd_path, tmp_path):
    """A run interrupted after time-based checkpoints resumes from the newest; the superseded ones
    go, and the result equals an uninterrupted run's (the per-step random streams)."""
    from threedistill.checkpoint import checkpoint_steps, save_checkpoint

    extra = ("run.steps=6", "run.checkpoint_every=100", "run.checkpoint_every_s=1e-9")
    Distiller(_cfg(tiny_sd_path, tmp_path / "ref", *extra)).run()
    with pytest.raises(KeyboardInterrupt):
        Distiller(_cfg(tiny_sd_path, tmp_path, *extra), callbacks=[Recorder(interrupt_at=4)]).run()
    ckpts = tmp_path / "r" / "checkpoints"
    assert checkpoint_steps(ckpts) == [4]
    # as if killed between writing a checkpoint and removing the one before it: an older one is left
    d = Distiller.resume(tmp_path / "r")
    d.build()
    save_checkpoint(ckpts, 2, d.representation, d.guidance, d.optimizer)
    snap = _checkpoint_snapshots(None)
    d = Distiller.resume(tmp_path / "r", callbacks=[snap])
    assert d.run().status == "finished"
    assert snap.seen == [(5, [5]), (6, [6])]
    _, ref, _ = load_trained_representation(tmp_path / "ref" / "r")
    _, got, _ = load_trained_representation(tmp_path / "r")
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("bad", ["-1", "inf", "nan"])
def test_checkpoint_every_s_is_checked(tiny_sd_path, tmp_path, bad):
    from threedistill.errors import UserError

    with pytest.raises(UserError, match="run.checkpoint_every_s"):
        _cfg(tiny_sd_path, tmp_path, f"run.checkpoint_every_s={bad}")


def test_stop_during_the_export_leaves_the_outputs_pending(tiny_sd_path, tmp_path, monkeypatch):
    """A stop requested while the meshes are written ends the export before the turntable (the next
    output): the run is `stopped` with export_pending; resuming it writes the outputs without
    training again."""
    import threedistill.distill as distill_mod

    real = distill_mod.export_run_meshes
    holder = {}

    def meshes_then_stop(*a, **kw):
        out = real(*a, **kw)
        holder["d"].request_stop()  # as if Cancel came while the meshes were written
        return out

    monkeypatch.setattr(distill_mod, "export_run_meshes", meshes_then_stop)
    cfg = _cfg(tiny_sd_path, tmp_path, "run.steps=2", "export.formats=[ply]", "export.turntable=true",
               "export.turntable_frames=2", "export.turntable_resolution=16", "export.mesh_resolution=24")
    d = holder["d"] = Distiller(cfg)
    result = d.run()
    from threedistill.runs import RunFolder

    folder = RunFolder(tmp_path / "r")
    info = folder.read_status()
    assert result.status == "stopped" and result.step == 2 and "turntable" not in result.outputs
    assert info["status"] == "stopped" and info["export_pending"] is True and info["step"] == 2
    assert folder.mesh_path("ply").is_file() and not folder.turntable_path.is_file()
    metrics = folder.metrics_path.read_text()
    monkeypatch.setattr(distill_mod, "export_run_meshes", real)
    rec = Recorder()
    result = Distiller.resume(folder.path, callbacks=[rec]).run()
    assert result.status == "finished" and folder.turntable_path.is_file()
    assert not any(e[0] == "step" for e in rec.events) and folder.metrics_path.read_text() == metrics
    assert "export_pending" not in folder.read_status()


def test_stop_at_the_last_step_leaves_the_outputs_pending(tiny_sd_path, tmp_path):
    cfg = _cfg(tiny_sd_path, tmp_path, "run.steps=3")
    result = Distiller(cfg, callbacks=[Recorder(stop_at=3)]).run()
    from threedistill.runs import RunFolder

    info = RunFolder(tmp_path / "r").read_status()
    assert result.status == "stopped" and info["export_pending"] is True and info["step"] == 3
