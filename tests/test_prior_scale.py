"""The prior's speed and memory settings at Stable Diffusion scale (issue 19), on the tiny random
pipeline: SDPA attention, attention slicing, channels_last, offloading, prior.device, and the LoRA
training path (gradient checkpointing, LoRA only on attention, frozen forwards without autograd).

Each numeric check compares against an independent computation: the default SDPA attention against
diffusers' sliced processor (explicit softmax), the channels_last UNet against the contiguous one,
checkpointed gradients against the stored-activation ones.
"""

import logging
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention

from threedistill.cameras import make_cameras
from threedistill.config import load_config
from threedistill.errors import UserError
from threedistill.guidance import build_guidance
from threedistill.guidance.lora import LORA_TARGETS, use_gradient_checkpointing
from threedistill.priors import DiffusersPrior, check_prior_available, load_prior, prior_key
from threedistill.priors.base import resolve_prior_device


@pytest.fixture(scope="module")
def prior(tiny_sd_path):
    return load_prior(load_config(overrides=[f"prior.name={tiny_sd_path}"]).prior, "cpu")


def _cams():
    return make_cameras(torch.zeros(2), torch.tensor([0.0, 180.0]), torch.full((2,), 2.0), torch.full((2,), 50.0), 64)


def _vsd(prior, name="vsd", *overrides):
    cfg = load_config(overrides=[f"guidance.name={name}", *overrides])
    g = build_guidance(cfg.guidance, prior)
    g.set_prompt("a red cube", "", True, cfg.camera)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a non-trivial LoRA and camera MLP (both start as an identity)
        for p in g.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return g


def _inputs(prior, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(prior.model_space_shape(2))
    t = torch.tensor([100, 700])
    text = prior.encode_text(["a red cube", ""])[0]
    return x, t, text


# -- attention -----------------------------------------------------------------------------------
def test_unet_attention_is_sdpa_and_logged(tiny_sd_path, caplog):
    with caplog.at_level(logging.INFO, logger="threedistill.priors.diffusers_prior"):
        p = DiffusersPrior(tiny_sd_path, "cpu")
    assert p.attention_processors == ["AttnProcessor2_0"] and p.uses_sdpa
    assert any("AttnProcessor2_0 (SDPA)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("setting", ["max", "2"])
def test_attention_slicing_gives_the_same_prediction(prior, tiny_sd_path, setting):
    sliced = load_prior(load_config(overrides=[f"prior.name={tiny_sd_path}", f"prior.attention_slicing={setting}"]).prior,
                        "cpu")
    assert sliced.attention_processors == ["SlicedAttnProcessor"] and not sliced.uses_sdpa
    x, t, text = _inputs(prior)
    with torch.no_grad():
        torch.testing.assert_close(sliced.predict_noise(x, t, text), prior.predict_noise(x, t, text), atol=1e-5, rtol=1e-5)


# -- channels_last ---------------------------------------------------------------------------------
def test_channels_last_is_off_on_cpu_by_default_and_same_result_when_on(prior, tiny_sd_path):
    assert not prior.channels_last
    cl = load_prior(load_config(overrides=[f"prior.name={tiny_sd_path}", "prior.channels_last=true"]).prior, "cpu")
    assert cl.channels_last
    conv = cl.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert cl.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, text = _inputs(prior)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(cl.predict_noise(x, t, text), prior.predict_noise(x, t, text), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cl.encode_images(images), prior.encode_images(images), atol=1e-5, rtol=1e-5)


# -- offload ---------------------------------------------------------------------------------------
def test_offload_is_cuda_only_and_the_offloaded_path_gives_the_same_results(tiny_sd_path, prior):
    p = DiffusersPrior(tiny_sd_path, "cpu", offload="auto")
    assert not p.offload  # nothing to gain on a CPU
    p.offload = True  # the code path CUDA takes: text encoder and decoder move for the call, then back
    assert p._offloaded_modules() == [p.text_encoder, p.vae.decoder, p.vae.post_quant_conv]
    emb = p.encode_text(["a new prompt"])[0]
    torch.testing.assert_close(emb, prior.encode_text(["a new prompt"])[0])
    z = torch.randn(prior.model_space_shape(1))
    with torch.no_grad():
        torch.testing.assert_close(p.decode(z), prior.decode(z))
    assert next(p.text_encoder.parameters()).device.type == "cpu"


# -- config keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("prior.device", "gpu"), ("prior.device", "cuda:x"),
                                       ("prior.channels_last", "maybe"), ("prior.attention_slicing", "0"),
                                       ("prior.attention_slicing", "half"), ("prior.offload", "yes"),
                                       ("guidance.gradient_checkpointing", "sometimes"),
                                       ("prior.encoder_checkpointing", "often")])
