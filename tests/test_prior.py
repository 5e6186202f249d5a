"""The diffusers prior loader on tiny random pipelines: shapes, epsilon conversions, gradients,
text caching, DDIM helpers, name resolution and its one-line errors."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from threedistill.cameras import VIEW_LABELS
from threedistill.config import PriorConfig
from threedistill.errors import MissingWeightsError, UserError
from threedistill.priors import DiffusersPrior, load_prior, resolve_dtype, resolve_pipeline_path, write_tiny_pipeline
from threedistill.priors.tiny import main as tiny_main

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd_prior(tiny_sd_path):
    return DiffusersPrior(tiny_sd_path, CPU)


@pytest.fixture(scope="module")
def if_prior(tiny_if_path):
    return DiffusersPrior(tiny_if_path, CPU)


@pytest.fixture(scope="module")
def tiny_if_t5_path(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("priors") / "tiny-if-t5", kind="if", text_encoder="t5")


def _abar(prior, t):
    """alphas_cumprod straight from the scheduler, independent of the prior's own tensor."""
    return torch.as_tensor(prior.scheduler.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)


# -- loading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "if"])
def test_loader_shapes(kind, sd_prior, if_prior):
    prior = sd_prior if kind == "sd" else if_prior
    channels, size = (4, 32) if kind == "sd" else (3, 64)
    assert prior.is_latent == (kind == "sd")
    assert prior.image_resolution == 64
    assert prior.num_train_timesteps == 1000
    assert prior.alphas_cumprod.shape == (1000,) and prior.alphas_cumprod.dtype == torch.float32
    assert prior.alphas_cumprod.device == CPU and prior.device == CPU
    assert prior.model_space_shape(2) == (2, channels, size, size)

    images = torch.rand(2, 3, 48, 80)  # any size: resized to the model's resolution
    z = prior.encode_images(images)
    assert z.shape == (2, channels, size, size) and z.dtype == torch.float32
    decoded = prior.decode(z)
    assert decoded.shape == (2, 3, 64, 64)
    assert decoded.min() >= 0 and decoded.max() <= 1

    emb, mask = prior.encode_text(["a red cube", "a blue sphere"])
    assert emb.shape == (2, 77, 32) and mask is None  # CLIP: no mask
    with torch.no_grad():
        eps = prior.predict_noise(z, torch.tensor([10, 900]), emb)
    assert eps.shape == z.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_pixel_prior_encodes_by_resizing_only(if_prior):
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(if_prior.encode_images(images), images * 2 - 1)
    assert torch.allclose(if_prior.decode(images * 2 - 1), images, atol=1e-6)


def test_encode_images_is_deterministic(sd_prior):
    """The VAE posterior mean is used (a sample would differ call to call)."""
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(sd_prior.encode_images(images), sd_prior.encode_images(images))


def test_prior_is_not_part_of_any_state(sd_prior, if_prior):
    for prior in (sd_prior, if_prior):
        assert len(prior.state_dict()) == 0
        assert list(prior.parameters()) == []
        assert list(prior.buffers()) == []
        prior.train()  # must not flip the frozen sub-models to training mode
        for module in (prior.unet, prior.text_encoder, prior.vae):
            if module is not None:
                assert not module.training
                assert not any(p.requires_grad for p in module.parameters())


def test_attention_mask_is_used_for_t5(tiny_if_t5_path):
    prior = DiffusersPrior(tiny_if_t5_path, CPU)
    emb, mask = prior.encode_text(["a cube", "the red cube, front view"])
    assert emb.shape == (2, 77, 32)
    assert mask is not None and mask.shape == (2, 77)
    assert 0 < mask[0].sum() < mask[1].sum() < 77  # real tokens then padding
    x = torch.randn(prior.model_space_shape(2))
    t = torch.tensor([50, 500])
    with torch.no_grad():
        eps_masked = prior.predict_noise(x, t, emb, mask)
        eps_direct = prior.unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample[:, :3]
    assert torch.allclose(eps_masked, eps_direct, atol=1e-6)


