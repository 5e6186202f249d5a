"""Exact ground-truth renderer of shapes-world meshes: ray casting against every triangle.

Rays come from :meth:`CameraBatch.rays` (the same pixels the representations render), each is
intersected with every triangle (Moller-Trumbore), and the nearest hit is shaded like the NeRF
shades its samples: ``albedo`` or ``diffuse`` = ``albedo * (ambient + (1 - ambient) * max(0, n . l))``
with ``l`` the unit vector from the hit point to the camera batch's light position and ``n`` the
interpolated vertex normal. Misses show the shapes-world background. The mask is exact (hard, one
ray per pixel, no anti-aliasing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from threedistill.cameras import CameraBatch
from threedistill.shapes.world import BACKGROUND, shape_mesh

_RAY_CHUNK = 1024


@dataclass
class GroundTruth:
    rgb: torch.Tensor  # [B,3,H,W] in [0,1], composited over the background
    mask: torch.Tensor  # [B,1,H,W] 1 where a ray hits the object
    depth: torch.Tensor  # [B,1,H,W] distance along the ray (0 where no hit)
    normal: torch.Tensor  # [B,3,H,W] world normal mapped to [0,1] ((n+1)/2; 0.5 where no hit)


def mesh_tensors(mesh, device: torch.device | str = "cpu"):
    """(vertices [V,3], faces [F,3], vertex normals [V,3]) as float32/long tensors."""
    v = torch.tensor(mesh.vertices, dtype=torch.float32, device=device)
    f = torch.tensor(mesh.faces, dtype=torch.long, device=device)
    n = torch.tensor(mesh.vertex_normals, dtype=torch.float32, device=device)
    return v, f, n


def ray_mesh_hits(rays_o: torch.Tensor, rays_d: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                  eps: float = 1e-9):
    """Nearest intersection of each ray ``[R,3]`` with a triangle mesh.

    Returns ``(t [R], face [R], u [R], v [R])``: distance along the ray (``inf`` for a miss), the hit
    face index (-1 for a miss) and the barycentric coordinates of the hit in that face
    (``p = (1-u-v) v0 + u v1 + v v2``).
    """
    # Only rays that pass within the mesh's bounding sphere can hit it.
    centre = vertices.mean(0)
    radius = (vertices - centre).norm(dim=-1).max() * 1.001
    oc = rays_o - centre
    closest = oc - (oc * rays_d).sum(-1, keepdim=True) * rays_d
    near = (closest.norm(dim=-1) <= radius).nonzero()[:, 0]
    R = rays_o.shape[0]
    t_all = torch.full((R,), float("inf"), device=rays_o.device)
    f_all = torch.full((R,), -1, dtype=torch.long, device=rays_o.device)
    u_all = torch.zeros(R, device=rays_o.device)
    v_all = torch.zeros(R, device=rays_o.device)
    if near.numel() == 0:
        return t_all, f_all, u_all, v_all
    rays_o, rays_d = rays_o[near], rays_d[near]
    v0 = vertices[faces[:, 0]]
    e1 = vertices[faces[:, 1]] - v0
    e2 = vertices[faces[:, 2]] - v0
    ts, fs, us, vs = [], [], [], []
    for start in range(0, rays_o.shape[0], _RAY_CHUNK):
        o = rays_o[start:start + _RAY_CHUNK, None, :]  # [r,1,3]
        d = rays_d[start:start + _RAY_CHUNK, None, :]
        p = torch.cross(d.expand(-1, e2.shape[0], -1), e2[None].expand(d.shape[0], -1, -1), dim=-1)  # [r,F,3]
        det = (e1[None] * p).sum(-1)  # [r,F]
        ok = det.abs() > eps
        inv = 1.0 / torch.where(ok, det, torch.ones_like(det))
        s = o - v0[None]
        u = (s * p).sum(-1) * inv
        q = torch.cross(s, e1[None].expand_as(s), dim=-1)
        v = (d * q).sum(-1) * inv
        t = (e2[None] * q).sum(-1) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
        t = torch.where(hit, t, torch.full_like(t, float("inf")))
        t_min, face = t.min(dim=1)
        face = torch.where(torch.isfinite(t_min), face, torch.full_like(face, -1))
        idx = face.clamp_min(0)[:, None]
        ts.append(t_min)
        fs.append(face)
        us.append(u.gather(1, idx)[:, 0])
        vs.append(v.gather(1, idx)[:, 0])
    t_all[near], f_all[near], u_all[near], v_all[near] = torch.cat(ts), torch.cat(fs), torch.cat(us), torch.cat(vs)
    return t_all, f_all, u_all, v_all


def render_mesh(mesh, albedo: Sequence[float], cameras: CameraBatch, shading: str = "diffuse",
                ambient: float = 0.1, light_positions: Optional[torch.Tensor] = None,
                background: Sequence[float] = BACKGROUND) -> GroundTruth:
    """Render a uniformly colored mesh from ``cameras``; see the module docstring for the model.

    ``shading``: "diffuse" or "albedo". ``light_positions [B,3]`` default to the batch's own
    ``cameras.light_positions`` (the camera position for evaluation cameras).
    """
    if shading not in ("diffuse", "albedo"):
        raise ValueError(f"shading must be 'diffuse' or 'albedo', got {shading!r}")
    dev = cameras.c2w.device
    vertices, faces, vnormals = mesh_tensors(mesh, dev)
    B, H, W = len(cameras), cameras.height, cameras.width
    rays_o, rays_d = cameras.rays()
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    t, face, u, v = ray_mesh_hits(rays_o, rays_d, vertices, faces)
    hit = face >= 0
    fi = faces[face.clamp_min(0)]  # [R,3]
    w = torch.stack([1.0 - u - v, u, v], dim=-1)[..., None]  # [R,3,1]
    normal = F.normalize((vnormals[fi] * w).sum(1), dim=-1)
    t_safe = torch.where(hit, t, torch.zeros_like(t))
    x = rays_o + rays_d * t_safe[:, None]
    base = torch.as_tensor(albedo, dtype=torch.float32, device=dev).expand(x.shape[0], 3)
    if shading == "albedo":
        color = base
    else:
        lights = light_positions if light_positions is not None else cameras.light_positions
        lights = lights.to(dev).repeat_interleave(H * W, dim=0)
        l_dir = F.normalize(lights - x, dim=-1, eps=1e-12)
        lambert = (normal * l_dir).sum(-1, keepdim=True).clamp_min(0.0)
        color = base * (ambient + (1.0 - ambient) * lambert)
    bg = torch.as_tensor(background, dtype=torch.float32, device=dev).expand_as(color)
    hitf = hit[:, None].float()
    rgb = color * hitf + bg * (1.0 - hitf)
    normal_img = torch.where(hit[:, None], (normal + 1.0) / 2.0, torch.full_like(normal, 0.5))

    def image(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()

    return GroundTruth(rgb=image(rgb), mask=image(hitf), depth=image(t_safe[:, None]), normal=image(normal_img))


def render_shape(shape: str, color_or_albedo, cameras: CameraBatch, **kwargs) -> GroundTruth:
    """:func:`render_mesh` of a shapes-world shape; ``color_or_albedo`` is a color name or RGB."""
    from threedistill.shapes.world import COLORS

    albedo = COLORS[color_or_albedo] if isinstance(color_or_albedo, str) else color_or_albedo
    return render_mesh(shape_mesh(shape), albedo, cameras, **kwargs)
