"""Cameras: one convention for the whole project.

Convention
----------
* World: right-handed, **+Z is up**. The object sits at the origin inside ``[-r, r]^3``.
  Its **front faces +X**: azimuth 0 deg looks at the front, azimuth 90 deg at its left side
  (the camera on +Y), +-180 deg at its back. Elevation is the angle above the XY plane.
* Camera position for (elevation e, azimuth a, distance d):
  ``d * (cos e cos a, cos e sin a, sin e)``; cameras always look at the origin.
* ``c2w`` is a camera-to-world 4x4 in the **OpenGL** camera convention: camera +X right,
  +Y up, looking along **-Z**. Pixel (i, j) (row i from the top, column j from the left) has
  its centre at ``((j + 0.5) - W/2, H/2 - (i + 0.5))`` in pixel units on the image plane at
  focal length ``f = (H/2) / tan(fovy/2)``; square pixels.
* Renderers convert at their boundary (gsplat wants world-to-camera OpenCV views:
  :meth:`CameraBatch.w2c_opencv`). Mesh exports convert Z-up to the Y-up of glTF/OBJ/PLY viewers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch

from threedistill.devices import to_device
from threedistill.errors import UserError
from threedistill.groups import (Scheduled, check_bounds, check_range, check_whole_schedule, max_scheduled,
                                plain_schedule, scheduled_int)

VIEW_LABELS = ("front", "side", "back", "overhead")


#: Bounds of the ``camera`` numbers: a batch of at most 64 renders (DreamFusion uses 1-4; each
#: render is a prior call), angles in degrees within a half turn, distances within the
#: ranges' own limits.
CAMERA_BOUNDS = {"batch_size": (1, 64), "light_position_perturb": (0.0, 1000.0), "front_threshold": (0.0, 180.0),
                 "back_threshold": (0.0, 180.0), "overhead_threshold": (-90.0, 90.0), "eval_distance": (1e-3, 1000.0),
                 "eval_fovy": (1.0, 179.0), "eval_elevation": (-90.0, 90.0)}


@dataclass
class CameraConfig:
    """The ``camera`` config group: the ranges :class:`CameraSampler` draws training cameras from,
    the view-label thresholds, and the evaluation / preview / turntable camera."""

    # Views rendered per step (the guidance loss is their mean). A number or a schedule
    # (threedistill/groups.py), e.g. [[0, 1], [500, 4]] for 1 view, then 4 from step 500
    # (LucidDreamer trains with 4 views per step); a linear ramp is rounded down to whole views.
    batch_size: Scheduled = 1
    elevation_range: List[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: List[float] = field(default_factory=lambda: [1.5, 2.0])
    fovy_range: List[float] = field(default_factory=lambda: [40.0, 70.0])
    # Point light sampled around the camera direction at this distance from the origin.
    light_distance_range: List[float] = field(default_factory=lambda: [0.8, 1.5])
    light_position_perturb: float = 1.0
    # View labels (degrees): |azimuth| < front => front, |azimuth| > 180 - back => back,
    # elevation > overhead => overhead, otherwise side.
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    # Evaluation / preview / turntable cameras.
    eval_distance: float = 1.75
    eval_fovy: float = 55.0
    eval_elevation: float = 15.0

    def validate(self, key: str = "camera") -> None:
        """One-line :class:`~threedistill.errors.UserError` naming the key of a bad value (``key``: this
        group's path in the whole config). Also called unbound on a structured config node:
        ``CameraConfig.validate(cfg.camera, "camera")``."""
        check_whole_schedule(self.batch_size, f"{key}.batch_size", lo=1)
        check_bounds(self, key, CAMERA_BOUNDS)
        check_range(self.elevation_range, f"{key}.elevation_range", -90.0, 90.0)
        check_range(self.azimuth_range, f"{key}.azimuth_range", -360.0, 360.0)
        check_range(self.distance_range, f"{key}.distance_range", 1e-3, 1e3)
        check_range(self.fovy_range, f"{key}.fovy_range", 1.0, 179.0)
        check_range(self.light_distance_range, f"{key}.light_distance_range", 0.0, 1e3)
        if float(self.front_threshold) + float(self.back_threshold) > 180.0:
            # Overlapping front and back sectors: a camera would be both (front would win silently).
            raise UserError(f"config keys '{key}.front_threshold' + '{key}.back_threshold' must be at most 180 "
                            f"degrees (the front and back sectors would overlap), got {self.front_threshold} + "
                            f"{self.back_threshold}")


@dataclass
class CameraBatch:
    """A batch of B pinhole cameras looking at the origin (see module docstring).

    Shapes: ``c2w [B,4,4]``, ``fovy [B]`` (radians), ``elevation/azimuth [B]`` (degrees),
    ``distance [B]``, ``light_positions [B,3]`` (world). ``height``/``width`` in pixels.
    """

    c2w: torch.Tensor
    fovy: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor
    light_positions: torch.Tensor
    height: int
    width: int
    #: ``(elevation, azimuth)`` still on the CPU after :meth:`to` moved the batch off it: the view
    #: labels are read from these (reading the device's copies would wait for the device every step).
    host_angles: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def positions(self) -> torch.Tensor:
        """Camera centres in world space ``[B,3]``."""
        return self.c2w[:, :3, 3]

    @property
    def focal(self) -> torch.Tensor:
        """Focal length in pixels ``[B]`` (same for x and y)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    def to(self, device: torch.device | str) -> "CameraBatch":
        host = (self.elevation, self.azimuth) if self.elevation.device.type == "cpu" else self.host_angles
        return replace(
            self,
            **{k: to_device(getattr(self, k), device) for k in
               ("c2w", "fovy", "elevation", "azimuth", "distance", "light_positions")},
            host_angles=host,
        )

    def __getitem__(self, idx) -> "CameraBatch":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return replace(
            self,
            **{k: getattr(self, k)[idx] for k in
               ("c2w", "fovy", "elevation", "azimuth", "distance", "light_positions")},
            host_angles=None if self.host_angles is None else (self.host_angles[0][idx], self.host_angles[1][idx]),
        )

    def intrinsics(self) -> torch.Tensor:
        """OpenCV-style intrinsics ``K [B,3,3]`` (pixel centres at +0.5)."""
        B = len(self)
        K = torch.zeros(B, 3, 3, device=self.device, dtype=self.c2w.dtype)
        K[:, 0, 0] = self.focal
        K[:, 1, 1] = self.focal
        K[:, 0, 2] = self.width / 2
        K[:, 1, 2] = self.height / 2
        K[:, 2, 2] = 1
        return K

    def w2c_opencv(self) -> torch.Tensor:
        """World-to-camera ``[B,4,4]`` in OpenCV convention (+X right, +Y down, looking +Z)."""
        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=self.device, dtype=self.c2w.dtype))
        return torch.linalg.inv(self.c2w @ flip)

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space ray origins and unit directions, each ``[B,H,W,3]``."""
        B, H, W = len(self), self.height, self.width
        dev, dt = self.device, self.c2w.dtype
        j = torch.arange(W, device=dev, dtype=dt) + 0.5
        i = torch.arange(H, device=dev, dtype=dt) + 0.5
        ii, jj = torch.meshgrid(i, j, indexing="ij")  # [H,W]
        f = self.focal.view(B, 1, 1)
        x = (jj[None] - W / 2) / f
        y = (H / 2 - ii[None]) / f
        d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B,H,W,3]
        d_world = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], d_cam)
        d_world = d_world / d_world.norm(dim=-1, keepdim=True)
        o_world = self.c2w[:, None, None, :3, 3].expand_as(d_world)
        return o_world, d_world

    def angles_on_host(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(elevation, azimuth)`` on the CPU without reading the device (the copy kept when the
        batch moved to a GPU): for per-step view decisions."""
        return self.host_angles or (self.elevation, self.azimuth)

    def view_labels(
        self, front_threshold: float = 45.0, back_threshold: float = 45.0, overhead_threshold: float = 60.0
    ) -> List[str]:
        return view_labels(*self.angles_on_host(), front_threshold, back_threshold, overhead_threshold)