# -- epsilon conversions ----------------------------------------------------------------------------
def test_v_prediction_is_converted_to_epsilon(tiny_sd_vpred_path):
    prior = DiffusersPrior(tiny_sd_vpred_path, CPU)
    assert prior.prediction_type == "v_prediction"
    torch.manual_seed(0)
    x_t = torch.randn(prior.model_space_shape(2))
    t = torch.tensor([20, 800])
    emb, _ = prior.encode_text(["a red cube", "a blue cube"])
    with torch.no_grad():
        eps = prior.predict_noise(x_t, t, emb)
        v = prior.unet(x_t, t, encoder_hidden_states=emb).sample
    a = _abar(prior, t)
    expected = a.sqrt() * v + (1 - a).sqrt() * x_t
    assert torch.allclose(eps, expected, atol=1e-5)
    assert not torch.allclose(eps, v, atol=1e-3)


def test_learned_variance_is_stripped(if_prior):
    assert if_prior.learned_variance
    assert if_prior.scheduler.config.variance_type == "learned_range"
    torch.manual_seed(0)
    x_t = torch.randn(if_prior.model_space_shape(2))
    t = torch.tensor([5, 999])
    emb, _ = if_prior.encode_text(["a red cube", ""])
    with torch.no_grad():
        eps = if_prior.predict_noise(x_t, t, emb)
        raw = if_prior.unet(x_t, t, encoder_hidden_states=emb).sample
    assert raw.shape[1] == 6
    assert torch.equal(eps, raw[:, :3])


# -- gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "if"])
def test_encode_images_is_differentiable(kind, sd_prior, if_prior):
    prior = sd_prior if kind == "sd" else if_prior
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    z = prior.encode_images(images)
    (z * torch.randn_like(z)).sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    for module in (prior.unet, prior.text_encoder, prior.vae):
        if module is not None:
            assert all(p.grad is None for p in module.parameters())


# -- text -------------------------------------------------------------------------------------------
def test_prompt_embeddings_are_cached_and_view_dependent(tiny_sd_path):
    prior = DiffusersPrior(tiny_sd_path, CPU)
    encoder = prior.text_encoder
    original_forward = encoder.forward
    batch_sizes = []

    def counting_forward(input_ids, *args, **kwargs):
        batch_sizes.append(input_ids.shape[0])
        return original_forward(input_ids, *args, **kwargs)

    encoder.forward = counting_forward
    emb = prior.prompt_embeddings("a red cube", negative_prompt="blurry", view_dependent=True)
    assert len(batch_sizes) == 1  # one batched call for all new strings
    assert batch_sizes[0] == len(VIEW_LABELS) + 3  # views + plain prompt + negative + ""
    again = prior.prompt_embeddings("a red cube", negative_prompt="blurry", view_dependent=True)
    assert len(batch_sizes) == 1  # everything came from the cache
    e1, _ = prior.encode_text(["a red cube", "a red cube", "something new"])
    assert batch_sizes == [len(VIEW_LABELS) + 3, 1]  # duplicates and cached strings are not re-encoded
    assert torch.equal(e1[0], e1[1])

    for a in VIEW_LABELS:
        assert torch.equal(emb.cond[a], again.cond[a])
        for b in VIEW_LABELS:
            if a != b:
                assert not torch.allclose(emb.cond[a], emb.cond[b])
    assert not torch.allclose(emb.cond["front"], emb.cond["none"])
    assert not torch.allclose(emb.uncond, emb.null)  # the negative prompt differs from ""
    cond, uncond = emb.for_views(["front", "back"], 2)
    assert cond.shape == uncond.shape == (2, 77, 32)


