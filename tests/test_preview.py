"""The 2D prompt check (threedistill.preview, ``threedistill preview``): the prior's samples per view
suffix at the run's CFG, checked against one DDIM step computed by hand with the prior's own calls,
on tiny latent (SD-like) and pixel (IF-like) pipelines; the grid's layout and labels; the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from threedistill.cli import main
from threedistill.pipeline import RunRequest, prepare_config
from threedistill.preview import MIN_CELL, PREVIEW_VIEWS, preview_image, sample_preview, write_preview
from threedistill.priors import PriorCache, load_prior


def _one_ddim_step_by_hand(prior, prompt, labels, n, scale, negative, seed):
    """One DDIM step from t = T-1 to the clean image, unbatched, every text encoded on its own."""
    noise = torch.randn(prior.model_space_shape(n), generator=torch.Generator().manual_seed(seed))
    t = torch.full((n,), prior.num_train_timesteps - 1, dtype=torch.long)
    abar = prior.alphas_cumprod[-1].double()
    uncond, uncond_mask = prior.encode_text([negative])
    rows = []
    for lab in labels:
        cond, cond_mask = prior.encode_text([f"{prompt}, {lab} view"])
        eps_u = prior.predict_noise(noise, t, uncond.expand(n, -1, -1),
                                    None if uncond_mask is None else uncond_mask.expand(n, -1))
        eps_c = prior.predict_noise(noise, t, cond.expand(n, -1, -1),
                                    None if cond_mask is None else cond_mask.expand(n, -1))
        eps = (eps_u + scale * (eps_c - eps_u)).double()
        x0 = (noise.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
        if not prior.is_latent:
            x0 = x0.clamp(-1, 1)  # the pixel prior's clipped x0; a_next = 1 at t_next = -1
        rows.append(prior.decode(x0.float()))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["sd", "if"])
def test_preview_is_the_guidance_prompts_at_the_runs_cfg(kind, tiny_sd_path, tiny_if_path):
    path = tiny_sd_path if kind == "sd" else tiny_if_path
    cfg = prepare_config(RunRequest(prompt="a red cube", overrides=[
        f"prior.name={path}", "guidance.guidance_scale=[12.5,2,0,100]", "prior.negative_prompt=blurry", "run.seed=3"]))
    priors = PriorCache()
    pv = sample_preview(cfg, samples=2, steps=1, priors=priors)
    assert pv.images.shape[:3] == (3, 2, 3) and pv.labels == list(PREVIEW_VIEWS)
    assert pv.prompts == ["a red cube, front view", "a red cube, side view", "a red cube, back view"]
    assert pv.guidance_scale == 12.5 and pv.negative_prompt == "blurry"  # the schedule's value at step 0
    prior = priors.get(cfg.prior, "cpu")
    want = _one_ddim_step_by_hand(prior, "a red cube", PREVIEW_VIEWS, 2, 12.5, "blurry", seed=3)
    diff = (pv.images - want.clamp(0, 1)).abs()
    if prior.is_latent:
        assert diff.max() < 2e-4
    else:
        # At t = T-1 the pixel prior's x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies float
        # round-off of the batched vs. unbatched UNet calls (times the CFG scale) by ~1/sqrt(abar),
        # so a handful of pixels near the [-1, 1] clamp differ; all others agree to round-off.
        assert (diff > 2e-4).float().mean() < 1e-3 and diff.mean() < 1e-5
    # the scale matters, and so does the view suffix (rows start from the same noise, column by column)
    other = _one_ddim_step_by_hand(prior, "a red cube", PREVIEW_VIEWS, 2, 1.0, "blurry", seed=3)
    assert (pv.images - other.clamp(0, 1)).abs().max() > 1e-3
    assert (pv.images[0] - pv.images[2]).abs().max() > 1e-4


def test_preview_without_view_prompts_is_one_row(tiny_sd_path):
    cfg = prepare_config(RunRequest(prompt="a red cube", overrides=[f"prior.name={tiny_sd_path}",
                                                                     "prior.view_dependent=false"]))
    pv = sample_preview(cfg, samples=2, steps=2)
    assert pv.labels == ["none"] and pv.prompts == ["a red cube"] and pv.images.shape[:2] == (1, 2)
    # the same as the prior's own view-independent sampler from the same noise
    direct = load_prior(cfg.prior).sample("a red cube", n=2, steps=2, guidance_scale=pv.guidance_scale,
                                          generator=torch.Generator().manual_seed(int(cfg.run.seed)))
    torch.testing.assert_close(pv.images[0], direct.clamp(0, 1), atol=2e-4, rtol=0)


def test_grid_layout_and_labels(tiny_sd_path, tmp_path):
    cfg = prepare_config(RunRequest(prompt="a blue sphere", overrides=[f"prior.name={tiny_sd_path}"]))
    pv = sample_preview(cfg, samples=3, steps=1)
    img = preview_image(pv)
    rows, cols, _, h, w = pv.images.shape
    s = -(-MIN_CELL // max(h, w))
    left, top, gap = 110, 52, 4  # the layout preview_image draws
    assert img.size == (left + cols * w * s + cols * gap, top + rows * h * s + rows * gap)
    a = np.asarray(img)
    for r in range(rows):
        for c in range(cols):
            y, x = top + r * (h * s + gap), left + c * (w * s + gap)
            cell = a[y:y + h * s:s, x:x + w * s:s]  # nearest upscale: every s-th pixel is the sample
            want = (pv.images[r, c].permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
            assert np.array_equal(cell, want), (r, c)
    # the label column holds dark text on each row; the title line too
    for r in range(rows):
        y = top + r * (h * s + gap)
        assert a[y:y + h * s, :left - 10].min() < 100
    assert a[:top - 4].min() < 100
    out = write_preview(pv, tmp_path / "grid.png")
    assert Image.open(out).size == img.size


def test_cli_preview(tmp_path, tiny_if_path, capsys):
    out = tmp_path / "p.png"
    assert main(["preview", "a green cone", "--samples", "2", "--steps", "1", "--out", str(out),
                 f"prior.name={tiny_if_path}", "guidance.guidance_scale=9"]) == 0
    line = capsys.readouterr().out
    assert "a green cone, front view" in line and "a green cone, back view" in line and "CFG 9" in line
    assert Image.open(out).size[0] > 2 * MIN_CELL


@pytest.mark.parametrize("argv, words", [
    (["preview", "a red cube", "--samples", "0"], "--samples must be > 0"),
    (["preview", "a red cube", "--steps", "-1"], "--steps must be > 0"),
    (["preview", "run.steps=3"], "prompt is missing"),
    (["preview", ""], "prompt"),
    (["preview", "a red cube", "--out", "/no/such/folder/p.png"], "does not exist"),
    (["preview", "a red cube", "--out", "PLACEHOLDER/p.txt"], "unknown image suffix"),
    (["preview", "a red cube", "prior.name=/no/such/pipeline"], "not found"),
    (["preview", "a red cube", "no.such.key=1"], "no"),
])
def test_cli_preview_errors_are_one_line(argv, words, tmp_path, capsys):
    argv = [a.replace("PLACEHOLDER", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words.lower() in err.lower(), err
    assert not list(tmp_path.iterdir())  # nothing written
