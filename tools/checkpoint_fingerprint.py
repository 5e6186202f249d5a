"""Fingerprint the checkpoints of a fixed set of tiny runs (CLI only, CPU, one thread).

Used to prove that a refactor changes no numbers: run it before and after and compare the
printed hashes (``python tools/checkpoint_fingerprint.py OUT_DIR > hashes.txt``). Each line is
``<run>/<checkpoint> <sha256 of every tensor's name, dtype, shape and bytes, in name order>``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

COMMON = ["prior.name=shapes", "run.device=cpu", "run.progress=false", "export.formats=[]",
          "export.turntable=false", "export.splat=false", "run.preview_every=1000"]

RUNS = {
    "nerf": ["a red cube", "run.steps=6", "run.checkpoint_every=3"],
    "gaussians": ["a blue sphere", "representation.name=gaussians", "run.steps=8", "run.checkpoint_every=4",
                  "representation.gaussians.densify_from=2", "representation.gaussians.densify_every=2",
                  "representation.gaussians.densify_until=7", "representation.gaussians.densify_grad_threshold=0.0",
                  "representation.gaussians.num_points=256", "representation.gaussians.max_gaussians=400",
                  "representation.gaussians.opacity_reset_every=4"],
    "gaussians-shape": ["a green torus", "representation.name=gaussians", "representation.gaussians.init=shape",
                        "run.steps=3", "representation.gaussians.num_points=256"],
    "vsd": ["a yellow cone", "guidance.name=vsd", "run.steps=4", "camera.batch_size=2"],
    "chain": ["a red mug", "-c", "sds-nerf-then-mesh", "run.steps=4", "refine.overrides=[run.steps=3]",
              "export.mesh_resolution=48"],
}


def tensor_hash(path: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = load_file(str(path))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name, args in RUNS.items():
        prompt, rest = args[0], args[1:]
        if not (out / name).exists():
            cmd = [sys.executable, "-m", "threedistill.cli", "generate", prompt, "--out", str(out),
                   *rest, *COMMON, f"run.name={name}"]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        for ck in sorted((out / name).rglob("*.safetensors")):
            print(f"{ck.relative_to(out)} {tensor_hash(ck)}")


if __name__ == "__main__":
    main()
