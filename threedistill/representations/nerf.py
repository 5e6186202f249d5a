"""A DreamFusion/Magic3D-style NeRF: hash-grid density + albedo field, Lambertian shading, a
learned background, volume rendering with nerfacc.

Field
-----
World points ``x`` in ``[-radius, radius]^3`` are mapped to ``[0, 1]^3`` and encoded by a
multi-resolution hash grid (:class:`~threedistill.representations.encodings.HashGridEncoding`);
one MLP maps the features to a raw density and 3 albedo logits::

    sigma  = act(raw + blob_density * (1 - |x| / blob_radius))   # Magic3D density blob
    albedo = sigmoid(logits)                                     # in [0, 1]

with ``act`` = softplus (``density_activation``, default) or a truncated-gradient exp.

``blob_density`` is a scheduled scalar taken at the field's step: a training render of ``step``
uses that step's, :meth:`NeRF.update` after the optimizer step moves to ``step + 1`` and
:meth:`NeRF.set_step` sets the step of a loaded checkpoint, so a resumed run, an export and an
evaluation see the same blob as the uninterrupted run.

Normals are ``n = -grad sigma / |grad sigma|`` (outward). ``normal_type=finite_difference`` (the
default) takes the gradient of the raw density by tetrahedral differences over ``normal_eps``
(4 more field evaluations; differentiable, so the orientation loss reaches the field);
``analytic`` takes it with ``torch.autograd.grad`` (``create_graph=True`` while training).

Shading (shared with the mesh: :mod:`threedistill.representations.common`)
-------------------------------------------------------------------------
Training: albedo only before ``ambient_only_steps``; afterwards one mode per batch, drawn from the
render ``generator``: ``albedo`` (p = albedo_prob), ``textureless`` (white albedo, lit,
p = textureless_prob), else ``diffuse``: ``albedo * (ambient + (1 - ambient) * max(0, n . l))`` with
``l`` the unit vector from the sample to the batch's ``light_positions``. Evaluation renders
(``training=False``) are deterministic: diffuse with the light at the camera.

Where the lit modes are shaded (``shading_point``): ``samples`` shades every sample with its own
normal and composites the colors; ``surface`` composites the albedo and shades it once per ray
with the normal at the ray's median depth (where the accumulated weight reaches half the ray's
opacity; :func:`median_depth`), NeRFactor's surface point: each ray is lit by one normal, that
of the surface it shows, rather than by the mixture of the normals through a fuzzy shell.

Background
----------
``mlp``: a small MLP on the frequency-encoded ray direction (sigmoid output); while training it is
replaced, with probability ``random_background_prob`` per image, by a random solid color.
``white`` / ``black``: solid. ``random``: a random solid color per image while training, white at
evaluation. All randomness comes from the ``generator`` passed to :meth:`NeRF.render`.

Ray marching (two back ends, same math)
---------------------------------------
* **Fixed samples** (CPU, and any device when ``use_occupancy_grid`` is False): each ray is clipped
  to the cube (slab test) and cut into ``num_samples`` equal bins; the density is evaluated at one
  point per bin (jittered from the generator while training, the bin midpoint at evaluation) and
  composited with ``nerfacc.render_weight_from_density`` / ``nerfacc.accumulate_along_rays`` on
  ``[rays, samples]`` tensors. Rays that miss the cube get zero-length bins, hence alpha 0. Normals
  are taken only at samples whose weight exceeds ``normal_weight_threshold`` (the others add less
  than that to any pixel); this skips most of the expensive double backward. Empty space is
  skipped as on CUDA, but on the fixed ``[rays, samples]`` layout: samples in cells of a
  ``skip_grid_resolution^3`` grid whose density (at cell centres, dilated by one cell) is below
  ``skip_density_threshold`` get density 0 without evaluating the field. Training renders use
  the buffer ``train_skip_grid``, refreshed by :meth:`NeRF.update` every ``skip_refresh_every``
  steps and checkpointed (so resume stays exact); renders without autograd use a grid of the
  current weights (:meth:`NeRF.skip_grid`).
* **Occupancy grid** (CUDA, the default there; not runnable on CPU): ``nerfacc.OccGridEstimator``
  marching with ``render_step_size`` and ``nerfacc.rendering``; :meth:`NeRF.update` refreshes the
  grid every 16 steps. nerfacc draws its stratified jitter and grid-refresh samples from torch's
  global CUDA RNG, so this path is reproducible only up to that RNG (not bitwise from
  ``generator``). ``num_samples`` does not apply there.

The estimator is always built (its buffers are small) so that checkpoints have the same keys on
every device: ``estimator.occs``, ``estimator.binaries``, ``estimator.resolution`` and
``estimator.aabbs`` are part of ``state_dict()``. It starts with every cell occupied, so the first
CUDA renders before the first refresh march the whole cube.

Outputs (:class:`RenderOutput`)
-------------------------------
* ``rgb [B,3,H,W]``: composited over the background; ``alpha [B,1,H,W]``: accumulated weight.
* ``depth [B,1,H,W]``: ``(sum_i w_i t_i + (1 - alpha) * far) / far`` clamped to ``[0, 1]``, where
  ``t_i`` is the distance along the (unit) ray and ``far = |camera| + radius * sqrt(3)`` is the
  farthest any point of the cube can be; empty pixels read 1.
* ``normal [B,3,H,W]``: ``(sum_i w_i n_i + 1) / 2`` with world-space unit normals ``n_i``; this is
  the weighted ``(n + 1) / 2`` composited over a 0.5 (zero-normal) background, not renormalized.
  ``None`` when the render computed no normals (training, albedo shading, no orientation loss
  and ``render_normals`` False).
* ``extras["orient"] [B*H*W]``: per ray ``sum_i stopgrad(w_i) * relu(n_i . d)^2`` (when normals
  were computed); :meth:`NeRF.regularizers` averages it.
* ``extras["albedo_smooth"] [B*H*W]``: per ray ``sum_i stopgrad(w_i) |albedo(x_i) -
  albedo(x_i + albedo_smooth_eps * z_i)|^2`` (training renders with the term on; ``z`` drawn from
  the generator after the sample jitter on the fixed-sample path).
* ``extras["normal_smooth_3d"] [B*H*W]``: per ray ``sum_i stopgrad(w_i) |n(x_i) -
  n(x_i + normal_smooth_eps * z_i)|^2`` (training renders with the term on; ``z`` drawn after the
  albedo term's draw on the fixed-sample path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import nerfacc
import torch
import torch.nn.functional as F
from torch import nn

from threedistill.cameras import CameraBatch
from threedistill.errors import UserError
from threedistill.groups import (MAX_STEPS, Scheduled, check_bounds, check_choice, check_positive, check_whole_schedule, parse_schedule,
                                plain_schedule, scheduled, scheduled_int, shown)
from threedistill.representations.base import RenderOutput, Representation, RepresentationContext, register
from threedistill.representations.common import (
    Appearance,
    ShadingConfig,
    check_background,
    check_radius,
    check_shading,
    far_distance,
    normalized_depth,
    random_replacement,
    solid_background,
    transmittance_term,
)
from threedistill.representations.encodings import FrequencyEncoding, HashGridEncoding

#: Background modes of the NeRF: the solid ones and the learned ``mlp``.
NERF_BACKGROUNDS = ("mlp", "white", "black", "random")


from threedistill.representations.common import LAMBDA_BOUNDS, LR_BOUNDS, SHADING_BOUNDS

#: Bounds of the NeRF's numbers: hash grids up to 2^24 entries per level (Instant-NGP's largest
#: tables; more exhausts a GPU), MLPs up to 1024 wide and 16 deep, up to 1024 samples per ray,
#: grids up to 512^3.
NERF_BOUNDS = {**SHADING_BOUNDS, "n_levels": (1, 32), "n_features_per_level": (1, 16), "log2_hashmap_size": (4, 24),
               "base_resolution": (1, 4096), "max_resolution": (1, 65536), "hidden_dim": (1, 1024),
               "n_hidden_layers": (0, 16), "blob_density": (-1e4, 1e4), "blob_radius": (0.0, 1000.0),
               "num_samples": (1, 1024), "skip_grid_resolution": (0, 512), "skip_density_threshold": (0.0, 1e6),
               "skip_refresh_every": (1, MAX_STEPS), "occupancy_grid_resolution": (1, 512),
               "occupancy_threshold": (0.0, 1e6), "render_step_size": (1e-5, 1.0), "lambda_orient": LAMBDA_BOUNDS,
               "lambda_sparsity": LAMBDA_BOUNDS, "lambda_opaque": LAMBDA_BOUNDS,
               "lambda_transmittance": LAMBDA_BOUNDS, "transmittance_target": (0.0, 1.0),
               "lambda_albedo_smooth": LAMBDA_BOUNDS, "lambda_normal_smooth": LAMBDA_BOUNDS, "albedo_smooth_eps": (1e-6, 1000.0),
               "lambda_normal_smooth_3d": LAMBDA_BOUNDS, "normal_smooth_eps": (1e-6, 1000.0),
               "normal_eps": (1e-6, 1000.0),
               "isosurface_threshold": (-1e6, 1e6), "grid_levels": (1, 32)}


@dataclass
class NerfConfig(ShadingConfig):
    """``representation.nerf``. Shading and background fields: :class:`ShadingConfig`; ``radius``
    also bounds the scene (the axis-aligned cube ``[-radius, radius]^3``)."""

    # The defaults suit the shapes world on a CPU (smooth objects, 32 px renders); threedistill/presets/sd.yaml
    # has Instant-NGP-like 12 levels up to 512 for Stable Diffusion.
    n_levels: int = 6
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    # 32 and not 64: at 64 the finest level resolves bumps smaller than the prior can see at 64 px,
    # and SDS leaves them there; the headlight turns them into dark speckle. 32 halves the color
    # noise at the same IoU (4 prompts x 2 seeds, benchmarks/results/quality-ablation-issue18-round3.md).
    max_resolution: int = 32
    # Coarse to fine: the number of hash-grid levels in use (the coarsest ones; the finer levels'
    # features are zero and get no gradient), a number or a schedule (threedistill/groups.py), e.g.
    # [[0, 2], [200, 4], [400, 6]] or [2, 6, 0, 400] (Magic3D, Neuralangelo: levels unlocked
    # progressively). null: all n_levels from the start. Renders after training use its value at
    # run.steps.
    grid_levels: Scheduled = None
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    # Magic3D density blob blob_density * (1 - |x| / blob_radius) added to the raw density.
    # Scheduled: e.g. [10, 0, 0, 400] shapes the start and tapers to nothing by step 400, so the
    # blob's low density outside the object does not stay as haze. A number keeps it for the
    # whole run (the default, as before). Measured on the shapes quick start ("a red cube", seed 0):
    # [10, 0, 0, 400] made it worse (haze 0.006 -> 0.017, GLB floaters 0 -> 0.22, a grey fog over
    # the frame): the blob's negative part outside blob_radius is what keeps empty space empty.
    blob_density: Scheduled = 10.0
    # The prior cannot tell an object's size: it was trained on cameras 1.5-2 units away with a
    # 40-70 degree field of view, so the same object appears at sizes 2.6x apart, and SDS keeps
    # close to the size it starts at. The blob's radius is therefore the size prior: 0.4 is the
    # middle of the shapes world's objects (all within radius 0.5). Measured on four prompts outside
    # the benchmark x 2 seeds (benchmarks/results/quality-ablation-issue18-round3.md): 0.35 left them
    # at 0.84 of their true silhouette area (a blue mug at 0.51), 0.5 grew a cone to 1.6-1.8 with
    # haze, 0.4 gave 0.85-1.2. Magic3D's 0.5 is in threedistill/presets/sd.yaml.
    blob_radius: float = 0.4
    # Fixed stratified samples per ray (CPU path). The CUDA path marches the occupancy grid with
    # render_step_size instead.
    num_samples: int = 32
    # CPU (fixed-sample) path: samples in cells of a skip_grid_resolution^3 grid whose density,
    # dilated by one cell, is below skip_density_threshold are not evaluated. Training renders use
    # a grid refreshed every skip_refresh_every steps (checkpointed); renders without autograd use
    # a grid of the current weights. 0 disables skipping. 32: a refresh costs 1/8 of 64's (the
    # quick start's optimizer stage 6.8 s -> 2.3 s) and skips less, never more (same result on it).
    skip_grid_resolution: int = 32
    skip_density_threshold: float = 0.001
    skip_refresh_every: int = 16
    # CUDA path: nerfacc occupancy grid.
    occupancy_grid_resolution: int = 32
    occupancy_threshold: float = 0.01
    render_step_size: float = 0.01
    # Background: "mlp" (learned, view-direction dependent), "white", "black", "random". With
    # "mlp", while training, the learned background is replaced by a random solid color with
    # probability random_background_prob per image (the solid modes ignore it).
    random_background_prob: float = 0.5
    # Regularizer weights.
    lambda_orient: Scheduled = field(default_factory=lambda: [10.0, 1000.0, 0, 5000])
    lambda_sparsity: Scheduled = 5.0
    # lambda_opaque: binary entropy of each pixel's alpha (pushes alpha to 0 or 1, threestudio's
    # lambda_opaque); 0 = off.
    lambda_opaque: Scheduled = 0.0
    # Dream Fields' transmittance loss (Jain et al. 2022): -min(transmittance_target, mean(1 - alpha))
    # per image, averaged over the batch: an image more opaque than the target on average is pushed
    # towards transparency (haze and oversize go first), one at or above it is left alone. Both
    # scheduled (Dream Fields anneals the target up); 0 = off (the default).
    lambda_transmittance: Scheduled = 0.0
    transmittance_target: Scheduled = 0.88
    # Albedo smoothness (Fantasia3D / TextMesh kd smoothness): the ray weight-weighted
    # |albedo(x) - albedo(x + albedo_smooth_eps * N(0, I))|^2 at the samples that make up the
    # surface, summed over each ray and averaged over rays; the perturbation is drawn from the
    # render generator (reproducible). albedo_smooth_eps is in scene units. 0 = off (the default).
    lambda_albedo_smooth: Scheduled = 0.0
    albedo_smooth_eps: float = 0.02
    # Normal-map smoothness (threestudio's 2D normal smoothness; the "smooth normals" prior of
    # Fantasia3D / RichDreamer): mean squared difference between neighbouring pixels of the
    # rendered normal map (n + 1) / 2, rows and columns. The dark speckle of the shapes quick start
    # is normal noise under the headlight (its albedo is clean), which this removes. Turns normals
    # on in every training render. 0 = off (the default): at 1000 on the shapes quick start color
    # noise fell (cube 0.041 -> 0.033, cylinder 0.029 -> 0.024) but the cylinder's IoU fell too
    # (0.688 -> 0.649), one seed each: not a clear enough win to change sds-nerf.yaml.
    lambda_normal_smooth: Scheduled = 0.0
    # 3D normal smoothness (threestudio's lambda_3d_normal_smooth; the curvature-style terms of
    # NeuS2 / Neuralangelo): the ray weight-weighted |n(x) - n(x + normal_smooth_eps * N(0, I))|^2
    # at the samples that make up the surface (the normals as shaded, normal_type), summed over each
    # ray and averaged over rays. Unlike the 2D term it sees no silhouette edges, only the bending of
    # the surface within normal_smooth_eps (scene units): it flattens dents that tilt the normals
    # away from the light. Turns normals on in every training render. 0 = off (the default).
    lambda_normal_smooth_3d: Scheduled = 0.0
    normal_smooth_eps: float = 0.04
    # How surface normals are taken from the density: "analytic" (the exact gradient of the field
    # by autograd; on a hash grid it jumps from cell to cell, which the headlight turns into dark
    # speckle) or "finite_difference" (threestudio's default; Neuralangelo's numerical gradient):
    # the gradient of the raw density over a tetrahedron of 4 points normal_eps away (scene units),
    # which averages the field over about a cell of the finest grid level. finite_difference is
    # the default: with eps 0.04 and the 32 grid the color noise fell from +0.031 to +0.015 (4
    # prompts x 2 seeds, benchmarks/results/quality-ablation-issue18-round3.md); it costs 4 more
    # field evaluations per surface sample instead of a double backward.
    normal_type: str = "finite_difference"
    normal_eps: float = 0.04
    # Where lit renders are shaded (module docstring): "samples" (each sample with its own normal,
    # then composited; DreamFusion, threestudio) or "surface" (the composited albedo shaded once per
    # ray with the normal at the median depth; NeRFactor's surface point). It was tried against the
    # NeRF's dark lit renders (a trained SDS sphere reads 0.54 mean Lambert against the truth's
    # 0.65) and does not fix them: re-shading the shipped runs at the median depth leaves the colour
    # error at 0.150 -> 0.151, trained with it 0.154; the dents are in the surface itself
    # (benchmarks/results/quality-ablation-issue18-round9.md).
    shading_point: str = "samples"
    # Density activation of the raw field (blob included): "softplus" (DreamFusion / threestudio)
    # or "exp" (Instant-NGP, nerfstudio's trunc_exp: exp forward, the gradient's exponent clamped
    # at 15). exp lets the density grow by orders of magnitude within a few steps, so a surface
    # becomes a thinner shell (weight depth spread 0.11 -> 0.04 on a cube); but on the shapes
    # quick start it shrank the cube (size 0.90 -> 0.72) and doubled its color noise: softplus.
    density_activation: str = "softplus"
    # Marching-cubes iso level on density (export). 5 puts the surface of the initial blob at
    # radius 0.2; trained objects are far denser than that at their surface.
    isosurface_threshold: float = 5.0

    def validate(self, key: str) -> None:
        """Checks types cannot express; ``key`` is this group's dotted path (for messages). Call
        as ``NerfConfig.validate(node, key)`` on an OmegaConf node."""
        for name in ("lambda_orient", "lambda_sparsity", "lambda_opaque", "lambda_transmittance",
                     "transmittance_target", "lambda_albedo_smooth", "lambda_normal_smooth", "lambda_normal_smooth_3d",
                     "blob_density"):
            parse_schedule(getattr(self, name), f"{key}.{name}")
        check_positive(self.num_samples, f"{key}.num_samples")
        check_choice(self.normal_type, f"{key}.normal_type", NORMAL_TYPES)
        check_choice(self.shading_point, f"{key}.shading_point", SHADING_POINTS)
        check_choice(self.density_activation, f"{key}.density_activation", DENSITY_ACTIVATIONS)
        check_bounds(self, key, NERF_BOUNDS, optional=("grid_levels",))
        if self.grid_levels is not None:
            levels = check_whole_schedule(self.grid_levels, f"{key}.grid_levels", lo=1)
            if max(levels.values) > int(self.n_levels):  # type: ignore[union-attr]
                raise UserError(f"config key '{key}.grid_levels' must be at most {key}.n_levels "
                                f"({self.n_levels}), got {shown(plain_schedule(self.grid_levels))}")
        check_radius(self, key)
        check_shading(self, key)
        check_background(self, key, NERF_BACKGROUNDS)

#: Normal estimates (``representation.nerf.normal_type``).
NORMAL_TYPES = ("analytic", "finite_difference")
#: Where lit renders are shaded (``representation.nerf.shading_point``).
SHADING_POINTS = ("samples", "surface")
#: Density activations (``representation.nerf.density_activation``).
DENSITY_ACTIVATIONS = ("softplus", "exp")


class _TruncExp(torch.autograd.Function):
    """exp(x) whose backward uses exp(min(x, 15)): large raw densities cannot blow up a step."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


