"""Activation memory of VSD/ESD's LoRA training forward at Stable Diffusion scale, with and without
gradient checkpointing (``guidance.gradient_checkpointing``), measured on any device: the bytes of
the tensors autograd keeps for the backward (``torch.autograd.graph.saved_tensors_hooks``, each
storage counted once, the frozen weights left out), for one UNet forward of the SD 2.1-base
architecture (random weights, ``step_time.write_random_sd21``) with the LoRA on, as
``CameraLoRA.training_loss`` runs it, and for scale the VAE encode of the renders. With
checkpointing on, the count leaves out the blocks' inputs, which the checkpoints hold themselves
(a lower bound). The dtype of the count is the run's (fp32 on CPU); fp16 on a
GPU keeps half the bytes.

    python benchmarks/lora_memory.py --latent-size 64 --batch 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def saved_bytes(fn, exclude: set) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, minus ``exclude`` (data pointers)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in exclude:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from sd_scale import sd21_at_latent_size

    from threedistill.config import load_config
    from threedistill.guidance import build_guidance
    from threedistill.priors import load_prior

    path = sd21_at_latent_size(args.latent_size)
    cfg = load_config(["vsd-nerf", "sd"], overrides=[f"prior.name={path}", "guidance.name=vsd"])
    prior = load_prior(cfg.prior, args.device)
    g = build_guidance(cfg.guidance, prior)
    lora = g.lora
    weights = {p.untyped_storage().data_ptr() for p in prior.unet.parameters() if not p.requires_grad}
    B, s = args.batch, args.latent_size
    z = torch.randn(B, 4, s, s, device=prior.device)
    text = torch.randn(B, 77, prior.unet.config.cross_attention_dim, device=prior.device)
    c2w = torch.eye(4).expand(B, 4, 4)
    print(f"SD 2.1-base UNet, {s}x{s} latents ({s * 8} px), batch {B}, {prior.dtype} on {prior.device}")
    for ckpt in (False, True):
        lora.gradient_checkpointing = ckpt
        t0 = time.perf_counter()
        n = saved_bytes(lambda: lora.training_loss(z, text, c2w, generator=torch.Generator().manual_seed(0)), weights)
        print(f"| gradient checkpointing {'on' if ckpt else 'off'} | {n / 2**30:.2f} GiB saved for backward | "
              f"forward {time.perf_counter() - t0:.1f} s |", flush=True)

    # For scale: the VAE encode of the renders, which every loss back-propagates through.
    weights |= {p.untyped_storage().data_ptr() for p in prior.vae.parameters()}
    x = torch.rand(B, 3, s * 8, s * 8, device=prior.device, requires_grad=True)
    for ckpt in (False, True):  # prior.encoder_checkpointing
        (prior.vae.enable_gradient_checkpointing if ckpt else prior.vae.disable_gradient_checkpointing)()
        t0 = time.perf_counter()
        n = saved_bytes(lambda: prior.encode_images(x), weights)
        print(f"| VAE encode of {B} render(s) at {s * 8} px (every loss), encoder checkpointing "
              f"{'on' if ckpt else 'off'} | {n / 2**30:.2f} GiB saved for backward | "
              f"forward {time.perf_counter() - t0:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
