"""SDS against an independent computation from the prior's own noise predictions."""

import pytest
import torch

from threedistill.cameras import make_cameras
from threedistill.config import load_config
from threedistill.guidance import build_guidance
from threedistill.priors import load_prior


@pytest.fixture(scope="module")
def prior(tiny_sd_path):
    cfg = load_config(overrides=[f"prior.name={tiny_sd_path}"])
    return load_prior(cfg.prior, torch.device("cpu"))


def _cams(az):
    n = len(az)
    return make_cameras(torch.zeros(n), torch.tensor(az, dtype=torch.float32), torch.full((n,), 2.0),
                        torch.full((n,), 50.0), 64)


def _guidance(prior, *overrides, prompt="a red cube"):
    cfg = load_config(overrides=list(overrides))
    g = build_guidance(cfg.guidance, prior)
    g.set_prompt(prompt, cfg.prior.negative_prompt, cfg.prior.view_dependent, cfg.camera)
    return g


def test_sds_gradient_matches_closed_form(prior):
    torch.manual_seed(0)
    scale = 7.5
    g = _guidance(prior, f"guidance.guidance_scale={scale}")
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    cams = _cams([0.0, 180.0])  # front and back views
    t = torch.tensor([100, 700])
    noise = torch.randn(prior.model_space_shape(2))
    out = g(images, cams, step=0, t=t, noise=noise)

    # Independent computation, one prompt and one sample at a time.
    with torch.no_grad():
        z = prior.encode_images(images)
        abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * z + (1 - abar).sqrt() * noise
        expected = []
        for i, view in enumerate(["front", "back"]):
            cond, _ = prior.encode_text([f"a red cube, {view} view"])
            uncond, _ = prior.encode_text([""])
            e_c = prior.predict_noise(x_t[i : i + 1], t[i : i + 1], cond)
            e_u = prior.predict_noise(x_t[i : i + 1], t[i : i + 1], uncond)
            e_cfg = e_u + scale * (e_c - e_u)
            expected.append((1 - abar[i]) * (e_cfg - noise[i : i + 1]))
        expected = torch.cat(expected)
    assert torch.allclose(out.grad, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(out.t, t)
    # The loss is 0.5 * ||g||^2 / B ...
    assert out.loss.item() == pytest.approx(0.5 * expected.pow(2).sum().item() / 2, rel=1e-4)
    # ... and its gradient w.r.t. the renders is the VJP of the encoder with g / B.
    out.loss.backward()
    z2 = prior.encode_images(images)
    (ref,) = torch.autograd.grad(z2, images, expected / 2)
    assert torch.allclose(images.grad, ref, atol=1e-6, rtol=1e-4)
    assert images.grad.abs().sum() > 0


def test_sds_reproducible_with_overrides_and_generator(prior):
    g = _guidance(prior)
    img = torch.rand(1, 3, 64, 64)
    cams = _cams([90.0])
    a = g(img, cams, 0, generator=torch.Generator().manual_seed(5))
    b = g(img, cams, 0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.grad, b.grad) and torch.equal(a.t, b.t)
    noise = torch.randn(prior.model_space_shape(1))
    c = g(img, cams, 0, t=torch.tensor([300]), noise=noise)
    d = g(img, cams, 0, t=torch.tensor([300]), noise=noise)
    assert torch.equal(c.grad, d.grad)


def test_timestep_range_and_annealing(prior):
    g = _guidance(prior, "guidance.t_min=0.2", "guidance.t_max=[0.6,0.3,0,100]")
    gen = torch.Generator().manual_seed(0)
    t0 = g.sample_timesteps(4000, 0, gen)
    assert t0.min() >= 200 and t0.max() <= 600 and t0.min() < 210 and t0.max() > 590
    t_end = g.sample_timesteps(4000, 100, gen)
    assert t_end.max() <= 300
    t_mid = g.sample_timesteps(4000, 50, gen)
    assert t_mid.max() <= 450 and t_mid.max() > 440


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_weightings(prior, weighting):
    g = _guidance(prior, f"guidance.weighting={weighting}")
    t = torch.tensor([10, 500, 990])
    abar = prior.alphas_cumprod[t]
    expected = {"sds": 1 - abar, "uniform": torch.ones(3), "fantasia3d": abar.sqrt() * (1 - abar)}[weighting]
    assert torch.allclose(g.weighting(t).flatten(), expected)


def test_grad_clip_and_weight(prior):
    g = _guidance(prior, "guidance.grad_clip=0.01", "guidance.guidance_scale=100", "guidance.weight=2.0")
    img = torch.rand(1, 3, 64, 64)
    out = g(img, _cams([0.0]), 0, t=torch.tensor([900]), noise=torch.randn(prior.model_space_shape(1)))
    assert out.grad.abs().max() <= 0.01 + 1e-7
    assert out.loss.item() == pytest.approx(2.0 * 0.5 * out.grad.pow(2).sum().item(), rel=1e-4)


def test_view_independent_prompt(prior):
    g = _guidance(prior, "prior.view_dependent=false")
    cond, _ = g.embeddings.for_views(None, 1)
    ref, _ = prior.encode_text(["a red cube"])
    assert torch.allclose(cond, ref)
    g2 = _guidance(prior)
    assert not torch.allclose(g2.embeddings.cond["back"], g2.embeddings.cond["front"])


def test_unknown_guidance_name(prior):
    from threedistill.errors import UserError

    with pytest.raises(UserError, match="guidance.name"):
        build_guidance(load_config(overrides=["guidance.name=nope"]).guidance, prior)