#: Vertices of a regular tetrahedron centred at the origin (finite-difference normals).
_TETRAHEDRON = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]])


def ray_box_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against the cube ``[-radius, radius]^3``.

    ``rays_o, rays_d [N,3]`` -> ``near [N]`` (>= 0), ``far [N]``, ``hit [N]`` (bool). Rays that miss
    get ``near = far = 0``.
    """
    d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    inv = 1.0 / d
    t0 = (-radius - rays_o) * inv
    t1 = (radius - rays_o) * inv
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


def median_depth(weights: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor,
                 n_rays: int, min_alpha: float = 1e-4) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per ray, the depth where the accumulated weight reaches half the ray's total (the weights'
    median, interpolated linearly within its sample interval), from packed samples ``weights``,
    ``t_starts``, ``t_ends`` ``[N]`` ordered by ray and by depth within a ray (nerfacc's layout;
    ``ray_indices [N]`` the ray of each). Returns ``t [n_rays]`` (detached; 0 for a ray without
    weight) and ``hit [n_rays]`` bool (the ray's total weight exceeds ``min_alpha``)."""
    dev, N = weights.device, weights.shape[0]
    w = weights.detach().double()
    total = torch.zeros(n_rays, device=dev, dtype=w.dtype).index_add(0, ray_indices, w)
    if N == 0:
        return torch.zeros(n_rays, device=dev), torch.zeros(n_rays, dtype=torch.bool, device=dev)
    order = torch.arange(N, device=dev)
    first = torch.full((n_rays,), N - 1, device=dev, dtype=torch.long).scatter_reduce(
        0, ray_indices, order, reduce="amin", include_self=False)
    inclusive = w.cumsum(0)
    inclusive = inclusive - (inclusive - w)[first][ray_indices]  # restarted at each ray
    half = 0.5 * total[ray_indices]
    crossed = (inclusive >= half) & (w > 0)
    idx = torch.full((n_rays,), N, device=dev, dtype=torch.long).scatter_reduce(
        0, ray_indices[crossed], order[crossed], reduce="amin", include_self=True)
    hit = (idx < N) & (total > min_alpha)
    i = idx.clamp(max=N - 1)
    frac = ((half[i] - (inclusive[i] - w[i])) / w[i].clamp_min(1e-30)).clamp(0.0, 1.0)
    t = t_starts[i].double() + (t_ends[i] - t_starts[i]).double() * frac
    return torch.where(hit, t, torch.zeros_like(t)).to(t_starts.dtype).detach(), hit


