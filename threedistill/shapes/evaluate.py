"""Evaluation against the shapes world's ground truth.

From fixed evaluation cameras (8 azimuths x 2 elevations at the config's evaluation distance and
field of view; the light at the camera, as in every evaluation render) a representation is
compared with the exact render of the object its prompt names:

* ``iou``: silhouette IoU of ``alpha > 0.5`` against the ground-truth mask, pooled over views.
* ``color_error``: mean absolute RGB error (0..1) over the ground-truth foreground pixels, both
  images shaded identically on the shapes-world background: the ground truth is lit the way the
  representation's evaluation render is (:meth:`~threedistill.representations.Representation.evaluation_ambient`:
  diffuse with a headlight at its ambient term for the NeRF and the mesh, unlit albedo for the
  Gaussians); a missing part of the object counts as background there.
* ``prompt_correct``: the shipped classifier's shape and color, pooled over views, both match the
  prompt (the analogue of CLIP R-precision); ``shape_correct`` / ``color_correct`` separately.
* ``size``: predicted / true silhouette area, pooled over views (1 for the right size; the prior
  was trained on objects of known size at known distances, so size is part of the target).
* ``shape_iou``: silhouette IoU after the best uniform scale (one factor for all views, searched
  around the square root of the area ratio) and per-view shift (centroids aligned) of the
  prediction: a right shape at the wrong size scores high here and low in ``iou``.
* ``haze``: alpha mass outside the true silhouette dilated by :data:`HAZE_DILATION` pixels, per
  pixel of true silhouette (0 for the ground truth; floaters and fog both count).
* ``color_noise``: high-frequency energy of the render inside the true silhouette (eroded by
  one pixel): the mean absolute difference from its 3x3 box blur, minus the same for the ground
  truth (about 0 for a clean surface; dark speckle raises it).
* ``floaters`` (of an exported mesh, :func:`floater_fraction`): the area of every connected
  component but the largest, as a fraction of the total area.
* ``mesh_iou``, ``mesh_color_error``, ``mesh_shape_iou``, ``mesh_size`` (of an exported mesh file,
  :func:`evaluate_mesh_file`): the file as written (its texture or vertex colors, its recorded
  placement undone) rendered from the same evaluation cameras, shaded as the representation's
  evaluation render, and scored like it: what a user who downloads the GLB gets, which can
  differ from the renders (a marching-cubes surface shows bumps that the volume render's
  smoothed normals hide).
* ``view_consistency`` (mug only): the fraction of views whose handle is on the correct side:
  the ground-truth handle region is more than half covered and the mirrored mug's handle region
  (where a Janus or mirrored result puts it) less than half. 1 for the ground truth, 0 for a
  mirrored or two-handled mug.

Ground truth scores 1 / 0 / correct / 1 by construction (tests check that, and that wrong shapes
and colors score clearly worse).

Across seeds of one prompt, :func:`seed_diversity` measures how different the results are (mode
collapse vs. variety): one minus the mean pairwise silhouette IoU, and the mean pairwise RGB
difference over the union of the foregrounds.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
import trimesh

from threedistill.cameras import CameraBatch, make_cameras
from threedistill.errors import UserError
from threedistill.representations.mesh_file import load_exported_mesh, render_exported_mesh
from threedistill.shapes.classifier import load_classifier
from threedistill.shapes.render import render_mesh, render_shape
from threedistill.shapes.world import BACKGROUND, FRONTED_SHAPE, ShapePrompt, mirrored_mug, parse_prompt, shape_mesh

EVAL_AZIMUTHS = tuple(float(a) for a in range(0, 360, 45))
EVAL_ELEVATIONS = (5.0, 30.0)
EVAL_RESOLUTION = 64
#: Pixels (at the evaluation resolution) by which the true silhouette is grown before alpha
#: outside it counts as haze: antialiased edges and a slightly large object are not haze.
HAZE_DILATION = 2



def upgrade_metric_names(metrics: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Metrics written before the spelling became "color" (``colour_error``, ``colour_correct``,
    ``colour_acc``...) under today's names, so old batch manifests and eval files still read."""
    if not metrics:
        return metrics
    return {k.replace("colour", "color"): v for k, v in metrics.items()}

def eval_cameras(resolution: int = EVAL_RESOLUTION, distance: float = 1.75, fovy: float = 55.0) -> CameraBatch:
    elev = torch.tensor([e for e in EVAL_ELEVATIONS for _ in EVAL_AZIMUTHS])
    azim = torch.tensor([a for _ in EVAL_ELEVATIONS for a in EVAL_AZIMUTHS])
    azim = (azim + 180.0) % 360.0 - 180.0
    n = len(elev)
    return make_cameras(elev, azim, torch.full((n,), distance), torch.full((n,), fovy), resolution)


