"""Janus fixes: Perp-Neg (guidance.perp_neg) and view-prompt interpolation (prior.view_prompt).

The Perp-Neg combination is checked against a numpy transcription of the paper's formula
(Armandpour et al. 2023, Eq. for the perpendicular negatives) and, end to end through SDS, against
per-sample UNet calls with separately encoded prompts; its weights against the closed forms
a * exp(-b * r) + c; the interpolated embeddings against the encoded view prompts; every loss runs
with it on both the shapes prior and a tiny Stable-Diffusion-like model, with the batch size of
the UNet calls counted.
"""

import math

import numpy as np
import pytest
import torch

from threedistill.cameras import make_cameras, view_weights
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.guidance import build_guidance, guidance_names
from threedistill.guidance import perp_neg as pn
from threedistill.priors import load_prior
from threedistill.priors.base import PromptEmbeddings

PROMPT = "a red mug"
LOSSES = ("sds", "vsd", "esd", "ism", "csd", "nfsd")


def _decay(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def _cams(azimuths, elevations=None, res=64):
    n = len(azimuths)
    elev = torch.zeros(n) if elevations is None else torch.tensor(elevations, dtype=torch.float32)
    return make_cameras(elev, torch.tensor(azimuths, dtype=torch.float32), torch.full((n,), 2.0),
                        torch.full((n,), 50.0), res)


def _guidance(prior, name, *overrides, negative="", view_prompt="discrete"):
    cfg = load_config(overrides=[f"guidance.name={name}", *overrides])
    g = build_guidance(cfg.guidance, prior)
    g.set_prompt(PROMPT, negative, True, cfg.camera, view_prompt)
    return g


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    cfg = load_config(overrides=[f"prior.name={tiny_sd_path}"])
    return load_prior(cfg.prior, torch.device("cpu"))


@pytest.fixture(scope="module")
def shapes():
    return load_prior(load_config().prior, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# (a) the combination
# ---------------------------------------------------------------------------------------------
def _numpy_perp_neg(base, pos, negs, weights, scale):
    """eps = base + s * (d_pos - sum_i w_i * (d_i - <d_i, d_pos>/<d_pos, d_pos> d_pos)), per sample."""
    out = np.empty_like(base)
    for b in range(base.shape[0]):
        d_pos = (pos[b] - base[b]).ravel().astype(np.float64)
        acc = d_pos.copy()
        for i, neg in enumerate(negs):
            d = (neg[b] - base[b]).ravel().astype(np.float64)
            perp = d - (d @ d_pos) / (d_pos @ d_pos) * d_pos
            acc -= weights[b, i] * perp
        out[b] = (base[b].ravel() + scale * acc).reshape(base.shape[1:])
    return out


def test_combination_matches_the_formula_and_is_perpendicular():
    rng = np.random.default_rng(0)
    base, pos, n1, n2 = (rng.standard_normal((3, 4, 5, 5)).astype(np.float32) for _ in range(4))
    weights = rng.uniform(-1, 2, (3, 2)).astype(np.float32)
    scale = 7.5
    t = [torch.from_numpy(a) for a in (base, pos, n1, n2)]
    d = pn.combine(t[0], t[1], [t[2], t[3]], torch.from_numpy(weights))
    got = (t[0] + scale * d).numpy()
    want = _numpy_perp_neg(base, pos, [n1, n2], weights, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The perpendicular part is orthogonal to the positive direction, per sample.
    d_pos = t[1] - t[0]
    perp = pn.perpendicular(t[2] - t[0], d_pos)
    for b in range(3):
        cos = float((perp[b] * d_pos[b]).sum() / (perp[b].norm() * d_pos[b].norm()))
        assert abs(cos) < 1e-5
    # No negative weight: plain CFG.
    np.testing.assert_allclose(pn.combine(t[0], t[1], [t[2]], torch.zeros(3, 1)).numpy(), pos - base, atol=1e-6)


def test_weights_and_negatives_per_view_follow_the_published_functions():
    f_fs, f_sf, f_sb, f_fsb = pn.DEFAULT_F_FS, pn.DEFAULT_F_SF, pn.DEFAULT_F_SB, pn.DEFAULT_F_FSB
    az = [0.0, 45.0, -60.0, 90.0, 135.0, 180.0, 30.0]
    el = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 70.0]  # the last one is overhead (> 60)
    p = pn.plan(torch.tensor(el), torch.tensor(az), 60.0, f_fs, f_sf, f_sb, f_fsb)
    want_w, want_labels = [], []
    for a, e in zip(az, el):
        a = abs(a)
        if a < 90:
            r = 1 - a / 90
            w, labs = [_decay(f_fs, r), _decay(f_sf, 1 - r)], ("front", "side")
        else:
            r = 2 - a / 90
            w, labs = [_decay(f_sb, r), _decay(f_fsb, r)], ("side", "front")
        want_w.append([0.0, 0.0] if e > 60 else w)
        want_labels.append(labs)
    np.testing.assert_allclose(p.weights.numpy(), np.array(want_w), rtol=1e-6, atol=1e-6)
    assert list(zip(*p.labels)) == want_labels
    # The published functions vanish where a negative is the view itself: the front view pushes only
    # "side" away, the side view only "front".
    assert abs(float(p.weights[0, 0])) < 1e-3 and float(p.weights[0, 1]) > 1  # front: (front, side)
    assert abs(float(p.weights[3, 0])) < 1e-3 and float(p.weights[3, 1]) > 1  # side at 90: (side, front)


def test_sds_with_perp_neg_matches_per_sample_predictions(sd):
    """End to end: SDS's injected gradient with perp_neg on equals w(t) (eps_pn - noise) computed here
    from one-sample UNet calls with separately encoded prompts."""
    g = _guidance(sd, "sds", "guidance.perp_neg=true", "guidance.guidance_scale=7.5", "guidance.weighting=sds")
    cams = _cams([20.0, 150.0])
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    t = torch.tensor([300, 700])
    noise = torch.randn(sd.model_space_shape(2))
    out = g(images, cams, step=0, t=t, noise=noise)
    with torch.no_grad():
        z = sd.encode_images(images)
        abar = sd.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * z + (1 - abar).sqrt() * noise

        def eps(i, text):
            return sd.predict_noise(x_t[i:i + 1], t[i:i + 1], sd.encode_text([text])[0]).numpy()

        # camera 0 at 20 deg: label front (< 45), r = 1 - 20/90; negatives front, side
        # camera 1 at 150 deg: label back (> 135), r = 2 - 150/90; negatives side, front
        r0, r1 = 1 - 20 / 90, 2 - 150 / 90
        rows = [("front", ["front", "side"], [_decay(pn.DEFAULT_F_FS, r0), _decay(pn.DEFAULT_F_SF, 1 - r0)]),
                ("back", ["side", "front"], [_decay(pn.DEFAULT_F_SB, r1), _decay(pn.DEFAULT_F_FSB, r1)])]
        want = []
        for i, (label, negs, w) in enumerate(rows):
            base = eps(i, "")
            pos = eps(i, f"{PROMPT}, {label} view")
            neg = [eps(i, f"{PROMPT}, {n} view") for n in negs]
            e = _numpy_perp_neg(base, pos, neg, np.array([w]), 7.5)
            want.append((1 - float(abar[i])) * (e - noise[i:i + 1].numpy()))
    # Batched vs one-sample UNet calls differ by ~1e-6 in float32, amplified by the CFG scale 7.5
    # (the combination itself is held to 1e-5 on exact inputs above).
    np.testing.assert_allclose(out.grad.numpy(), np.concatenate(want), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# (b) every loss, both priors, UNet batch items counted
# ---------------------------------------------------------------------------------------------
def _count_items(monkeypatch, prior):
    calls = []
    original = prior.predict_noise

    def counting(x_t, *args, **kwargs):
        calls.append(int(x_t.shape[0]))
        return original(x_t, *args, **kwargs)

    monkeypatch.setattr(prior, "predict_noise", counting)
    return calls


#: UNet batch items of the guided call with perp_neg on, per render (2 negatives added to it).
GUIDED_ITEMS = {"sds": 4, "vsd": 4, "esd": 4, "ism": 4, "csd": 4, "nfsd": 5}


@pytest.mark.parametrize("which", ["shapes", "sd"])
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_runs_with_perp_neg_in_one_batched_call(which, name, request, monkeypatch):
    prior = request.getfixturevalue(which)
    res = prior.image_resolution
    B = 2
    cams = _cams([10.0, -120.0], res=res)
    torch.manual_seed(1)
    images = torch.rand(B, 3, res, res)
    t = torch.tensor([400, 600])
    noise = torch.randn(prior.model_space_shape(B))
    runs = {}
    for on in (False, True):
        g = _guidance(prior, name, f"guidance.perp_neg={str(on).lower()}")
        calls = _count_items(monkeypatch, prior)
        gen = torch.Generator().manual_seed(3)
        out = g(images, cams, step=0, t=t, noise=noise, generator=gen)
        monkeypatch.undo()
        assert torch.isfinite(out.loss) and torch.isfinite(out.grad).all()
        runs[on] = (list(calls), out.grad)
    off_calls, on_calls = runs[False][0], runs[True][0]
    # Same number of UNet calls (the negatives join the guided call), 2B more items in all.
    assert len(on_calls) == len(off_calls)
    assert sum(on_calls) - sum(off_calls) == 2 * B
    assert GUIDED_ITEMS[name] * B in on_calls
    assert not torch.equal(runs[True][1], runs[False][1])  # it changes the gradient


def test_every_registered_loss_is_covered():
    assert set(guidance_names()) <= set(LOSSES)


# ---------------------------------------------------------------------------------------------
# (c) interpolated view prompts
# ---------------------------------------------------------------------------------------------
def test_view_weights_closed_form():
    az = torch.tensor([0.0, 45.0, 90.0, -90.0, 135.0, 180.0, -180.0, 270.0, 30.0])
    el = torch.tensor([0.0] * 8 + [75.0])
    w = view_weights(el, az, 45.0, 45.0, 60.0, interpolated=True)
    want = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1, 0],
            [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert w.tolist() == want
    # Discrete: one-hot of the labels, thresholds applied.
    wd = view_weights(torch.zeros(3), torch.tensor([40.0, 40.0, 150.0]), 45.0, 45.0, 60.0)
    assert wd.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    assert view_weights(torch.zeros(1), torch.tensor([40.0]), 30.0, 45.0, 60.0).tolist() == [[0, 1, 0, 0]]


@pytest.mark.parametrize("which", ["shapes", "sd"])
def test_interpolated_embeddings_at_the_anchors_and_halfway(which, request):
    prior = request.getfixturevalue(which)
    g = _guidance(prior, "sds", view_prompt="interpolated")
    enc = {lab: prior.encode_text([f"{PROMPT}, {lab} view"])[0] for lab in ("front", "side", "back", "overhead")}
    cams = _cams([0.0, 90.0, -90.0, 180.0, 45.0, -135.0, 10.0], elevations=[0, 0, 0, 0, 0, 0, 80])
    cond, uncond, cond_mask, _ = g.conditioning(cams, len(cams))
    assert cond_mask is None
    for i, lab in enumerate(["front", "side", "side", "back"]):
        assert torch.equal(cond[i], enc[lab][0]), lab
    torch.testing.assert_close(cond[4], (enc["front"][0] + enc["side"][0]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[5], (enc["side"][0] + enc["back"][0]) / 2, rtol=0, atol=1e-6)
    assert torch.equal(cond[6], enc["overhead"][0])
    assert torch.equal(uncond[0], prior.encode_text([""])[0][0])


@pytest.fixture(scope="module")
def tiny_if_t5_path(tmp_path_factory):
    """Tiny DeepFloyd-IF-like pipeline with a T5 text encoder (it returns attention masks)."""
    from threedistill.priors.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("priors") / "tiny-if-t5", kind="if", text_encoder="t5")


def test_interpolated_masks_are_the_union(tiny_if_t5_path):
    """T5-style encoders (DeepFloyd IF): a blend attends to every token of either prompt."""
    prior = load_prior(load_config(overrides=[f"prior.name={tiny_if_t5_path}"]).prior, torch.device("cpu"))
    g = _guidance(prior, "sds", view_prompt="interpolated")
    emb = {lab: prior.encode_text([f"{PROMPT}, {lab} view"]) for lab in ("front", "side", "back")}
    cams = _cams([0.0, 45.0, 135.0])
    cond, _, cond_mask, uncond_mask = g.conditioning(cams, 3)
    assert cond_mask is not None and uncond_mask is not None
    fm, sm, bm = (emb[k][1][0].bool() for k in ("front", "side", "back"))
    assert torch.equal(cond_mask[0].bool(), fm)
    assert torch.equal(cond_mask[1].bool(), fm | sm)
    assert torch.equal(cond_mask[2].bool(), sm | bm)
    assert torch.equal(cond[0], emb["front"][0][0])
    # Perp-Neg on a T5 prior: its negatives carry their own masks and the step runs.
    g = _guidance(prior, "sds", "guidance.perp_neg=true", view_prompt="interpolated")
    out = g(torch.rand(3, 3, 64, 64), cams, step=0, t=torch.tensor([500, 500, 500]))
    assert torch.isfinite(out.grad).all()


def test_blend_of_masks_of_different_lengths_is_the_union():
    """Hand-made embeddings and masks whose prompts have different token counts."""
    torch.manual_seed(0)
    cond = {lab: torch.randn(1, 6, 3) for lab in ("front", "side", "back", "overhead")}
    lengths = {"front": 2, "side": 4, "back": 3, "overhead": 5}
    masks = {lab: (torch.arange(6) < n).long().unsqueeze(0) for lab, n in lengths.items()}
    emb = PromptEmbeddings(cond=cond, uncond=torch.zeros(1, 6, 3), cond_mask=masks,
                           uncond_mask=torch.ones(1, 6, dtype=torch.long))
    w = view_weights(torch.zeros(4), torch.tensor([0.0, 45.0, 135.0, 180.0]), interpolated=True)
    out, out_mask = emb.blend(w)
    assert out_mask.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert out_mask.dtype == torch.long
    assert torch.equal(out[0], cond["front"][0]) and torch.equal(out[3], cond["back"][0])
    torch.testing.assert_close(out[1], (cond["front"][0] + cond["side"][0]) / 2, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (d) config errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["guidance.perp_neg=true", "prior.view_dependent=false"], "guidance.perp_neg"),
    (["prior.view_prompt=blend"], "prior.view_prompt"),
    (["prior.view_prompt=interpolated", "prior.view_dependent=false"], "prior.view_prompt"),
    (["guidance.perp_neg_f_fs=[1.0,2.0]"], "guidance.perp_neg_f_fs"),
    (["guidance.perp_neg_f_sf=[1.0,0.5,1e9]"], "guidance.perp_neg_f_sf"),
    (["guidance.perp_neg_f_sb=[1.0,-0.5,0.0]"], "guidance.perp_neg_f_sb"),
    (["guidance.perp_neg_f_fsb=[1.0,nan,0.0]"], "guidance.perp_neg_f_fsb"),
    (["camera.front_threshold=120", "camera.back_threshold=90"], "camera.front_threshold"),
    (["camera.overhead_threshold=91"], "camera.overhead_threshold"),
])
def test_bad_values_are_one_line_errors(overrides, key):
    with pytest.raises(UserError) as err:
        load_config(overrides=overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_set_prompt_refuses_perp_neg_without_view_prompts(shapes):
    cfg = load_config(overrides=["guidance.perp_neg=true"])
    g = build_guidance(cfg.guidance, shapes)
    with pytest.raises(UserError, match="guidance.perp_neg"):
        g.set_prompt(PROMPT, "", False, cfg.camera)


def test_defaults_keep_todays_behaviour():
    cfg = load_config()
    assert cfg.guidance.perp_neg is False and cfg.prior.view_prompt == "discrete"


@pytest.mark.parametrize("loss", LOSSES)
def test_sd_overlay_turns_the_janus_fixes_on_and_the_shapes_presets_do_not(loss):
    own = load_config(f"{loss}-nerf")
    assert own.guidance.perp_neg is False and own.prior.view_prompt == "discrete"
    sd = load_config([f"{loss}-nerf", "sd"])
    assert sd.guidance.perp_neg is True and sd.prior.view_prompt == "interpolated"
    assert list(sd.guidance.perp_neg_f_fs) == list(pn.DEFAULT_F_FS)  # threestudio's defaults
    off = load_config([f"{loss}-nerf", "sd"], ["guidance.perp_neg=false", "prior.view_prompt=discrete"])
    assert off.guidance.perp_neg is False


# ---------------------------------------------------------------------------------------------
# (e) resume stays bit-exact with both knobs on (weights and blends depend on the camera only)
# ---------------------------------------------------------------------------------------------
def test_resume_with_perp_neg_and_interpolated_prompts_matches_an_uninterrupted_run(tiny_sd_path, tmp_path):
    from threedistill.distill import Callback, Distiller
    from threedistill.runs import load_trained_representation

    class InterruptAt(Callback):
        def on_step(self, d, step, stats):
            if step == 2:
                raise KeyboardInterrupt

    def cfg(out):
        return load_config(overrides=[
            f"prior.name={tiny_sd_path}", "run.prompt=a red mug", f"run.out_dir={out}", "run.name=r",
            "run.steps=4", "run.resolution=32", "representation.nerf.num_samples=16", "representation.nerf.n_levels=4",
            "representation.nerf.log2_hashmap_size=10", "representation.nerf.max_resolution=32", "export.formats=[]",
            "export.turntable=false", "run.progress=false", "camera.batch_size=2", "guidance.perp_neg=true",
            "prior.view_prompt=interpolated"])

    Distiller(cfg(tmp_path / "ref")).run()
    with pytest.raises(KeyboardInterrupt):
        Distiller(cfg(tmp_path / "cut"), callbacks=[InterruptAt()]).run()
    assert Distiller.resume(tmp_path / "cut" / "r").run().status == "finished"
    _, ref, _ = load_trained_representation(tmp_path / "ref" / "r")
    _, got, _ = load_trained_representation(tmp_path / "cut" / "r")
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
