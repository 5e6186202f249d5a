"""Speed and memory of every loss x representation at Stable Diffusion scale (issue 19), against
the limit the prior sets.

The prior is the real Stable Diffusion 2.1-base architecture (UNet 866M, VAE, OpenCLIP-H text
encoder, from ``../shared/reference-configs/sd21-base``) with **random** weights (compute time and
memory do not depend on the weights), written once as an ordinary pipeline folder
(``~/.cache/threedistill/bench-sd21-random``, fp16 files, see ``step_time.py``) and loaded through
the normal ``prior.name=<folder>`` path: fp16 on CUDA, fp32 on CPU.

Cells are ``<loss>/<representation>-<px>`` at the settings users run (the loss's preset plus the
``sd`` overlay): NeRF rendered at 64 px and upsampled to 512 by the VAE encode (DreamFusion), NeRF
at 512, Gaussians and mesh at 512, for sds, ism, csd, nfsd; VSD and ESD with NeRF at 64 and 512.
With a smaller prior (``--tiny``, ``--latent-size``) render sizes scale with its image size (512 is
the prior's own resolution, 64 an eighth of it).

Per cell, after ``--warmup`` steps, the mean over ``--steps`` of ``Distiller.train_step`` (the loop's
own ``time_*`` split: render, encode, UNet = the guidance call minus its encode, backward, optimizer,
other = the rest of the step), iterations per second, peak memory (CUDA ``max_memory_allocated``
over the timed steps; on CPU the process's peak resident memory so far), and **the limit**: the
same UNet calls the loss made in its last step (same batch items, same grad mode, the LoRA on
where it was on, backward of the LoRA training forward) plus the VAE encode forward and backward
of the same renders, timed alone. ``step / limit`` near 1 means the step costs what the prior
costs; the rest is overhead to hunt.

Usage::

    python benchmarks/sd_scale.py                         # all cells, SD 2.1 at 512 (a GPU)
    python benchmarks/sd_scale.py --cells 'sds/*,vsd/nerf-64' --steps 10 --warmup 3
    python benchmarks/sd_scale.py --latent-size 8 --cells sds/nerf-64 --steps 2 --warmup 1   # CPU
    python benchmarks/sd_scale.py --tiny --steps 2 --warmup 1                                # smoke test

Writes the markdown table to ``benchmarks/results/sd-scale-<device>.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
LOSSES = ("sds", "ism", "csd", "nfsd", "vsd", "esd")
#: (representation, render px at SD scale) per loss: what users run.
SETTINGS = {loss: [("nerf", 64), ("nerf", 512), ("gaussians", 512), ("mesh", 512)] for loss in LOSSES[:4]}
SETTINGS.update({loss: [("nerf", 64), ("nerf", 512)] for loss in ("vsd", "esd")})
ALL_CELLS = [f"{loss}/{rep}-{px}" for loss in LOSSES for rep, px in SETTINGS[loss]]
COLUMNS = ["cell", "render px", "UNet items / step", "it/s", "render (ms)", "encode (ms)", "UNet (ms)",
           "backward (ms)", "optimizer (ms)", "other (ms)", "peak mem (GiB)", "limit (ms)", "step / limit"]


def select_cells(spec: str) -> List[str]:
    """``--cells``: comma-separated names or globs (``sds/*``, ``*/nerf-64``), or ``all``."""
    chosen: List[str] = []
    for pat in (p.strip() for p in spec.split(",") if p.strip()):
        hits = ALL_CELLS if pat == "all" else fnmatch.filter(ALL_CELLS, pat)
        if not hits:
            sys.exit(f"--cells: no cell matches {pat!r} (cells: {', '.join(ALL_CELLS)})")
        chosen += [c for c in hits if c not in chosen]
    return chosen


def sd21_at_latent_size(size: int) -> Path:
    """The random SD 2.1-base pipeline, with its UNet's ``sample_size`` set to ``size`` (the weights do
    not depend on it): a folder of links to the full one's files plus its own ``unet/config.json``."""
    from step_time import write_random_sd21

    full = write_random_sd21(Path(os.path.expanduser("~/.cache/threedistill/bench-sd21-random")))
    if size == 64:
        return full
    out = full.with_name(f"{full.name}-latent{size}")
    if (out / "model_index.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(dir=full.parent))
    for f in full.rglob("*"):
        if f.is_file():
            dest = tmp / f.relative_to(full)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.relative_to(full).as_posix() == "unet/config.json":
                cfg = json.loads(f.read_text())
                cfg["sample_size"] = size
                dest.write_text(json.dumps(cfg, indent=2))
            else:
                dest.symlink_to(f)
    tmp.rename(out)
    return out


@dataclass
class UNetCall:
    """One UNet forward as the loss made it, detached, to replay alone."""

    args: tuple
    kwargs: dict
    grad: bool
    lora: bool

    @property
    def items(self) -> int:
        return int(self.args[0].shape[0])


@dataclass
class CellResult:
    cell: str
    render_px: int
    items: int = 0
    times: Dict[str, float] = field(default_factory=dict)  # seconds, mean per step
    peak_gib: Optional[float] = None
    limit: float = float("nan")
    error: Optional[str] = None

    def row(self) -> List[str]:
        t = self.times
        if self.error:
            return [self.cell, str(self.render_px), self.error] + [""] * (len(COLUMNS) - 3)
        ms = lambda k: f"{1000 * t[k]:.1f}"  # noqa: E731
        return [self.cell, str(self.render_px), str(self.items), f"{1 / t['step']:.2f}", ms("render"), ms("encode"),
                ms("unet"), ms("backward"), ms("optimizer"), ms("other"),
                "-" if self.peak_gib is None else f"{self.peak_gib:.2f}", f"{1000 * self.limit:.1f}",
                f"{t['step'] / self.limit:.2f}"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def time_limit(d, calls: Sequence[UNetCall], batch: int, render_px: int, repeats: int) -> float:
    """Mean seconds of the step's UNet calls plus the VAE encode forward and backward of ``batch``
    renders of ``render_px``, alone (after one untimed run)."""
    prior = d.prior
    lora = getattr(d.guidance, "lora", None)
    device = prior.device
    renders_device = d.device
    times = []
    for i in range(repeats + 1):
        _sync(device)
        _sync(renders_device)
        t0 = time.perf_counter()
        x = torch.rand(batch, 3, render_px, render_px, device=renders_device, requires_grad=True)
        prior.encode_images(x).sum().backward()
        for c in calls:
            ctx = contextlib.ExitStack()
            if c.lora and lora is not None:
                ctx.enter_context(lora.active())
                if c.grad:
                    ctx.enter_context(lora.checkpointing())
            with ctx, torch.set_grad_enabled(c.grad):
                out = prior.unet(*c.args, **c.kwargs)
                out = out[0] if isinstance(out, tuple) else out.sample
                if c.grad:
                    out.float().pow(2).mean().backward()
        _sync(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
    if lora is not None:
        for p in lora.parameters():
            p.grad = None
    return statistics.mean(times)


def run_cell(cell: str, prior_path: Path, image_resolution: int, device: str, steps: int, warmup: int,
             priors, extra: Sequence[str]) -> CellResult:
    from threedistill.config import load_config
    from threedistill.distill import Distiller, _Timer

    loss, setting = cell.split("/")
    rep, px = setting.rsplit("-", 1)
    render_px = max(8, round(int(px) * image_resolution / 512))
    preset = f"{loss}-{rep}" if rep != "mesh" else f"{loss}-nerf"
    overrides = [f"prior.name={prior_path}", "run.prompt=a hamburger", f"run.resolution={render_px}",
                 f"run.device={device}", "run.progress=false", f"run.steps={steps + warmup}",
                 f"representation.name={rep}", "representation.nerf.ambient_only_steps=0",
                 *(["prior.negative_prompt=unrealistic, blurry"] if loss == "nfsd" else []), *extra]
    cfg = load_config([preset, "sd"], overrides=overrides)
    result = CellResult(cell, render_px)
    d = Distiller(cfg, run_dir=Path(tempfile.mkdtemp()) / "bench", priors=priors)
    d.build()
    unet = d.prior.unet
    calls: List[UNetCall] = []

    def record(module, args, kwargs):
        calls.append(UNetCall(_detach(args), _detach(kwargs), torch.is_grad_enabled(),
                              getattr(module, "class_embedding", None) is not None))

    hook = unet.register_forward_pre_hook(record, with_kwargs=True)
    rows = []
    try:
        for step in range(steps + warmup):
            if step == warmup and d.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d.device)
            calls.clear()
            timer = _Timer(d.device)
            t0 = time.perf_counter()
            stats = d.train_step(step, timer)
            _sync(d.prior.device)
            times = dict(timer.times)
            times["step"] = time.perf_counter() - t0
            times["encode"] = stats["time_encode"]
            times["unet"] = times["guidance"] - stats["time_encode"]
            times["other"] = times["step"] - sum(times[k] for k in ("render", "guidance", "backward", "optimizer"))
            if step >= warmup:
                rows.append(times)
        result.peak_gib = _peak_gib(d.device)
    finally:
        hook.remove()
    result.times = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    result.items = sum(c.items for c in calls)
    result.limit = time_limit(d, calls, int(cfg.camera.batch_size), render_px, max(1, steps))
    del d, calls
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def table(results: Sequence[CellResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.row()) + " |" for r in results]
    return "\n".join(lines)


def parse_table(text: str) -> List[Dict[str, str]]:
    """The rows of a table this script wrote, as dicts by column name (for tests and comparisons)."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| cell ")]
    return [dict(zip(COLUMNS, (c.strip() for c in line.strip().strip("|").split("|")))) for line in rows]


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def main(argv: Optional[Sequence[str]] = None) -> List[CellResult]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="all", help=f"comma-separated cells or globs ({', '.join(ALL_CELLS)})")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per cell")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, autotune)")
    ap.add_argument("--device", default="auto", help="run.device (auto: CUDA when available)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random SD-like pipeline (64 px; smoke test)")
    ap.add_argument("--latent-size", type=int, default=64,
                    help="SD 2.1 architecture with latents of this size (64 = 512 px; 8 runs on a CPU)")
    ap.add_argument("--prior", help="time this pipeline folder instead (e.g. a real SD 2.1-base download)")
    ap.add_argument("--out", help="where to write the table (default benchmarks/results/sd-scale-<device>.md)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. prior.device=cuda:1 prior.attention_slicing=auto")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from threedistill.devices import resolve_device
    from threedistill.priors import PriorCache

    device = resolve_device(args.device)
    cells = select_cells(args.cells)
    if args.prior:
        prior_path = Path(args.prior)
        prior_desc = f"pipeline {prior_path}"
    elif args.tiny:
        from threedistill.priors.tiny import write_tiny_pipeline

        prior_path = write_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd", kind="sd")
        prior_desc = "tiny random SD-like pipeline"
    else:
        prior_path = sd21_at_latent_size(args.latent_size)
        prior_desc = f"SD 2.1-base architecture, random weights, {args.latent_size}x{args.latent_size} latents"
    priors = PriorCache()
    from threedistill.config import load_config

    prior = priors.get(load_config(["sds-nerf", "sd"], overrides=[f"prior.name={prior_path}", *args.overrides]).prior,
                       device)
    header = (f"{prior_desc} ({prior.image_resolution} px), {prior.dtype}, prior on {prior.device}; attention "
              f"{'/'.join(prior.attention_processors)}, channels_last {'on' if prior.channels_last else 'off'}, "
              f"text encoder and VAE decoder {'offloaded' if prior.offload else 'on device'}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads; {args.steps} timed steps after {args.warmup}; overrides "
              f"{' '.join(args.overrides) or '-'}")
    print(header, flush=True)
    results = []
    for cell in cells:
        try:
            r = run_cell(cell, prior_path, prior.image_resolution, str(device), args.steps, args.warmup, priors,
                         args.overrides)
        except Exception as e:  # one failing cell (out of memory) must not lose the others
            if not torch.cuda.is_available() or "out of memory" not in str(e).lower():
                raise
            r = CellResult(cell, 0, error="out of memory")
            gc.collect()
            torch.cuda.empty_cache()
        results.append(r)
        print("| " + " | ".join(r.row()) + " |", flush=True)
    text = (f"# Stable Diffusion scale: step time and memory per loss x representation\n\n{header}\n\n{table(results)}\n\n"
            "Times are means per step (ms). UNet = the guidance call minus its encode (the loss's UNet forwards, and "
            "for VSD/ESD the LoRA's forwards); backward includes the LoRA training backward. UNet items = batch items "
            "through the UNet per step. peak mem: CUDA max_memory_allocated over the timed steps; on CPU the process's "
            "peak resident memory so far. limit = the same UNet calls plus the VAE encode forward+backward, alone; "
            "step / limit = step time over limit time.\n")
    out = Path(args.out) if args.out else HERE / "results" / f"sd-scale-{device_slug(device)}{'-tiny' if args.tiny else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")
    return results


if __name__ == "__main__":
    main()