def score_images(prompt: ShapePrompt, rgb: torch.Tensor, alpha: torch.Tensor, cameras: CameraBatch,
                 ambient: Optional[float] = 0.1, classifier=None) -> Dict[str, Any]:
    """Metrics of renders ``rgb [V,3,H,W]`` / ``alpha [V,1,H,W]`` taken from ``cameras`` against the
    ground truth of ``prompt`` (see the module docstring), lit diffuse with a headlight at
    ``ambient``, or unlit (albedo) when ``ambient`` is None."""
    rgb, alpha = rgb.detach().float().cpu(), alpha.detach().float().cpu()
    cameras = cameras.to("cpu")
    if ambient is None:
        gt = render_shape(prompt.shape, prompt.color, cameras, shading="albedo")
    else:
        gt = render_shape(prompt.shape, prompt.color, cameras, shading="diffuse", ambient=ambient)
    pred = alpha > 0.5
    truth = gt.mask > 0.5
    union = (pred | truth).sum().item()
    iou = (pred & truth).sum().item() / union if union else 1.0
    diff = (rgb - gt.rgb).abs().mean(dim=1, keepdim=True)
    color_error = diff[truth].mean().item()
    out: Dict[str, Any] = {"prompt": prompt.text, "iou": iou, "color_error": color_error}
    out.update(silhouette_metrics(alpha, gt.mask))
    out["color_noise"] = high_frequency_energy(rgb, truth) - high_frequency_energy(gt.rgb, truth)
    if classifier is not None:
        pred_cls = classifier.predict(rgb)
        out["predicted"] = f"a {pred_cls['color']} {pred_cls['shape']}"
        out["shape_correct"] = float(pred_cls["shape"] == prompt.shape)
        out["color_correct"] = float(pred_cls["color"] == prompt.color)
        out["prompt_correct"] = float(out["shape_correct"] and out["color_correct"])
    if prompt.shape == FRONTED_SHAPE:
        out["view_consistency"] = view_consistency(pred, cameras)
    return out


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Binary dilation of ``mask [V,1,H,W]`` (bool) by a (2r+1)^2 square."""
    if r <= 0:
        return mask
    return torch.nn.functional.max_pool2d(mask.float(), 2 * r + 1, stride=1, padding=r) > 0.5


def _erode(mask: torch.Tensor, r: int) -> torch.Tensor:
    return ~_dilate(~mask, r)


def _shift_scale(mask: torch.Tensor, scale: float, shift: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``mask [V,1,H,W]`` (float) scaled by ``scale`` about ``center [V,2]`` (pixel x, y) and moved by
    ``shift [V,2]`` pixels (bilinear, zeros outside)."""
    V, _, H, W = mask.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    # Output pixel p samples the input at center + (p - shift - center) / scale.
    src_x = center[:, 0, None, None] + (xs[None] - shift[:, 0, None, None] - center[:, 0, None, None]) / scale
    src_y = center[:, 1, None, None] + (ys[None] - shift[:, 1, None, None] - center[:, 1, None, None]) / scale
    grid = torch.stack([(src_x + 0.5) / W * 2 - 1, (src_y + 0.5) / H * 2 - 1], dim=-1)
    return torch.nn.functional.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _centroids(mask: torch.Tensor) -> torch.Tensor:
    """Pixel centroid ``[V,2]`` (x, y) of each view's ``mask [V,1,H,W]`` (the image center when empty)."""
    V, _, H, W = mask.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    m = mask.float()[:, 0]
    n = m.sum(dim=(1, 2))
    cx = torch.where(n > 0, (m * xs).sum(dim=(1, 2)) / n.clamp_min(1e-8), torch.full_like(n, (W - 1) / 2))
    cy = torch.where(n > 0, (m * ys).sum(dim=(1, 2)) / n.clamp_min(1e-8), torch.full_like(n, (H - 1) / 2))
    return torch.stack([cx, cy], dim=1)