def _mlp(in_dim: int, hidden_dim: int, n_hidden_layers: int, out_dim: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    d = in_dim
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(d, hidden_dim), nn.ReLU()]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


@register("nerf")
class NeRF(Representation, Appearance):
    """Hash-grid NeRF (see the module docstring). Built as ``NeRF(c, context, device)`` from its
    config group ``representation.nerf`` (of the context only ``steps`` is used: the grid levels after training).

    Attributes that callers may set:
    ``use_occupancy_grid`` (default: device is CUDA), ``render_normals`` (always compute normals),
    ``chunk_points`` (samples per chunk for no-grad renders), ``normal_weight_threshold``.
    """

    config_key = "representation.nerf"  # where its settings live (named in error messages)

    # Fixed-sample path: normals (and their double backward) only where w_i > this. 1e-3, not
    # 1e-4: a trained shapes-world object has many samples between the two in its soft shell, and
    # normals there cost a third of a training step (0.084 -> 0.052 s per 32 px view with
    # finite-difference normals) while changing a pixel by less than 1e-3 per sample.
    normal_weight_threshold: float = 1e-3
    # Samples per chunk when rendering without autograd (evaluation renders of any size).
    chunk_points: int = 1 << 18

    def __init__(self, c, context: RepresentationContext, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self._read_appearance(c, NERF_BACKGROUNDS)
        self.num_samples = int(c.num_samples)
        self._blob_density = plain_schedule(c.blob_density)
        # The step whose blob the field uses (blob_density is scheduled): set by training renders,
        # by update() (to the next step) and by set_step() after loading a checkpoint.
        self._step = 0
        self.blob_radius = float(c.blob_radius)
        self.render_step_size = float(c.render_step_size)
        self.occupancy_threshold = float(c.occupancy_threshold)
        self._lambda_orient = plain_schedule(c.lambda_orient)
        self._lambda_sparsity = plain_schedule(c.lambda_sparsity)
        self._lambda_opaque = plain_schedule(c.lambda_opaque)
        self._lambda_transmittance = plain_schedule(c.lambda_transmittance)
        self._transmittance_target = plain_schedule(c.transmittance_target)
        self._lambda_albedo_smooth = plain_schedule(c.lambda_albedo_smooth)
        self._lambda_normal_smooth = plain_schedule(c.lambda_normal_smooth)
        self._lambda_normal_smooth_3d = plain_schedule(c.lambda_normal_smooth_3d)
        self.albedo_smooth_eps = float(c.albedo_smooth_eps)
        self.normal_smooth_eps = float(c.normal_smooth_eps)
        self.normal_type = str(c.normal_type)
        self.density_activation = str(c.density_activation)
        self.normal_eps = float(c.normal_eps)
        self.shading_point = str(c.shading_point)
        self._isosurface_threshold = float(c.isosurface_threshold)

        self.encoding = HashGridEncoding(
            n_levels=int(c.n_levels), n_features_per_level=int(c.n_features_per_level),
            log2_hashmap_size=int(c.log2_hashmap_size), base_resolution=int(c.base_resolution),
            max_resolution=int(c.max_resolution),
        )
        self._grid_levels = plain_schedule(c.grid_levels)
        # Until training renders set it per step: the levels of the finished run (what previews,
        # exports and evaluations of a run folder show).
        self._set_grid_levels(int(context.steps))
        # One MLP: features -> [raw density, 3 albedo logits].
        self.mlp = _mlp(self.encoding.output_dim, int(c.hidden_dim), int(c.n_hidden_layers), 4)

        if self.background_mode == "mlp":
            self.background_encoding = FrequencyEncoding(3, n_frequencies=4)
            self.background_mlp = _mlp(self.background_encoding.output_dim, 32, 1, 3)
        else:
            self.background_encoding = None
            self.background_mlp = None

        r = self.radius
        self.estimator = nerfacc.OccGridEstimator(
            roi_aabb=[-r, -r, -r, r, r, r], resolution=int(c.occupancy_grid_resolution), levels=1)
        self.estimator.binaries.fill_(True)  # march everything until the first refresh

        device = torch.device(device)
        self.use_occupancy_grid = device.type == "cuda"
        self.render_normals = False
        # Empty-space skipping on the fixed-sample path (see skip_grid / update).
        self.skip_grid_resolution = int(c.skip_grid_resolution)
        self.skip_density_threshold = float(c.skip_density_threshold)
        self.skip_refresh_every = int(c.skip_refresh_every)
        G = max(self.skip_grid_resolution, 1)
        # The grid training renders use; refreshed in update(), saved in checkpoints so a resumed
        # run skips exactly what the uninterrupted one did. All True = nothing skipped yet.
        self.register_buffer("train_skip_grid", torch.ones(G, G, G, dtype=torch.bool))
        self._skip_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self.to(device)

    # ------------------------------------------------------------------------------------------
    # Field
    # ------------------------------------------------------------------------------------------
    @property
    def blob_density(self) -> float:
        """The density blob's peak at the current step (``blob_density`` is scheduled)."""
        return float(scheduled(self._blob_density, self._step, "blob_density"))

    def set_step(self, step: int) -> None:
        """The field as of ``step`` (after loading that step's checkpoint): the blob's schedule and
        the hash-grid levels in use."""
        self._step = int(step)
        self._set_grid_levels(step)

    def _raw_field(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """World points ``[N,3]`` -> raw density before the activation ``[N]``, albedo logits ``[N,3]``."""
        h = self.encoding((x / self.radius + 1.0) * 0.5)
        out = self.mlp(h)
        # |x| with a tiny epsilon: finite first and second derivatives at the origin.
        r = torch.sqrt((x * x).sum(dim=-1) + 1e-12)
        blob = self.blob_density * (1.0 - r / self.blob_radius)
        return out[:, 0] + blob, out[:, 1:]

    def _field(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """World points ``[N,3]`` -> density ``[N]`` (>= 0), albedo ``[N,3]`` in [0,1]."""
        raw, logits = self._raw_field(x)
        sigma = trunc_exp(raw) if self.density_activation == "exp" else F.softplus(raw)
        return sigma, torch.sigmoid(logits)

    def _normals(self, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """Outward unit normals at ``x [N,3]`` alone (the samples' density and albedo are already
        known): with ``finite_difference`` only the 4 tetrahedron points are evaluated."""
        if self.normal_type == "finite_difference":
            return self._finite_difference_normals(x, create_graph)
        return self._field_and_normals(x, create_graph)[2]

    def _finite_difference_normals(self, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        # Tetrahedral differences: sum_k v_k f(x + eps v_k) = 4 eps grad f + O(eps^3) for the 4
        # vertices v_k of a regular tetrahedron (|v_k| = sqrt(3)); the activation is monotone, so
        # the raw density's gradient has sigma's direction.
        with torch.set_grad_enabled(create_graph):
            v = _TETRAHEDRON.to(x)
            raw, _ = self._raw_field((x[:, None, :] + self.normal_eps * v[None]).reshape(-1, 3))
            grad = (raw.view(-1, 4, 1) * v[None]).sum(dim=1)
            return F.normalize(-grad, dim=-1, eps=1e-12)

    def _field_and_normals(self, x: torch.Tensor, create_graph: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Density, albedo and outward unit normals ``-grad sigma / |grad sigma|`` at ``x [N,3]``
        (``normal_type``: the exact gradient, or finite differences over a tetrahedron of
        ``normal_eps``). With ``create_graph`` the normals stay differentiable w.r.t. the parameters."""
        if self.normal_type == "finite_difference":
            with torch.set_grad_enabled(create_graph):
                sigma, albedo = self._field(x)
            return sigma, albedo, self._finite_difference_normals(x, create_graph)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            sigma, albedo = self._field(xg)
            (grad,) = torch.autograd.grad(sigma, xg, torch.ones_like(sigma), create_graph=create_graph)
        normal = F.normalize(-grad, dim=-1, eps=1e-12)
        if not create_graph:
            sigma, albedo, normal = sigma.detach(), albedo.detach(), normal.detach()
        return sigma, albedo, normal

    @torch.no_grad()
    def skip_grid(self) -> torch.Tensor:
        """Boolean ``[G,G,G]`` grid (indexed x, y, z) of cells that may hold density above
        ``skip_density_threshold``: the density at cell centres, thresholded and dilated by one
        cell. Cached until any parameter changes (optimizer steps and checkpoint loads bump the
        parameters' version counters)."""
        key = ((self.skip_grid_resolution, self.skip_density_threshold, self.encoding.active_levels,
               self.blob_density)
               + tuple(p._version for p in self.parameters()))
        if self._skip_cache is not None and self._skip_cache[0] == key:
            return self._skip_cache[1]
        grid = self._compute_skip_grid()
        self._skip_cache = (key, grid)
        return grid

    @torch.no_grad()
    def _compute_skip_grid(self) -> torch.Tensor:
        G, r = self.skip_grid_resolution, self.radius
        dev = self.encoding.embeddings.device
        c = (torch.arange(G, device=dev, dtype=torch.float32) + 0.5) / G * (2 * r) - r
        pts = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1).reshape(-1, 3)
        dense = (self.density(pts) > self.skip_density_threshold).float().view(1, 1, G, G, G)
        return F.max_pool3d(dense, kernel_size=3, stride=1, padding=1)[0, 0] > 0

    def _chunked(self, fn, points: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or points.shape[0] <= self.chunk_points:
            return fn(points)
        return torch.cat([fn(p) for p in points.split(self.chunk_points)], dim=0)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Volume density at world points ``[N,3]`` -> ``[N]`` (chunked without autograd)."""
        return self._chunked(lambda p: self._field(p)[0], points)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Albedo in [0,1] at world points ``[N,3]`` -> ``[N,3]`` (chunked without autograd)."""
        return self._chunked(lambda p: self._field(p)[1], points)

    @property
    def isosurface_threshold(self) -> float:
        return self._isosurface_threshold

    @property
    def bounds(self) -> float:
        return self.radius

    # ------------------------------------------------------------------------------------------
    # Background (shading: Appearance._draw_shading / _shade)
    # ------------------------------------------------------------------------------------------
    def _background(self, dirs: torch.Tensor, image_of_ray: torch.Tensor, n_images: int, training: bool,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
        """Background color per ray ``[N,3]`` (the solid modes never draw a random replacement)."""
        dev = dirs.device
        if self.background_mode != "mlp":
            return solid_background(n_images, self.background_mode, 0.0, training, generator, dev)[image_of_ray]
        bg = torch.sigmoid(self._chunked(lambda d: self.background_mlp(self.background_encoding(d)), dirs))
        if training and self.random_background_prob > 0:
            replace, colors = random_replacement(n_images, self.random_background_prob, generator, dev)
            bg = torch.where(replace[image_of_ray, None], colors[image_of_ray], bg)
        return bg

    # ------------------------------------------------------------------------------------------
    # Rendering
    # ------------------------------------------------------------------------------------------
    def render(self, cameras: CameraBatch, step: int = 0, generator: Optional[torch.Generator] = None,
               training: bool = True) -> RenderOutput:
        """Render ``cameras`` (see the module docstring for the outputs and randomness).

        Under ``torch.no_grad()`` the rays are processed in chunks of about ``chunk_points``
        samples, so evaluation renders of any size run in bounded memory; with autograd on, the
        whole batch is one pass.
        """
        dev = self.encoding.embeddings.device
        cameras = cameras.to(dev)
        B, H, W = len(cameras), cameras.height, cameras.width
        n_rays = B * H * W
        if training:
            self._set_grid_levels(step)

        # Random draws in a fixed order: shading mode, background, sample jitter.
        if training:
            self._step = int(step)  # the blob of this step (evaluation renders keep the last one)
        mode = self._draw_shading(step, training, generator)
        lam_orient = float(scheduled(self._lambda_orient, step, "lambda_orient") or 0.0)
        lam_smooth = float(scheduled(self._lambda_albedo_smooth, step, "lambda_albedo_smooth") or 0.0)
        lam_nsmooth = float(scheduled(self._lambda_normal_smooth, step, "lambda_normal_smooth") or 0.0)
        lam_n3 = float(scheduled(self._lambda_normal_smooth_3d, step, "lambda_normal_smooth_3d") or 0.0)
        per_sample_shading = mode != "albedo" and self.shading_point == "samples"
        need_normals = ((not training) or per_sample_shading or lam_orient > 0 or lam_nsmooth > 0 or lam_n3 > 0
                        or self.render_normals)
        create_graph = training and torch.is_grad_enabled()
        n3_on = create_graph and lam_n3 > 0

        rays_o, rays_d = cameras.rays()
        rays_o, rays_d = rays_o.reshape(n_rays, 3), rays_d.reshape(n_rays, 3)
        image_of_ray = torch.arange(B, device=dev).repeat_interleave(H * W)
        lights = (cameras.light_positions if training else cameras.positions)[image_of_ray]
        far_ref = far_distance(cameras.positions, self.radius)[image_of_ray]
        bg = self._background(rays_d, image_of_ray, B, training, generator)

        S = self.num_samples
        if self.use_occupancy_grid:
            def march(o, d, light, b):
                return self._render_occupancy_grid(o, d, light, b, mode, need_normals, create_graph, training,
                                                   training and torch.is_grad_enabled() and lam_smooth > 0, n3_on)
            per_ray = (rays_o, rays_d, lights, bg)
        else:
            if training:
                jitter = torch.rand(n_rays, S, generator=generator).to(dev)
            else:
                jitter = torch.full((n_rays, S), 0.5, device=dev)

            smooth_on = training and torch.is_grad_enabled() and lam_smooth > 0

            def march(o, d, light, b, u, *noise):
                u_smooth = noise[0] if smooth_on else None
                u_n3 = noise[-1] if n3_on else None
                return self._render_fixed(o, d, light, b, u, mode, need_normals, create_graph, u_smooth, u_n3)
            per_ray = (rays_o, rays_d, lights, bg, jitter)
            if smooth_on:  # drawn after the jitter
                per_ray += (torch.randn(n_rays, S, 3, generator=generator).to(dev),)
            if n3_on:  # drawn after the albedo term's
                per_ray += (torch.randn(n_rays, S, 3, generator=generator).to(dev),)
        if torch.is_grad_enabled():
            res = march(*per_ray)
        else:  # evaluation renders of any size: bounded memory
            per_chunk = max(1, self.chunk_points // S)
            parts = [march(*args) for args in zip(*(t.split(per_chunk) for t in per_ray))]
            res = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}

        def image(v: torch.Tensor) -> torch.Tensor:  # [n_rays, C] -> [B, C, H, W]
            return v.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()

        alpha = res["alpha"]
        depth = normalized_depth(res["depth_sum"], alpha, far_ref[:, None])
        out = RenderOutput(rgb=image(res["rgb"]).clamp(0.0, 1.0), alpha=image(alpha.clamp(0.0, 1.0)),
                           depth=image(depth))
        if "normal_sum" in res:
            out.normal = image(((res["normal_sum"] + 1.0) * 0.5).clamp(0.0, 1.0))
            out.extras["orient"] = res["orient"]
        for key in ("albedo_smooth", "normal_smooth_3d"):
            if key in res:
                out.extras[key] = res[key]
        return out

    def _shade_surface(self, albedo_sum: torch.Tensor, alpha: torch.Tensor, rays_o: torch.Tensor,
                       rays_d: torch.Tensor, t_s: torch.Tensor, hit: torch.Tensor, lights: torch.Tensor,
                       mode: str, create_graph: bool) -> torch.Tensor:
        """``shading_point=surface``: the composited albedo ``albedo_sum [R,3]`` (opacity ``alpha
        [R,1]``) shaded once per ray with the normal at depth ``t_s [R]`` (rays with ``hit``; the
        others carry less than the threshold's weight and keep the ambient term), lit from
        ``lights [R,3]``: the foreground color ``[R,3]``, before the background."""
        x_s = rays_o + rays_d * t_s[:, None]
        normal = x_s.new_zeros(x_s.shape)
        sel = hit.nonzero().squeeze(1)
        if sel.numel():
            normal = normal.index_put((sel,), self._normals(x_s[sel], create_graph))
        factor = self._shade(torch.ones_like(x_s), normal, x_s, lights, "textureless")[:, :1]
        return (albedo_sum if mode == "diffuse" else alpha) * factor

    def _render_fixed(self, rays_o, rays_d, lights, bg, jitter, mode: str, need_normals: bool,
                      create_graph: bool, smooth_noise: Optional[torch.Tensor] = None,
                      normal_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Fixed stratified samples on ``[rays, samples]`` tensors (any device). ``smooth_noise`` /
        ``normal_noise [rays, samples, 3]``: unit normal draws for the albedo / 3D normal smoothness
        terms (None: no term)."""
        R, S = jitter.shape
        near, far, _ = ray_box_intersect(rays_o, rays_d, self.radius)
        edges = torch.linspace(0.0, 1.0, S + 1, device=rays_o.device)
        edges = near[:, None] + (far - near)[:, None] * edges  # [R, S+1]
        t_starts, t_ends = edges[:, :-1], edges[:, 1:]
        t = t_starts + (t_ends - t_starts) * jitter  # [R, S] sample positions
        x = (rays_o[:, None, :] + rays_d[:, None, :] * t[..., None]).reshape(R * S, 3)

        if self.skip_grid_resolution <= 0:
            sigma, albedo = self._field(x)
        else:  # empty-space skipping: the refreshed training grid, or a fresh one without autograd
            grid = self.train_skip_grid if torch.is_grad_enabled() else self.skip_grid()
            G = grid.shape[0]
            cell = ((x + self.radius) / (2 * self.radius) * G).long().clamp(0, G - 1)
            keep = grid[cell[:, 0], cell[:, 1], cell[:, 2]].nonzero().squeeze(1)
            sigma_k, albedo_k = self._field(x[keep])
            sigma = x.new_zeros(R * S).index_put((keep,), sigma_k)
            albedo = x.new_zeros(R * S, 3).index_put((keep,), albedo_k)
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigma.view(R, S))

        res: Dict[str, torch.Tensor] = {}
        if smooth_noise is not None:
            # Albedo smoothness at the samples that matter (same threshold as the normals).
            sel = (weights.detach().reshape(-1) > self.normal_weight_threshold).nonzero().squeeze(1)
            shifted = x[sel] + self.albedo_smooth_eps * smooth_noise.reshape(R * S, 3)[sel]
            d2 = (albedo[sel] - self._field(shifted)[1]).square().sum(dim=-1)
            per_sample = x.new_zeros(R * S).index_put((sel,), d2)
            res["albedo_smooth"] = (weights.detach() * per_sample.view(R, S)).sum(dim=-1)
        normal = None
        if need_normals:
            # Normals where the weight matters; elsewhere zero (their pixels change by < threshold).
            sel = (weights.detach().reshape(-1) > self.normal_weight_threshold).nonzero().squeeze(1)
            n_sel = self._normals(x[sel], create_graph)
            normal = x.new_zeros(R * S, 3).index_put((sel,), n_sel)
            normal_rs = normal.view(R, S, 3)
            res["normal_sum"] = nerfacc.accumulate_along_rays(weights, normal_rs)
            cos = (normal_rs * rays_d[:, None, :]).sum(dim=-1).clamp_min(0.0)
            res["orient"] = (weights.detach() * cos.square()).sum(dim=-1)
            if normal_noise is not None:
                shifted = x[sel] + self.normal_smooth_eps * normal_noise.reshape(R * S, 3)[sel]
                d2 = (n_sel - self._normals(shifted, create_graph)).square().sum(dim=-1)
                per_sample = x.new_zeros(R * S).index_put((sel,), d2)
                res["normal_smooth_3d"] = (weights.detach() * per_sample.view(R, S)).sum(dim=-1)

        alpha = nerfacc.accumulate_along_rays(weights, None)
        if self.shading_point == "surface" and mode != "albedo":
            rays = torch.arange(R, device=x.device).repeat_interleave(S)
            t_s, hit = median_depth(weights.reshape(-1), t_starts.reshape(-1), t_ends.reshape(-1), rays, R)
            rgb = self._shade_surface(nerfacc.accumulate_along_rays(weights, albedo.view(R, S, 3)), alpha,
                                      rays_o, rays_d, t_s, hit, lights, mode, create_graph)
        else:
            light = lights[:, None, :].expand(R, S, 3).reshape(R * S, 3)
            rgb_samples = self._shade(albedo, normal, x, light, mode).view(R, S, 3)
            rgb = nerfacc.accumulate_along_rays(weights, rgb_samples)
        res["depth_sum"] = nerfacc.accumulate_along_rays(weights, t[..., None])
        res["rgb"] = rgb + (1.0 - alpha) * bg
        res["alpha"] = alpha
        return res

    # -- CUDA back end (nerfacc occupancy grid). Not runnable on CPU: traverse_grids is CUDA-only.
    def _render_occupancy_grid(self, rays_o, rays_d, lights, bg, mode: str, need_normals: bool,
                               create_graph: bool, training: bool, albedo_smooth: bool = False,
                               normal_smooth_3d: bool = False) -> Dict[str, torch.Tensor]:
        n_rays = rays_o.shape[0]

        def sigma_fn(t_starts, t_ends, ray_indices):
            t_mid = ((t_starts + t_ends) * 0.5)[:, None]
            return self._field(rays_o[ray_indices] + rays_d[ray_indices] * t_mid)[0]

        ray_indices, t_starts, t_ends = self.estimator.sampling(
            rays_o, rays_d, sigma_fn=sigma_fn, near_plane=0.0, far_plane=1e10,
            render_step_size=self.render_step_size, stratified=training, alpha_thre=0.0)

        cache: Dict[str, torch.Tensor] = {}

        def rgb_sigma_fn(t_starts, t_ends, ray_indices):
            t_mid = ((t_starts + t_ends) * 0.5)[:, None]
            x = rays_o[ray_indices] + rays_d[ray_indices] * t_mid
            if need_normals:
                sigma, albedo, normal = self._field_and_normals(x, create_graph)
                cache["normal"] = normal
            else:
                sigma, albedo = self._field(x)
                normal = None
            cache["x"], cache["albedo"] = x, albedo
            return self._shade(albedo, normal, x, lights[ray_indices], sample_mode), sigma

        surface = self.shading_point == "surface" and mode != "albedo"
        sample_mode = "albedo" if surface else mode  # surface: composite the albedo, shade per ray below
        rgb, alpha, _, extras = nerfacc.rendering(
            t_starts, t_ends, ray_indices, n_rays=n_rays, rgb_sigma_fn=rgb_sigma_fn,
            render_bkgd=None if surface else bg)
        weights = extras["weights"]
        if surface:
            t_s, hit = median_depth(weights, t_starts, t_ends, ray_indices, n_rays)
            rgb = self._shade_surface(rgb, alpha, rays_o, rays_d, t_s, hit, lights, mode, create_graph)
            rgb = rgb + (1.0 - alpha) * bg
        t_mid = ((t_starts + t_ends) * 0.5)[:, None]
        res = {"rgb": rgb, "alpha": alpha,
               "depth_sum": nerfacc.accumulate_along_rays(weights, t_mid, ray_indices, n_rays)}
        if need_normals:
            normal = cache.get("normal", torch.zeros(0, 3, device=rays_o.device))
            res["normal_sum"] = nerfacc.accumulate_along_rays(weights, normal, ray_indices, n_rays)
            cos = (normal * rays_d[ray_indices]).sum(dim=-1).clamp_min(0.0)
            res["orient"] = nerfacc.accumulate_along_rays(
                weights.detach(), cos.square()[:, None], ray_indices, n_rays)[:, 0]
        if albedo_smooth and "x" in cache:  # the perturbation from torch's global CUDA RNG, as nerfacc's jitter
            x = cache["x"]
            shifted = x + self.albedo_smooth_eps * torch.randn_like(x)
            d2 = (cache["albedo"] - self._field(shifted)[1]).square().sum(dim=-1)
            res["albedo_smooth"] = nerfacc.accumulate_along_rays(weights.detach(), d2[:, None], ray_indices, n_rays)[:, 0]
        if normal_smooth_3d and "x" in cache and "normal" in cache:  # the same RNG as the albedo term
            x = cache["x"]
            shifted = x + self.normal_smooth_eps * torch.randn_like(x)
            d2 = (cache["normal"] - self._normals(shifted, create_graph)).square().sum(dim=-1)
            res["normal_smooth_3d"] = nerfacc.accumulate_along_rays(weights.detach(), d2[:, None], ray_indices,
                                                                    n_rays)[:, 0]
        return res

    def _set_grid_levels(self, step: int) -> None:
        """The hash grid's active levels at ``step`` (``grid_levels``; all when it is null)."""
        if self._grid_levels is None:
            self.encoding.set_active_levels(None)
            return
        k = scheduled_int(self._grid_levels, step, "representation.nerf.grid_levels")
        self.encoding.set_active_levels(min(max(int(k), 1), self.encoding.n_levels))  # type: ignore[arg-type]

    def update(self, step: int, optimizer=None) -> None:
        """After the optimizer step: refresh the fixed-sample path's skip grid every
        ``skip_refresh_every`` steps, or the occupancy grid on the CUDA back end (every 16
        steps, EMA of density * step). The grid levels move on to the next step's (what the grids
        and the renders until the next training step see)."""
        self._set_grid_levels(step + 1)
        self._step = int(step) + 1  # the field now holds step + 1 steps of training: its blob
        if not self.use_occupancy_grid:
            if self.skip_grid_resolution > 0 and step % max(self.skip_refresh_every, 1) == 0:
                self.train_skip_grid.copy_(self._compute_skip_grid())
            return
        self.estimator.train()  # nerfacc refuses to update an estimator in eval mode
        self.estimator.update_every_n_steps(
            step=step,
            occ_eval_fn=lambda x: self.density(x) * self.render_step_size,
            occ_thre=self.occupancy_threshold,
        )

    # ------------------------------------------------------------------------------------------
    # Losses and optimizer groups
    # ------------------------------------------------------------------------------------------
    def regularizers(self, out: RenderOutput, step: int) -> Dict[str, torch.Tensor]:
        """Weighted terms (zero weights are left out):

        * ``orient``: ``lambda_orient * mean_rays sum_i stopgrad(w_i) relu(n_i . d)^2``
          (DreamFusion: a visible surface faces the camera, ``n . d < 0``; the weights are held
          fixed as in the reference implementations, so the term turns normals instead of
          removing density). Needs a render that computed normals.
        * ``sparsity``: ``lambda_sparsity * mean sqrt(alpha^2 + 0.01)``.
        * ``opaque``: ``lambda_opaque * mean binary_entropy(alpha)``.
        * ``transmittance``: ``lambda_transmittance * mean_images -min(target, mean_pixels(1 - alpha))``
          (Dream Fields, Jain et al. 2022).
        * ``albedo_smooth``: ``lambda_albedo_smooth * mean_rays sum_i stopgrad(w_i)
          |albedo(x_i) - albedo(x_i + eps * z_i)|^2`` (Fantasia3D's kd smoothness); needs a
          training render with the term on.
        * ``normal_smooth``: ``lambda_normal_smooth * (mean (N[:, :, 1:] - N[:, :, :-1])^2 +
          mean (N[:, :, :, 1:] - N[:, :, :, :-1])^2)`` on the normal map ``N = out.normal``.
        * ``normal_smooth_3d``: ``lambda_normal_smooth_3d * mean_rays sum_i stopgrad(w_i)
          |n(x_i) - n(x_i + eps * z_i)|^2``; needs a training render with the term on.
        """
        terms: Dict[str, torch.Tensor] = {}
        w = float(scheduled(self._lambda_orient, step, "lambda_orient") or 0.0)
        if w != 0.0 and "orient" in out.extras:
            terms["orient"] = w * out.extras["orient"].mean()
        w = float(scheduled(self._lambda_sparsity, step, "lambda_sparsity") or 0.0)
        if w != 0.0:
            terms["sparsity"] = w * torch.sqrt(out.alpha.square() + 0.01).mean()
        w = float(scheduled(self._lambda_opaque, step, "lambda_opaque") or 0.0)
        if w != 0.0:
            a = out.alpha.clamp(1e-5, 1.0 - 1e-5)
            terms["opaque"] = w * (-(a * torch.log(a) + (1.0 - a) * torch.log(1.0 - a))).mean()
        terms.update(transmittance_term(out, step, self._lambda_transmittance, self._transmittance_target))
        w = float(scheduled(self._lambda_albedo_smooth, step, "lambda_albedo_smooth") or 0.0)
        if w != 0.0 and "albedo_smooth" in out.extras:
            terms["albedo_smooth"] = w * out.extras["albedo_smooth"].mean()
        w = float(scheduled(self._lambda_normal_smooth, step, "lambda_normal_smooth") or 0.0)
        if w != 0.0 and out.normal is not None:
            n = out.normal
            terms["normal_smooth"] = w * ((n[:, :, 1:] - n[:, :, :-1]).square().mean()
                                          + (n[:, :, :, 1:] - n[:, :, :, :-1]).square().mean())
        w = float(scheduled(self._lambda_normal_smooth_3d, step, "lambda_normal_smooth_3d") or 0.0)
        if w != 0.0 and "normal_smooth_3d" in out.extras:
            terms["normal_smooth_3d"] = w * out.extras["normal_smooth_3d"].mean()
        return terms

    def param_groups(self, optim_cfg) -> List[dict]:
        groups = [
            {"params": list(self.encoding.parameters()), "name": "encoding", "lr_scale": 1.0},
            {"params": list(self.mlp.parameters()), "name": "mlp", "lr_scale": float(optim_cfg.lr_scale_mlp)},
        ]
        if self.background_mlp is not None:
            groups.append({"params": list(self.background_mlp.parameters()), "name": "background",
                           "lr_scale": float(optim_cfg.lr_scale_background)})
        return groups

    # ------------------------------------------------------------------------------------------
    # Evaluation (see Representation)
    # ------------------------------------------------------------------------------------------
    def evaluation_ambient(self) -> Optional[float]:
        """Evaluation renders are diffuse with the light at the camera, ambient ``ambient_light``."""
        return self.ambient_light

    @torch.no_grad()
    def evaluation_background(self, cameras: CameraBatch) -> torch.Tensor:
        """White, black, or the background MLP's color along each pixel's ray (``[B,3,H,W]``, CPU)."""
        B, H, W = len(cameras), cameras.height, cameras.width
        if self.background_mode == "black":
            return torch.zeros(B, 3, H, W)
        if self.background_mode != "mlp":
            return torch.ones(B, 3, H, W)
        _, d = cameras.rays()
        dev = next(self.parameters()).device
        d = d.reshape(-1, 3).to(dev)
        image_of_ray = torch.arange(B, device=dev).repeat_interleave(H * W)
        bg = self._background(d, image_of_ray, B, False, None).float().cpu()
        return bg.reshape(B, H, W, 3).permute(0, 3, 1, 2)
