"""A small shape-and-color classifier of shapes-world images: our analogue of CLIP R-precision.

A 5-layer CNN with two heads (shape, color) trained on exact ground-truth renders of all 36
(shape, color) pairs (it is a measuring instrument, so held-out pairs are included) from the
camera sampler's distribution plus the evaluation cameras, with both shadings and mild
augmentation (blur, noise, a small shift, a slightly tinted background) so that it reads blurry
NeRF renders and diffusion samples too. Shipped as ``threedistill/assets/shapes-classifier.safetensors`` (package data).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from threedistill.atomic import atomic_path, atomic_write_text
from threedistill.cameras import orbit_cameras
from threedistill.errors import MissingWeightsError
from threedistill.priors import ASSETS_DIR
from threedistill.shapes.prior import render_views
from threedistill.shapes.render import render_shape
from threedistill.shapes.world import COLOR_NAMES, SHAPES, all_prompts

CLASSIFIER_FILE = "shapes-classifier.safetensors"
INPUT_SIZE = 64


class ShapesClassifier(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers = []
        chans = [3, w, w, 2 * w, 2 * w, 4 * w]
        for i in range(5):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(8, chans[i + 1]), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(4 * w, len(SHAPES))
        self.color_head = nn.Linear(4 * w, len(COLOR_NAMES))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``images [B,3,H,W]`` in [0,1] (resized to 64x64) -> (shape logits, color logits)."""
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        h = self.features(x * 2.0 - 1.0).mean(dim=(2, 3))
        return self.shape_head(h), self.color_head(h)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Dict[str, object]:
        """Per image and pooled over the batch (mean log-probabilities): predicted names."""
        self.eval()
        ls, lc = self(images)
        ps, pc = ls.log_softmax(-1), lc.log_softmax(-1)
        return {
            "shapes": [SHAPES[i] for i in ps.argmax(-1).tolist()],
            "colors": [COLOR_NAMES[i] for i in pc.argmax(-1).tolist()],
            "shape": SHAPES[int(ps.mean(0).argmax())],
            "color": COLOR_NAMES[int(pc.mean(0).argmax())],
        }


def load_classifier(path: Optional[str | Path] = None, device: torch.device | str = "cpu") -> ShapesClassifier:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSETS_DIR / CLASSIFIER_FILE
    if not path.is_file():
        raise MissingWeightsError(f"shapes classifier not found at '{path}' (train it with "
                                  f"`threedistill prior train-classifier {path}`)")
    model = ShapesClassifier()
    # Files written before the spelling became "color" name the head ``colour_head``.
    state = {k.replace("colour_head.", "color_head."): v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    B = images.shape[0]
    x = images
    # Blur with a random 3x3 box/identity mix.
    k = torch.rand(B, 1, 1, 1, generator=g) * 0.8
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x * (1 - k) + blurred * k
    # Shift up to 3 pixels (edge padding keeps the background).
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=g))
    x = torch.roll(F.pad(x, (3, 3, 3, 3), mode="replicate"), shifts=(dy, dx), dims=(2, 3))[..., 3:-3, 3:-3]
    # Noise and a slight brightness change.
    x = x * (1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=g) - 0.5))
    x = x + 0.03 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def make_classifier_data(images_per_prompt: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground-truth renders of all 36 prompts: (images uint8, shape index, color index)."""
    g = torch.Generator().manual_seed(seed)
    images, s_idx, c_idx = [], [], []
    for p in all_prompts():
        imgs, _ = render_views(p, images_per_prompt, g, albedo_prob=0.3)
        # Plus evaluation-like cameras (headlight) at random azimuths and two elevations.
        start = float(torch.rand(1, generator=g)) * 360.0
        for elev in (5.0, 30.0):
            cams = orbit_cameras(8, INPUT_SIZE, elevation=elev, start_azimuth=start)
            imgs = torch.cat([imgs, render_shape(p.shape, p.color, cams).rgb])
        images.append((imgs * 255).round().to(torch.uint8))
        s_idx += [SHAPES.index(p.shape)] * len(imgs)
        c_idx += [COLOR_NAMES.index(p.color)] * len(imgs)
    return torch.cat(images), torch.tensor(s_idx), torch.tensor(c_idx)


def train_classifier(out: str | Path, steps: int = 1500, batch_size: int = 64, images_per_prompt: int = 96,
                     seed: int = 0, log=print) -> Dict[str, float]:
    """Train the classifier, write it to ``out`` (safetensors + ``.json`` metadata) and return its
    accuracy on freshly rendered ground truth (a different seed from training)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    t0 = time.time()
    images, s_idx, c_idx = make_classifier_data(images_per_prompt, seed)
    log(f"rendered {len(images)} training images in {time.time() - t0:.0f} s")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in tqdm(range(steps), desc="training shapes classifier", unit="step"):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = _augment(images[idx].float() / 255.0, g)
        ls, lc = model(x)
        loss = F.cross_entropy(ls, s_idx[idx]) + F.cross_entropy(lc, c_idx[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc = classifier_accuracy(model, seed=seed + 1000)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = {"shapes": list(SHAPES), "colors": list(COLOR_NAMES), "steps": steps, "batch_size": batch_size,
            "train_images": len(images), "train_seconds": round(time.time() - t0, 1), "fresh_accuracy": acc}
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return acc


@torch.no_grad()
def classifier_accuracy(model: ShapesClassifier, seed: int = 1000, images_per_prompt: int = 16) -> Dict[str, float]:
    """Per-image accuracy on fresh ground-truth renders of all 36 prompts."""
    images, s_idx, c_idx = make_classifier_data(images_per_prompt, seed)
    ls, lc = model(images.float() / 255.0)
    s_ok = ls.argmax(-1) == s_idx
    c_ok = lc.argmax(-1) == c_idx
    return {"shape": s_ok.float().mean().item(), "color": c_ok.float().mean().item(),
            "both": (s_ok & c_ok).float().mean().item(), "images": len(images)}
