"""Turntable videos and image files (previews), all written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from threedistill.atomic import atomic_path, atomic_write
from threedistill.cameras import CameraBatch, orbit_cameras
from threedistill.export.mesh import _module_device
from threedistill.representations.base import Representation


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``[C,H,W]`` float in [0,1] -> ``[H,W,C]`` uint8 (C = 1, 3 or 4; 1 becomes ``[H,W]``)."""
    arr = image.detach().float().clamp(0, 1).nan_to_num(0.0).mul(255).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: replicate the last row/column of an odd-sized frame."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def render_turntable(
    rep: Optional[Representation],
    path: Union[str, Path],
    frames: int = 60,
    fps: int = 24,
    resolution: int = 128,
    elevation: float = 15.0,
    distance: float = 1.75,
    fovy: float = 55.0,
    progress: bool = True,
    render: Optional[Callable[[CameraBatch], torch.Tensor]] = None,
) -> Path:
    """Render ``frames`` views on one orbit (:func:`orbit_cameras`, starting at the front) and
    write them to ``path`` as an H.264 / yuv420p mp4 (plays in browsers and the web app).

    Frames are rendered one at a time without gradients: ``render(camera)`` (one camera, on the
    CPU -> ``[1,3,H,W]`` in [0,1]; e.g. the exported mesh file:
    :func:`threedistill.export.check.mesh_frame_renderer`) when given, else the representation's
    deterministic evaluation render (``rep.render(..., training=False)``). An odd ``resolution`` is padded by one pixel to an
    even size (yuv420p). The file is written under a temporary ``.mp4`` name and renamed."""
    import imageio.v2 as iio
    from tqdm.auto import tqdm

    frames, fps, resolution = int(frames), int(fps), int(resolution)
    if frames < 1:
        raise ValueError(f"render_turntable: frames must be >= 1, got {frames}")
    path = Path(path)
    if rep is None and render is None:
        raise ValueError("render_turntable: give a representation or a frame renderer")
    device = _module_device(rep) if render is None else torch.device("cpu")
    cams = orbit_cameras(frames, resolution, elevation=elevation, distance=distance, fovy=fovy).to(device)
    was_training = rep.training if rep is not None else False
    if rep is not None:
        rep.eval()
    try:
        with atomic_path(path) as tmp:
            writer = iio.get_writer(
                tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                quality=7.0,  # crf 15
                macro_block_size=2, ffmpeg_log_level="error",
                ffmpeg_params=["-movflags", "+faststart"],  # index first: streams in browsers
            )
            try:
                for i in tqdm(range(frames), desc="turntable", unit="frame", disable=not progress,
                              leave=False):
                    with torch.no_grad():
                        rgb = rep.render(cams[i], training=False).rgb if render is None else render(cams[i])
                    frame = _to_uint8_hwc(rgb[0])
                    if frame.ndim == 2:
                        frame = np.repeat(frame[..., None], 3, axis=-1)
                    writer.append_data(_pad_to_even(np.ascontiguousarray(frame[..., :3])))
            finally:
                writer.close()
    finally:
        if rep is not None:
            rep.train(was_training)
    return path


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 0,
               pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``images [B,C,H,W]`` into one ``[C,H',W']`` image, ``nrow`` images per row (default
    all in one row), row-major, separated by ``padding`` pixels of ``pad_value``."""
    if images.dim() != 4:
        raise ValueError(f"image_grid expects [B,C,H,W], got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    nrow = B if nrow is None else max(1, min(int(nrow), B))
    ncol_rows = math.ceil(B / nrow)
    p = int(padding)
    grid = images.new_full((C, ncol_rows * H + (ncol_rows - 1) * p, nrow * W + (nrow - 1) * p), pad_value)
    for b in range(B):
        r, c = divmod(b, nrow)
        y, x = r * (H + p), c * (W + p)
        grid[:, y:y + H, x:x + W] = images[b]
    return grid


def save_image(image: torch.Tensor, path: Union[str, Path], nrow: Optional[int] = None) -> Path:
    """Write ``image`` (``[C,H,W]`` or ``[B,C,H,W]``, floats in [0,1], C = 1, 3 or 4) to ``path``
    atomically; a batch is tiled with :func:`image_grid` (one row unless ``nrow``). The format
    follows the suffix (PNG for previews)."""
    from PIL import Image

    if image.dim() == 4:
        image = image[0] if image.shape[0] == 1 else image_grid(image, nrow)
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"save_image expects [C,H,W] or [B,C,H,W] with C in 1, 3, 4; got {tuple(image.shape)}")
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"save_image: unknown image suffix '{path.suffix}' for {path}")
    pil = Image.fromarray(_to_uint8_hwc(image))
    with atomic_write(path, "wb") as f:
        pil.save(f, format=fmt)
    return path


__all__ = ["render_turntable", "image_grid", "save_image"]