def silhouette_metrics(alpha: torch.Tensor, true_mask: torch.Tensor) -> Dict[str, float]:
    """``size``, ``shape_iou`` and ``haze`` (module docstring) of ``alpha [V,1,H,W]`` against the
    ground-truth coverage ``true_mask [V,1,H,W]`` (both in [0,1])."""
    alpha = alpha.detach().float().cpu().clamp(0, 1)
    truth = true_mask.detach().float().cpu() > 0.5
    pred = alpha > 0.5
    n_true = truth.sum().item()
    n_pred = pred.sum().item()
    size = n_pred / n_true if n_true else float("nan")
    haze = (alpha * ~_dilate(truth, HAZE_DILATION)).sum().item() / n_true if n_true else float("nan")
    if n_pred == 0 or n_true == 0:
        return {"size": size, "shape_iou": 0.0, "haze": haze}
    c_pred, c_true = _centroids(pred), _centroids(truth)
    base = (n_true / n_pred) ** 0.5
    best = 0.0
    for f in torch.linspace(0.8, 1.25, 19).tolist():
        moved = _shift_scale(pred.float(), base * f, c_true - c_pred, c_pred) > 0.5
        union = (moved | truth).sum().item()
        best = max(best, (moved & truth).sum().item() / union if union else 1.0)
    return {"size": size, "shape_iou": best, "haze": haze}


