"""The refine stage's starting surface at the level the render shows (threedistill/export/mesh.py
``silhouette_threshold``, ``extract_mesh(match_cameras=...)``; threedistill/inputs.py
``matching_cameras``), checked against a density field whose rendered silhouette is known in
closed form."""

import math

import numpy as np
import pytest
import torch

from threedistill.cameras import CameraConfig
from threedistill.errors import UserError
from threedistill.export.mesh import extract_mesh
from threedistill.inputs import matching_cameras
from threedistill.representations.base import RenderOutput, Representation

A, S = 40.0, 0.15  # peak density and width of the Gaussian blob sigma(x) = A exp(-|x|^2 / (2 S^2))


class Blob(Representation):
    """An analytic Gaussian blob whose renders are computed in closed form (not by any renderer of
    the project): along a ray at distance ``b`` from the centre the optical depth is
    ``A S sqrt(2 pi) exp(-b^2 / (2 S^2))`` (the whole line; the cameras are > 10 S away), and the
    accumulated opacity is ``1 - exp(-depth)``."""

    config_key = "representation.blob"

    def __init__(self, threshold: float = 5.0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.threshold = threshold

    def render(self, cameras, step=0, generator=None, training=True):
        o, d = cameras.rays()  # [B,H,W,3], unit directions
        b2 = (o * o).sum(-1) - (o * d).sum(-1) ** 2
        depth = A * S * math.sqrt(2 * math.pi) * torch.exp(-b2 / (2 * S * S))
        alpha = (1 - torch.exp(-depth))[:, None]
        return RenderOutput(rgb=alpha.expand(-1, 3, -1, -1), alpha=alpha, depth=1 - alpha)

    def regularizers(self, out, step):
        return {}

    def param_groups(self, optim_cfg):
        return []

    def density(self, points):
        return A * torch.exp(-(points * points).sum(-1) / (2 * S * S))

    def albedo(self, points):
        return torch.full_like(points, 0.5)

    @property
    def isosurface_threshold(self):
        return self.threshold


def _radius(mesh) -> float:
    return float(np.linalg.norm(np.asarray(mesh.vertices), axis=1).mean())


def test_the_surface_is_extracted_where_the_rendered_opacity_is_one_half():
    # alpha = 1/2 where the optical depth is ln 2: b*^2 = 2 S^2 ln(A S sqrt(2 pi) / ln 2) (b* ~ 0.372),
    # while the fixed level sigma = 5 sits at r^2 = 2 S^2 ln(A / 5) (r ~ 0.306).
    b_star = math.sqrt(2 * S * S * math.log(A * S * math.sqrt(2 * math.pi) / math.log(2)))
    r_fixed = math.sqrt(2 * S * S * math.log(A / 5.0))
    rep = Blob(threshold=5.0)
    fixed = extract_mesh(rep, resolution=48)
    matched = extract_mesh(rep, resolution=48, match_cameras=matching_cameras(CameraConfig()))
    assert _radius(fixed) == pytest.approx(r_fixed, abs=0.01)
    assert _radius(matched) == pytest.approx(b_star, abs=0.012)
    # A sphere: every vertex at that radius (marching cubes on a 48^3 grid over [-1, 1]^3).
    r = np.linalg.norm(np.asarray(matched.vertices), axis=1)
    assert r.max() - r.min() < 0.03
    # Colors still come from the albedo field.
    assert np.all(np.asarray(matched.visual.vertex_colors)[:, :3] == 128)


def test_an_explicit_threshold_wins_and_an_empty_render_falls_back_to_the_iso_level():
    rep = Blob(threshold=5.0)
    cams = matching_cameras(CameraConfig())
    r_at_1 = math.sqrt(2 * S * S * math.log(A / 1.0))
    assert _radius(extract_mesh(rep, resolution=48, threshold=1.0, match_cameras=cams)) == pytest.approx(r_at_1, abs=0.01)

    class Invisible(Blob):
        def render(self, cameras, step=0, generator=None, training=True):
            out = super().render(cameras)
            return RenderOutput(rgb=out.rgb, alpha=out.alpha * 0, depth=out.depth)

    r_fixed = math.sqrt(2 * S * S * math.log(A / 5.0))
    assert _radius(extract_mesh(Invisible(5.0), resolution=48, match_cameras=cams)) == pytest.approx(r_fixed, abs=0.01)


def test_matching_cameras_follow_the_evaluation_distance_and_fov():
    cams = matching_cameras(CameraConfig(eval_distance=2.5, eval_fovy=40.0))
    assert torch.allclose(cams.positions.norm(dim=-1), torch.full((len(cams),), 2.5), atol=1e-5)
    assert torch.allclose(cams.fovy, torch.full((len(cams),), math.radians(40.0)), atol=1e-6)


def test_init_surface_is_validated():
    from threedistill.config import load_config

    cfg = load_config(None, ["representation.name=mesh"])
    assert cfg.representation.mesh.init_surface == "silhouette"
    with pytest.raises(UserError, match="representation.mesh.init_surface"):
        load_config(None, ["representation.name=mesh", "representation.mesh.init_surface=alpha"])