def test_tiny_tokenizer_reloads_and_separates_prompts(tiny_sd_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(Path(tiny_sd_path) / "tokenizer")
    assert tok.model_max_length == 77
    a, b = tok("a red cube").input_ids, tok("a blue sphere").input_ids
    assert a != b
    assert a[0] == tok.bos_token_id and a[-1] == tok.eos_token_id
    assert tok.unk_token_id not in a[1:-1]  # byte-level: every character has a token


# -- schedule helpers -------------------------------------------------------------------------------
def test_add_noise_ddim_round_trip(sd_prior):
    torch.manual_seed(0)
    x0 = torch.randn(sd_prior.model_space_shape(3))
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 300, 999])
    x_t = sd_prior.add_noise(x0, noise, t)
    a = _abar(sd_prior, t)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    # With the true epsilon, DDIM lands exactly on x0 (t_next = -1) or on the forward process at t_next.
    assert torch.allclose(sd_prior.ddim_step(x_t, noise, t, torch.full_like(t, -1)), x0, atol=1e-4)
    t_next = torch.tensor([10, 100, 500])
    assert torch.allclose(sd_prior.ddim_step(x_t, noise, t, t_next), sd_prior.add_noise(x0, noise, t_next), atol=1e-4)


def test_sample_runs(if_prior):
    images = if_prior.sample("a red cube", n=1, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


# -- dtype --------------------------------------------------------------------------------------------
def test_dtype_resolution(caplog):
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("fp16", CPU) == torch.float32
    assert "fp32" in caplog.text
    with pytest.raises(UserError):
        resolve_dtype("fp8", CPU)


# -- name resolution and errors ---------------------------------------------------------------------
def test_load_prior_from_folder_and_config(tiny_sd_path):
    prior = load_prior(PriorConfig(name=str(tiny_sd_path)), "cpu")
    assert isinstance(prior, DiffusersPrior) and prior.name == str(tiny_sd_path)


def test_hub_id_resolves_from_local_cache_only(tiny_sd_path, tmp_path):
    """A hub id found in a (hand-built) Hugging Face cache loads without any network access."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tinyorg--tiny-sd"
    shutil.copytree(tiny_sd_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = resolve_pipeline_path("tinyorg/tiny-sd", cache_dir=tmp_path / "hub")
    assert path == repo / "snapshots" / commit
    prior = load_prior(PriorConfig(name="tinyorg/tiny-sd", cache_dir=str(tmp_path / "hub")), CPU)
    assert prior.image_resolution == 64 and prior.name == "tinyorg/tiny-sd"


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "./no/such/folder"])
def test_missing_weights_is_one_clear_line(name, tmp_path):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    with pytest.raises(MissingWeightsError) as err:
        load_prior(PriorConfig(name=name, cache_dir=str(cache)), CPU)
    msg = str(err.value)
    assert "\n" not in msg
    assert name in msg and str(cache) in msg
    assert "prior.name" in msg
    if not name.startswith("."):  # a hub id: say how to download it
        assert f"hf download {name}" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="model_index.json") as err:
        load_prior(PriorConfig(name=str(tmp_path)), CPU)
    assert "\n" not in str(err.value)
    assert not isinstance(err.value, MissingWeightsError)


def test_model_index_without_required_components(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "SomePipeline", "unet": ["diffusers", "UNet2DConditionModel"], "tokenizer": [None, None],
    }))
    with pytest.raises(UserError) as err:
        resolve_pipeline_path(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "text_encoder" in msg and "tokenizer" in msg


def test_broken_component_is_one_line(tiny_sd_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MissingWeightsError, match="'unet'") as err:
        DiffusersPrior(broken, CPU)
    assert "\n" not in str(err.value)


# -- the tiny pipeline writer ---------------------------------------------------------------------------
def test_tiny_pipeline_cli(tmp_path, capsys):
    tiny_main([str(tmp_path / "cli-if"), "--kind", "if", "--prediction-type", "v_prediction"])
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "cli-if")
    index = json.loads((tmp_path / "cli-if" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert "vae" not in index
    prior = DiffusersPrior(printed, CPU)
    assert prior.prediction_type == "v_prediction" and not prior.is_latent


def test_tiny_pipeline_is_reproducible(tiny_sd_path, tmp_path):
    again = DiffusersPrior(write_tiny_pipeline(tmp_path / "again", kind="sd", seed=0), CPU)
    first = DiffusersPrior(tiny_sd_path, CPU)
    for a, b in zip(first.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