def test_bad_values_are_one_line_naming_the_key(key, value):
    with pytest.raises(UserError) as e:
        load_config(overrides=[f"{key}={value}"])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_defaults_keep_todays_cpu_behaviour():
    cfg = load_config()
    assert (cfg.prior.device, cfg.prior.channels_last, cfg.prior.attention_slicing, cfg.prior.offload) == \
        ("auto", "auto", "off", "auto")
    assert str(cfg.prior.encoder_checkpointing).lower() == "false"
    assert cfg.guidance.gradient_checkpointing == "auto"


def test_prior_key_tells_the_settings_apart():
    base = load_config(overrides=["prior.name=one"]).prior
    assert prior_key(base, "cpu") == prior_key(load_config(overrides=["prior.name=one", "prior.device=cpu"]).prior, "cpu")
    for o in ("prior.channels_last=true", "prior.attention_slicing=auto", "prior.offload=off",
              "prior.encoder_checkpointing=true"):
        assert prior_key(base, "cpu") != prior_key(load_config(overrides=["prior.name=one", o]).prior, "cpu")


# -- prior.device ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:3"])
def test_prior_device_that_does_not_exist_is_one_clear_line(value, tiny_sd_path):
    cfg = load_config(overrides=[f"prior.name={tiny_sd_path}", f"prior.device={value}"])  # a valid name
    for call in (lambda: check_prior_available(cfg.prior), lambda: load_prior(cfg.prior, "cpu"),
                 lambda: resolve_prior_device(value, torch.device("cpu"))):
        with pytest.raises(UserError, match=re.escape(f"prior.device={value} but no CUDA GPU")):
            call()


def test_prior_device_index_past_the_gpu_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"prior.device=cuda:3 but this machine has 1 CUDA GPU\(s\) \(cuda:0 to cuda:0\)"):
        resolve_prior_device("cuda:3", torch.device("cpu"))
    assert resolve_prior_device("cuda:0", torch.device("cpu")) == torch.device("cuda:0")
    assert resolve_prior_device("auto", torch.device("cpu")) == torch.device("cpu")


def test_prior_device_cpu_runs_and_state_follows_the_prior(tiny_sd_path):
    cfg = load_config(overrides=[f"prior.name={tiny_sd_path}", "prior.device=cpu", "guidance.name=vsd"])
    p = load_prior(cfg.prior, "cpu")
    assert p.device == torch.device("cpu")
    g = build_guidance(cfg.guidance, p)
    g.set_prompt("a red cube", "", True, cfg.camera)
    # The distiller moves the guidance to the representation's device: its LoRA lives inside the
    # prior's UNet, so it stays with the prior (meta stands for "another device" here).
    g.to("meta")
    assert {q.device.type for q in g.parameters()} == {"cpu"}
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = g(images, _cams(), 0, t=torch.tensor([300, 600]), noise=torch.randn(p.model_space_shape(2)))
    assert out.loss.device == images.device
    out.loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# -- the LoRA training path (VSD / ESD) ---------------------------------------------------------------
def test_lora_is_only_on_attention_projections(prior):
    g = _vsd(prior)
    modules = dict(prior.unet.named_modules())
    with_lora = [name for name, m in modules.items() if hasattr(m, "lora_A") and g.lora.adapter_name in m.lora_A]
    attention = [name for name, m in modules.items() if isinstance(m, Attention)]
    assert with_lora and len(with_lora) == len(LORA_TARGETS) * len(attention)
    for name in with_lora:
        parent, _, proj = name.rpartition(".to_")
        assert isinstance(modules[parent], Attention) and f"to_{proj}" in LORA_TARGETS, name