def view_labels(
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> List[str]:
    """front / side / back / overhead per camera (degrees; overhead wins over the azimuth)."""
    labels = []
    for e, a in zip(elevation.tolist(), azimuth.tolist()):
        a = (a + 180.0) % 360.0 - 180.0  # wrap to [-180, 180)
        if e > overhead_threshold:
            labels.append("overhead")
        elif abs(a) < front_threshold:
            labels.append("front")
        elif abs(a) > 180.0 - back_threshold:
            labels.append("back")
        else:
            labels.append("side")
    return labels


def wrap_azimuth(azimuth: torch.Tensor) -> torch.Tensor:
    """Azimuth in degrees wrapped to ``[-180, 180)``."""
    return (azimuth + 180.0) % 360.0 - 180.0


def view_weights(
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
    interpolated: bool = False,
) -> torch.Tensor:
    """Weights ``[B, 4]`` of the view prompts :data:`VIEW_LABELS` (front, side, back, overhead) per
    camera, each row summing to 1.

    ``interpolated=False``: one-hot of :func:`view_labels` (the thresholds decide).
    ``interpolated=True`` (nerfstudio Generfacto's ``positional_prompting: interpolated``): linear in
    azimuth between the anchors front (0 deg), side (+-90 deg) and back (180 deg), so front/side for
    ``|a| < 90`` and side/back for ``|a| >= 90``; at the anchors the row is exactly one-hot. Cameras
    above ``overhead_threshold`` keep the overhead label (one-hot) as in the discrete mode; the
    front/back thresholds do not enter the blend (it has no plateaus)."""
    elevation = elevation.detach().float().reshape(-1).cpu()
    azimuth = azimuth.detach().float().reshape(-1).cpu()
    B = azimuth.shape[0]
    w = torch.zeros(B, len(VIEW_LABELS), dtype=torch.float32)
    if not interpolated:
        labels = view_labels(elevation, azimuth, front_threshold, back_threshold, overhead_threshold)
        for i, lab in enumerate(labels):
            w[i, VIEW_LABELS.index(lab)] = 1.0
        return w
    a = wrap_azimuth(azimuth).abs()  # [0, 180]
    near = a < 90.0
    r_front = (1.0 - a / 90.0).clamp(0.0, 1.0)  # 1 at the front, 0 at the side
    r_back = (a / 90.0 - 1.0).clamp(0.0, 1.0)  # 0 at the side, 1 at the back
    w[:, 0] = torch.where(near, r_front, torch.zeros_like(a))
    w[:, 1] = torch.where(near, 1.0 - r_front, 1.0 - r_back)
    w[:, 2] = torch.where(near, torch.zeros_like(a), r_back)
    over = elevation > overhead_threshold
    w[over] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return w


def look_at_c2w(positions: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OpenGL camera-to-world matrices ``[B,4,4]`` for cameras at ``positions [B,3]`` looking at
    ``target`` (default origin) with world +Z up. Straight-overhead cameras use +X as image-up."""
    B = positions.shape[0]
    if target is None:
        target = torch.zeros_like(positions)
    forward = target - positions
    forward = forward / forward.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], device=positions.device, dtype=positions.dtype).expand(B, 3)
    right = torch.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        alt = torch.tensor([1.0, 0.0, 0.0], device=positions.device, dtype=positions.dtype).expand(B, 3)
        right = torch.where(degenerate[:, None], torch.cross(forward, alt, dim=-1), right)
    right = right / right.norm(dim=-1, keepdim=True)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, device=positions.device, dtype=positions.dtype).repeat(B, 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = positions
    return c2w


def spherical_to_position(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    e = torch.deg2rad(elevation_deg)
    a = torch.deg2rad(azimuth_deg)
    return torch.stack([distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a),
                        distance * torch.sin(e)], dim=-1)


def make_cameras(
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    distance: torch.Tensor,
    fovy_deg: torch.Tensor,
    height: int,
    width: Optional[int] = None,
    light_positions: Optional[torch.Tensor] = None,
) -> CameraBatch:
    """Cameras from spherical coordinates (degrees). The light defaults to the camera position."""
    elevation, azimuth, distance, fovy_deg = (torch.as_tensor(x, dtype=torch.float32).reshape(-1)
                                              for x in (elevation, azimuth, distance, fovy_deg))
    pos = spherical_to_position(elevation, azimuth, distance)
    c2w = look_at_c2w(pos)
    if light_positions is None:
        light_positions = pos.clone()
    return CameraBatch(
        c2w=c2w, fovy=torch.deg2rad(fovy_deg), elevation=elevation, azimuth=azimuth, distance=distance,
        light_positions=light_positions, height=int(height), width=int(width if width is not None else height),
    )


class CameraSampler:
    """Random training cameras with DreamFusion-style ranges (see :class:`CameraConfig`).

    Elevation, azimuth, distance and fovy are uniform in their ranges. The light sits at a
    random distance in ``light_distance_range`` in a direction near the camera's
    (perturbed by ``light_position_perturb``), as in DreamFusion/threestudio.
    Every draw comes from the ``generator`` passed in, so a step is reproducible.
    """

    def __init__(self, cfg, resolution: Scheduled):
        """``resolution``: ``run.resolution``, a number or a schedule (:func:`resolution_at`)."""
        self.cfg = cfg
        self.resolution_schedule = plain_schedule(resolution)
        self.resolution = max_resolution(resolution)  # the largest render it makes

    def sample(self, generator: torch.Generator, batch_size: Optional[int] = None, step: int = 0) -> CameraBatch:
        """Cameras of ``step`` (its resolution and, unless ``batch_size`` is given, its number of
        views), drawn from ``generator``."""
        c = self.cfg
        B = int(batch_size or batch_size_at(c.batch_size, step))
        size = resolution_at(self.resolution_schedule, step)

        def uniform(lo_hi: Sequence[float]) -> torch.Tensor:
            lo, hi = float(lo_hi[0]), float(lo_hi[1])
            return lo + (hi - lo) * torch.rand(B, generator=generator)

        elevation = uniform(c.elevation_range)
        azimuth = uniform(c.azimuth_range)
        distance = uniform(c.distance_range)
        fovy = uniform(c.fovy_range)
        pos = spherical_to_position(elevation, azimuth, distance)
        light_dir = pos / pos.norm(dim=-1, keepdim=True)
        light_dir = light_dir + c.light_position_perturb * 0.5 * torch.randn(B, 3, generator=generator)
        light_dir = light_dir / light_dir.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        light_positions = light_dir * uniform(c.light_distance_range)[:, None]
        return make_cameras(elevation, azimuth, distance, fovy, size, light_positions=light_positions)


#: A linear ``run.resolution`` ramp renders at multiples of this many pixels between its end values
#: (the renderers take any size; fewer distinct sizes keep the prior's resize and any compiled
#: kernels from seeing every integer; Stable Diffusion's VAE works on multiples of 8).
RESOLUTION_MULTIPLE = 8


def resolution_at(resolution: Scheduled, step: int) -> int:
    """``run.resolution`` (a number or a schedule) at ``step``, in pixels: the given values as they
    are; inside a linear ramp rounded down to a multiple of :data:`RESOLUTION_MULTIPLE`."""
    return int(scheduled_int(resolution, step, "run.resolution", multiple=RESOLUTION_MULTIPLE))  # type: ignore[arg-type]


def max_resolution(resolution: Scheduled) -> int:
    """The largest render ``run.resolution`` asks for at any step (for previews and memory)."""
    return int(round(max_scheduled(resolution, "run.resolution")))  # type: ignore[arg-type]


def batch_size_at(batch_size: Scheduled, step: int) -> int:
    """``camera.batch_size`` (a number or a schedule) at ``step``: whole views."""
    return int(scheduled_int(batch_size, step, "camera.batch_size"))  # type: ignore[arg-type]


def orbit_cameras(
    n: int,
    resolution: int,
    elevation: float = 15.0,
    distance: float = 1.75,
    fovy: float = 55.0,
    start_azimuth: float = 0.0,
) -> CameraBatch:
    """``n`` cameras evenly spaced in azimuth on one circle (a turntable), light at the camera."""
    az = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    az = (az + 180.0) % 360.0 - 180.0
    return make_cameras(torch.full((n,), float(elevation)), az, torch.full((n,), float(distance)),
                        torch.full((n,), float(fovy)), resolution)


def preview_cameras(resolution: int, distance: float = 1.75, fovy: float = 55.0, elevation: float = 15.0) -> CameraBatch:
    """Four fixed views for previews: front, side (left), back, overhead."""
    return make_cameras(
        torch.tensor([elevation, elevation, elevation, 75.0]), torch.tensor([0.0, 90.0, 180.0, 0.0]),
        torch.full((4,), float(distance)), torch.full((4,), float(fovy)), resolution,
    )


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): draws made from it are the same
    whether a run is resumed or not. Streams separate consumers (cameras, guidance, renderer)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + int(stream) * 104_729) % (2**63 - 1))
    return g


STREAM_CAMERAS, STREAM_GUIDANCE, STREAM_RENDER, STREAM_DENSIFY = 0, 1, 2, 3
