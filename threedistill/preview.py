"""The 2D prompt check: samples of the configured prior for a prompt, as the guidance sees it.

Before a long 3D run, :func:`sample_preview` draws a few DDIM samples of the run's prior for the
run's prompt under each view suffix the guidance conditions on (``"<prompt>, front view"``,
``", side view"``, ``", back view"``; see :func:`~threedistill.priors.base.view_prompt`), against
the run's negative prompt, at the run's classifier-free guidance scale (``guidance.guidance_scale``
at step 0). :func:`preview_image` lays them out as one labelled grid (rows = views, columns =
samples). ``threedistill preview`` and the web app's Preview button call these two.

The config comes from :func:`~threedistill.pipeline.prepare_config` (the CLI) or the app's own
validation (which goes through :func:`~threedistill.pipeline.prepare_run`): the same presets,
overrides and checks as a run, without a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch

from threedistill.atomic import atomic_write
from threedistill.devices import resolve_device
from threedistill.errors import UserError
from threedistill.groups import scheduled
from threedistill.priors import PriorCache
from threedistill.priors.base import view_prompt

#: The view suffixes a preview shows, one row each (the guidance's labels for the side cameras).
PREVIEW_VIEWS = ("front", "side", "back")
#: Defaults of ``threedistill preview``: samples per view and DDIM steps. 8 deterministic DDIM steps
#: already give the shapes prior's objects; the 3 x 2 grid costs about 4.5 CPU-seconds of sampling on
#: top of 5 for Python, torch and the prior's weights, so it stays under 10 s on 2 cores.
DEFAULT_SAMPLES = 2
DEFAULT_STEPS = 8
#: Side (pixels) each sample is drawn at in the grid at least (small priors are upscaled).
MIN_CELL = 128


@dataclass
class Preview:
    """What :func:`sample_preview` drew: ``images [rows, samples, 3, H, W]`` in [0,1], one row per
    entry of ``labels`` (view labels, or ``"none"`` when the prior is not view-dependent), the exact
    text each row was conditioned on, and the settings."""

    images: torch.Tensor
    labels: List[str]
    prompts: List[str]
    prompt: str
    negative_prompt: str
    guidance_scale: float
    steps: int
    seed: int
    prior: str


def _positive(name: str, value: int) -> int:
    if int(value) != value or value <= 0:
        raise UserError(f"--{name} must be a whole number > 0, got {value}")
    return int(value)


def sample_preview(cfg: Any, samples: int = DEFAULT_SAMPLES, steps: int = DEFAULT_STEPS,
                   priors: Optional[PriorCache] = None, views: Sequence[str] = PREVIEW_VIEWS) -> Preview:
    """Sample the prior of the run config ``cfg`` for ``cfg.run.prompt`` (see the module docstring):
    ``samples`` per view, ``steps`` DDIM steps, seeded by ``cfg.run.seed``, on ``cfg.run.device``.
    The prior comes from ``priors`` (loaded on first use)."""
    samples, steps = _positive("samples", samples), _positive("steps", steps)
    priors = priors if priors is not None else PriorCache()
    prior = priors.get(cfg.prior, resolve_device(str(cfg.run.device)))
    view_dependent = bool(cfg.prior.view_dependent)
    labels = list(views) if view_dependent else ["none"]
    prompt = str(cfg.run.prompt)
    negative = str(cfg.prior.negative_prompt or "")
    scale = float(scheduled(cfg.guidance.guidance_scale, 0, "guidance.guidance_scale"))
    seed = int(cfg.run.seed)
    generator = torch.Generator().manual_seed(seed)
    images = prior.sample_views(prompt, labels, n=samples, steps=steps, guidance_scale=scale,
                                negative_prompt=negative, view_dependent=view_dependent, generator=generator)
    return Preview(images=images.float().cpu().clamp(0, 1), labels=labels,
                   prompts=[view_prompt(prompt, lab) for lab in labels], prompt=prompt, negative_prompt=negative,
                   guidance_scale=scale, steps=steps, seed=seed, prior=str(cfg.prior.name))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def preview_image(preview: Preview):
    """The labelled grid (a PIL image): a title line (the prompt, the prior, CFG scale, steps,
    seed), then one row per view with its label on the left, one column per sample."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows, cols, _, h, w = preview.images.shape
    scale = max(1, -(-MIN_CELL // max(h, w)))  # whole-number upscale of small priors, nearest
    ch, cw = h * scale, w * scale
    gap, left, top = 4, 110, 52
    title_font, label_font = _font(16), _font(14)
    width = left + cols * cw + (cols - 1) * gap + gap
    height = top + rows * ch + (rows - 1) * gap + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), f"\"{preview.prompt}\"", fill="black", font=title_font)
    neg = f", negative \"{preview.negative_prompt}\"" if preview.negative_prompt.strip() else ""
    draw.text((gap, 28), f"prior {preview.prior}, CFG {preview.guidance_scale:g}, {preview.steps} DDIM steps, "
                         f"seed {preview.seed}{neg}", fill=(60, 60, 60), font=label_font)
    pixels = (preview.images.permute(0, 1, 3, 4, 2).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    for r in range(rows):
        y = top + r * (ch + gap)
        label = "no view suffix" if preview.labels[r] == "none" else f"{preview.labels[r]} view"
        draw.text((gap, y + ch // 2 - 8), label, fill="black", font=label_font)
        for c in range(cols):
            cell = Image.fromarray(pixels[r, c]).resize((cw, ch), Image.NEAREST)
            canvas.paste(cell, (left + c * (cw + gap), y))
    return canvas


def image_format(path: Union[str, Path]) -> str:
    """The PIL format of the image file ``path`` will be (by its suffix), checked before any sampling:
    :class:`UserError` when the suffix is no image's or the folder does not exist."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"--out '{path}': unknown image suffix (use .png)")
    if not path.parent.is_dir():
        raise UserError(f"--out '{path}': folder '{path.parent}' does not exist")
    return fmt


def write_preview(preview: Preview, path: Union[str, Path]) -> Path:
    """Write :func:`preview_image` to ``path`` (PNG, or the format of its suffix) atomically."""
    fmt = image_format(path)
    path = Path(path)
    image = preview_image(preview)
    with atomic_write(path, "wb") as f:
        image.save(f, format=fmt)
    return path


__all__ = ["PREVIEW_VIEWS", "DEFAULT_SAMPLES", "DEFAULT_STEPS", "Preview", "sample_preview", "preview_image",
           "image_format", "write_preview"]