@pytest.mark.parametrize("name", ["vsd", "esd"])
def test_frozen_forwards_run_without_autograd(prior, name):
    g = _vsd(prior, name)
    seen = []
    hook = prior.unet.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), m.class_embedding is not None)))
    try:
        out = g(torch.rand(2, 3, 64, 64, requires_grad=True), _cams(), 0, t=torch.tensor([300, 600]),
                noise=torch.randn(prior.model_space_shape(2)), generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    # the guided prior prediction, the LoRA's particle score: no autograd; the LoRA training forward: autograd
    assert seen == [(False, False), (False, True), (True, True)]
    out.loss.backward()


@pytest.mark.parametrize("name", ["vsd", "esd"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(prior, name):
    grads, recomputed = {}, {}
    attention = [m for m in prior.unet.modules() if isinstance(m, Attention)]
    for ckpt in (False, True):
        g = _vsd(prior, name)
        g.lora.gradient_checkpointing = ckpt
        calls = [0]
        hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in attention]
        try:
            out = g(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), _cams(), 0,
                    t=torch.tensor([300, 600]), noise=torch.randn(prior.model_space_shape(2), generator=torch.Generator().manual_seed(2)),
                    generator=torch.Generator().manual_seed(0))
            out.loss.backward()
        finally:
            for h in hooks:
                h.remove()
        grads[ckpt] = {k: p.grad.clone() for k, p in g.lora.named_parameters() if p.grad is not None}
        recomputed[ckpt] = calls[0]
        del g
    assert not prior.unet.is_gradient_checkpointing  # switched on only inside the training forward
    # every attention layer of the training forward ran again in the backward (with its LoRA)
    assert recomputed[True] == recomputed[False] + len(attention)
    assert grads[False].keys() == grads[True].keys() and len(grads[False]) > 0
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], atol=1e-5, rtol=1e-5)
    assert any(v.abs().sum() > 0 for v in grads[False].values())


def test_gradient_checkpointing_auto_is_for_sd_scale_on_cuda(prior):
    cuda = lambda px: SimpleNamespace(device=torch.device("cuda"), image_resolution=px)  # noqa: E731
    assert use_gradient_checkpointing("auto", cuda(512)) and use_gradient_checkpointing("auto", cuda(256))
    assert not use_gradient_checkpointing("auto", cuda(64))
    assert not use_gradient_checkpointing("auto", SimpleNamespace(device=torch.device("cpu"), image_resolution=512))
    assert use_gradient_checkpointing("true", prior) and not use_gradient_checkpointing("false", cuda(512))
    assert not _vsd(prior).lora.gradient_checkpointing  # tiny prior on CPU


def test_distiller_step_with_prior_device_set(tiny_sd_path, tmp_path):
    from threedistill.distill import Distiller

    cfg = load_config(overrides=[f"prior.name={tiny_sd_path}", "prior.device=cpu", "run.device=cpu", "guidance.name=vsd",
                                 "run.prompt=a red cube", "run.resolution=16", "run.steps=1", "run.progress=false"])
    d = Distiller(cfg, run_dir=tmp_path / "run")
    d.build()
    stats = d.train_step(0)
    assert d.prior.device == torch.device("cpu") and {p.device.type for p in d.guidance.parameters()} == {"cpu"}
    assert all(p.grad is not None for p in d.guidance.lora.lora.values()) and stats["loss"] == stats["loss"]


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward while ``fn()`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_encoder_checkpointing_same_gradient_less_kept(prior, tiny_sd_path):
    ck = load_prior(load_config(overrides=[f"prior.name={tiny_sd_path}", "prior.encoder_checkpointing=true"]).prior, "cpu")
    assert ck.encoder_checkpointing and not prior.encoder_checkpointing
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(prior.model_space_shape(2), generator=torch.Generator().manual_seed(1))
    grads, kept = [], []
    for p in (prior, ck):
        x = images.clone().requires_grad_(True)
        z, n = _saved_bytes(lambda: p.encode_images(x))
        (z * weights).sum().backward()
        grads.append(x.grad)
        kept.append(n)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
    assert kept[1] < kept[0] / 2