def high_frequency_energy(rgb: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute difference between ``rgb [V,3,H,W]`` and its 3x3 box blur over the pixels of
    ``mask [V,1,H,W]`` eroded by one pixel (so the silhouette's edge does not count)."""
    rgb = rgb.detach().float().cpu()
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    inner = _erode(mask.bool(), 1)
    if inner.sum() == 0:
        return float("nan")
    return (rgb - blur).abs().mean(dim=1, keepdim=True)[inner].mean().item()


def floater_fraction(vertices, faces) -> float:
    """Area of every connected component of a triangle mesh but the largest (by area), as a
    fraction of the whole area (0 for one piece). Vertices at the same position are welded first
    (a textured export splits them along UV seams); faces sharing an edge are connected."""
    v = np.asarray(vertices, dtype=np.float64)
    _, inverse = np.unique(np.round(v, 6), axis=0, return_inverse=True)
    f = inverse.reshape(-1)[np.asarray(faces, dtype=np.int64)]
    mesh = trimesh.Trimesh(vertices=v, faces=f, process=False)
    if len(mesh.faces) == 0:
        return float("nan")
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    areas = np.bincount(labels, weights=mesh.area_faces)
    total = areas.sum()
    return float((total - areas.max()) / total) if total > 0 else float("nan")


def view_consistency(pred_mask: torch.Tensor, cameras: CameraBatch, min_pixels: int = 4) -> float:
    """Fraction of views (those where a handle region is visible) with the mug's handle on the
    correct side only."""
    right = render_mesh(shape_mesh(FRONTED_SHAPE), (1, 1, 1), cameras, shading="albedo").mask > 0.5
    mirror = render_mesh(mirrored_mug(), (1, 1, 1), cameras, shading="albedo").mask > 0.5
    handle, wrong = right & ~mirror, mirror & ~right
    scores: List[float] = []
    for v in range(pred_mask.shape[0]):
        n_h, n_w = handle[v].sum().item(), wrong[v].sum().item()
        if n_h < min_pixels or n_w < min_pixels:
            continue  # handle hidden or seen end-on: this view cannot tell the sides apart
        cov_h = (pred_mask[v] & handle[v]).sum().item() / n_h
        cov_w = (pred_mask[v] & wrong[v]).sum().item() / n_w
        scores.append(float(cov_h > 0.5 and cov_w < 0.5))
    return sum(scores) / len(scores) if scores else float("nan")


def _shape_prompt(prompt: ShapePrompt | str) -> ShapePrompt:
    """``prompt`` parsed (a :class:`UserError` when it names no shapes-world object)."""
    if isinstance(prompt, str):
        parsed = parse_prompt(prompt)
        if parsed is None:
            raise UserError(f"prompt '{prompt}' is not a shapes-world prompt ('a <color> <shape>'); "
                            "evaluation needs a known ground-truth object")
        return parsed
    return prompt


def _run_eval_cameras(camera_cfg=None, resolution: int = EVAL_RESOLUTION) -> CameraBatch:
    """:func:`eval_cameras` at a run's ``camera.eval_distance`` / ``eval_fovy`` (1.75 / 55 without a config)."""
    return eval_cameras(resolution, float(getattr(camera_cfg, "eval_distance", 1.75)),
                        float(getattr(camera_cfg, "eval_fovy", 55.0)))


@torch.no_grad()
def evaluate_representation(rep, prompt: ShapePrompt | str, camera_cfg=None, ambient: Optional[float] = None,
                            classifier=None, resolution: int = EVAL_RESOLUTION) -> Dict[str, Any]:
    """Render ``rep`` from the evaluation cameras (deterministic evaluation renders) and score it
    against a ground truth lit at ``ambient`` (default: as ``rep``'s evaluation render is lit,
    :meth:`~threedistill.representations.Representation.evaluation_ambient`; None there = unlit)."""
    prompt = _shape_prompt(prompt)
    rgb, alpha, cams = eval_renders(rep, camera_cfg, resolution)
    if ambient is None:
        ambient = rep.evaluation_ambient()
    if classifier is None:
        classifier = load_classifier()
    return score_images(prompt, rgb, alpha, cams, ambient=ambient, classifier=classifier)


@torch.no_grad()
def evaluate_mesh_file(path, prompt: ShapePrompt | str, camera_cfg=None, ambient: Optional[float] = 0.1,
                       resolution: int = EVAL_RESOLUTION) -> Dict[str, Any]:
    """Score an exported mesh file (GLB/OBJ/PLY) against the ground truth of ``prompt`` from the
    evaluation cameras: read back with its colors and placement
    (:func:`~threedistill.representations.mesh_file.load_exported_mesh`), rendered on the shapes-world background
    with the interpolated vertex normals, diffuse with a headlight at ``ambient`` (None: unlit),
    and scored by :func:`score_images` (no classifier). Keys: ``mesh_`` + ``iou``,
    ``color_error``, ``shape_iou``, ``size``."""
    prompt = _shape_prompt(prompt)
    cams = _run_eval_cameras(camera_cfg, resolution)
    background = torch.as_tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None].expand(
        len(cams), 3, cams.height, cams.width)
    out = render_exported_mesh(load_exported_mesh(path), cams, background, ambient)
    m = score_images(prompt, out["rgb"], out["alpha"], cams, ambient=ambient)
    return {f"mesh_{k}": m[k] for k in ("iou", "color_error", "shape_iou", "size")}


@torch.no_grad()
def eval_renders(rep, camera_cfg=None, resolution: int = EVAL_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor, CameraBatch]:
    """``rgb [V,3,H,W]``, ``alpha [V,1,H,W]`` (CPU) of ``rep`` from the evaluation cameras, and the cameras."""
    cams = _run_eval_cameras(camera_cfg, resolution)
    dev = next((p.device for p in rep.parameters()), torch.device("cpu"))
    out = rep.render(cams.to(dev), training=False)
    return out.rgb.float().cpu(), out.alpha.float().cpu(), cams


def seed_diversity(renders: List[tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, float]:
    """Diversity of several results for one prompt, each given as ``(rgb [V,3,H,W], alpha [V,1,H,W])``
    from the same cameras: ``silhouette_diversity`` = 1 - mean pairwise IoU of ``alpha > 0.5`` (0 for
    identical shapes, 1 for disjoint ones) and ``appearance_diversity`` = mean pairwise mean absolute
    RGB difference over the union of the two foregrounds (0..1). NaN with fewer than two results."""
    if len(renders) < 2:
        return {"silhouette_diversity": float("nan"), "appearance_diversity": float("nan")}
    ious, diffs = [], []
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            (rgb_a, alpha_a), (rgb_b, alpha_b) = renders[i], renders[j]
            a, b = alpha_a > 0.5, alpha_b > 0.5
            union = a | b
            n = union.sum().item()
            ious.append((a & b).sum().item() / n if n else 1.0)
            d = (rgb_a - rgb_b).abs().mean(dim=1, keepdim=True)
            diffs.append(d[union].mean().item() if n else 0.0)
    return {"silhouette_diversity": 1.0 - sum(ious) / len(ious), "appearance_diversity": sum(diffs) / len(diffs)}


@torch.no_grad()
def evaluate_prior_samples(prior, prompts: List[ShapePrompt], n_per_prompt: int = 8, steps: int = 50,
                           guidance_scale: float = 7.5, seed: int = 0, classifier=None,
                           progress=None) -> List[Dict[str, Any]]:
    """Sample ``n_per_prompt`` images per prompt from a 2D prior and classify each one: per prompt,
    the fraction of samples whose shape, color and both are those of the prompt."""
    if classifier is None:
        classifier = load_classifier()
    rows = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        images = prior.sample(p.text, n=n_per_prompt, steps=steps, guidance_scale=guidance_scale, generator=g).cpu()
        pred = classifier.predict(images)
        s_ok = [s == p.shape for s in pred["shapes"]]
        c_ok = [c == p.color for c in pred["colors"]]
        rows.append({"prompt": p.text, "held_out": p.held_out, "samples": n_per_prompt,
                     "shape_acc": sum(s_ok) / n_per_prompt, "color_acc": sum(c_ok) / n_per_prompt,
                     "acc": sum(a and b for a, b in zip(s_ok, c_ok)) / n_per_prompt,
                     "images": images})
        if progress is not None:
            progress(1)
    return rows
