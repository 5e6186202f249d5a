"""Per-step time of each guidance loss with NeRF, split into render / guidance (encode + prior
forwards, including VSD/ESD's LoRA forward) / backward / optimizer, and the UNet calls per step
(batched forward passes), for these priors:

* ``tiny``: the tiny random SD-like pipeline the tests use (64x64 images, 4x32x32 latents);
* ``shapes``: the built-in shapes-world prior (pixel space, 3x64x64, no encoder);
* ``sd21``: the real Stable Diffusion 2.1-base architecture (UNet 866M, VAE, OpenCLIP-H text
  encoder) from ``../shared/reference-configs/sd21-base`` with **random** weights: compute time
  and memory do not depend on the weights. Renders are upsampled to 512x512 and VAE-encoded, as
  with the real model. Written once to ``~/.cache/threedistill/bench-sd21-random`` (fp16 files,
  ~2.6 GB; loaded as fp32 on CPU, fp16 on CUDA).

Usage::

    python benchmarks/step_time.py                     # SDS, tiny and sd21 priors, 64x64 renders
    python benchmarks/step_time.py --priors tiny --steps 20 --resolution 64
    python benchmarks/step_time.py --priors shapes --losses sds,vsd,esd,ism,csd,nfsd --resolution 32
    python benchmarks/step_time.py --device cuda

Prints a markdown table (mean seconds per step after warm-up) and the peak CUDA memory on GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent.parent / "shared" / "reference-configs" / "sd21-base"


def write_random_sd21(out: Path) -> Path:
    """SD 2.1-base architecture with random weights, as a diffusers pipeline folder."""
    import json

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from threedistill.priors.tiny import build_tiny_clip_tokenizer

    if (out / "model_index.json").is_file():
        return out
    if not REFERENCE.is_dir():
        sys.exit(f"reference configs not found at {REFERENCE}")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print("building the random SD 2.1-base pipeline (once) ...", file=sys.stderr)
    unet = UNet2DConditionModel.from_config(json.loads((REFERENCE / "unet" / "config.json").read_text()))
    unet.half().save_pretrained(tmp / "unet")
    del unet
    vae = AutoencoderKL.from_config(json.loads((REFERENCE / "vae" / "config.json").read_text()))
    vae.half().save_pretrained(tmp / "vae")
    del vae
    te_cfg = CLIPTextConfig(**{k: v for k, v in json.loads((REFERENCE / "text_encoder" / "config.json").read_text()).items()
                               if not k.startswith("_") and k not in ("architectures",)})
    CLIPTextModel(te_cfg).half().save_pretrained(tmp / "text_encoder")
    # The tokenizer's vocabulary does not change compute cost (77 tokens either way).
    build_tiny_clip_tokenizer().save_pretrained(tmp / "tokenizer")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon").save_pretrained(tmp / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(out)
    return out


def bench(prior_path: Path, device: str, resolution: int, steps: int, warmup: int, extra: list[str]) -> dict:
    from threedistill.config import load_config
    from threedistill.distill import Distiller, _Timer

    cfg = load_config(overrides=[f"prior.name={prior_path}", "run.prompt=a red cube", f"run.resolution={resolution}",
                                 f"run.device={device}", "run.progress=false", f"run.steps={steps + warmup}",
                                 # lit shading from the start, as after the ambient-only warm-up
                                 "representation.nerf.ambient_only_steps=0", *extra])
    d = Distiller(cfg, run_dir=Path(tempfile.mkdtemp()) / "bench")
    t0 = time.perf_counter()
    d.build()
    build_s = time.perf_counter() - t0
    d.guidance.profile = True  # the encode/UNet split waits for the device (run.profile is off on CUDA by default)
    calls = [0]
    hook = d.prior.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for step in range(steps + warmup):
        timer = _Timer(d.device)
        calls[0] = 0
        t = time.perf_counter()
        stats = d.train_step(step, timer)
        timer.times["step"] = time.perf_counter() - t
        timer.times["unet_calls"] = calls[0]
        timer.times["encode"] = stats["time_encode"]
        timer.times["unet"] = timer.times["guidance"] - stats["time_encode"]
        if step >= warmup:
            rows.append(timer.times)
    hook.remove()
    out = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    out["build"] = build_s
    if d.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--priors", default="tiny,sd21")
    ap.add_argument("--losses", default="sds", help="comma-separated guidance names (nfsd gets a negative prompt)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (tiny); sd21 uses --sd21-steps")
    ap.add_argument("--sd21-steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shapes-path", help="a shapes-prior pipeline folder to time instead of the shipped one")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. representation.nerf.num_samples=32")
    args = ap.parse_args()

    from threedistill.priors.tiny import write_tiny_pipeline

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"renders {args.resolution}x{args.resolution}, overrides {args.overrides or '-'}\n")
    # Each prior's path and timed steps, resolved (and written, for tiny / sd21) once for all losses.
    priors = {}
    for name in args.priors.split(","):
        if name == "tiny":
            priors[name] = (write_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd", kind="sd"), args.steps, args.warmup)
        elif name == "shapes":  # the built-in prior (or a checkpoint folder given with --shapes-path)
            priors[name] = (args.shapes_path or "shapes", args.steps, args.warmup)
        elif name == "sd21":
            priors[name] = (write_random_sd21(Path(os.path.expanduser("~/.cache/threedistill/bench-sd21-random"))),
                            args.sd21_steps, 1)
        else:
            sys.exit(f"unknown prior {name!r}")
    results = {}
    for loss in args.losses.split(","):
        extra = [f"guidance.name={loss}", *(["prior.negative_prompt=unrealistic, blurry"] if loss == "nfsd" else []),
                 *args.overrides]
        for name, (path, steps, warmup) in priors.items():
            results[(loss, name)] = bench(path, args.device, args.resolution, steps, warmup, extra)

    cols = ["render", "encode", "unet", "backward", "optimizer", "step"]
    has_mem = any("peak_mem_gib" in r for r in results.values())
    print("| loss | prior | UNet calls / step | " + " | ".join(f"{c} (s)" for c in cols) + " | build (s) |"
          + (" peak GPU mem (GiB) |" if has_mem else ""))
    print("|---" * (len(cols) + 4 + has_mem) + "|")
    for (loss, name), r in results.items():
        line = f"| {loss} | {name} | {r['unet_calls']:.1f} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {r['build']:.1f} |"
        if has_mem:
            line += f" {r.get('peak_mem_gib', float('nan')):.2f} |"
        print(line)
    print("\nrender = the representation's forward (NeRF or Gaussians); encode = render -> model space (resize + VAE encode for latent priors); "
          "unet = the loss's UNet forwards (one batched guided call for SDS; plus the LoRA's prediction and "
          "training forward for VSD/ESD; plus the DDIM inversion steps for ISM); backward = through the "
          "encoder, the renderer and (VSD/ESD) the LoRA; optimizer = Adam step. UNet calls are batched "
          "forward passes (ISM's count varies with t).")


if __name__ == "__main__":
    main()
