"""benchmarks/growth_force.py's bookkeeping, against losses whose image gradient is known in
closed form: L = 0.5 |image - target|^2 sends -dL/dimage = target - image."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import growth_force as gf  # noqa: E402
from threedistill.shapes.world import COLORS  # noqa: E402


class Towards:
    """L = 0.5 * sum (images - target)^2 with target a constant color (or the white background)."""

    def __init__(self, rgb):
        self.rgb = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images, cameras, step, generator=None):
        return SimpleNamespace(loss=0.5 * (images - self.rgb).square().sum())


def test_a_loss_that_wants_the_object_color_everywhere_grows_and_one_content_with_white_does_not():
    kw = dict(preset="sds-nerf", prompt="a red cube", step=0, scales=[0.8, 1.0], resolution=16, batches=1,
              overrides=[], batch_size=2)
    white = gf.measure(guidance=Towards([1.0, 1.0, 1.0]), **kw)
    red = gf.measure(guidance=Towards(COLORS["red"]), **kw)
    # F(k) = <target - image, render(1.1k) - render(k)> over the pixels growth adds: those pixels are
    # white background, which the white target leaves alone (F = 0) and the red one pulls to red.
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in white["force"].values())
    assert all(v > 0 for v in red["force"].values())
    # Outside the silhouette the image is the white background: the red target pulls every such
    # pixel exactly the whole way to the object's color (push 1 x 1000), the white target not at all.
    assert red["push"]["outer ring"] == pytest.approx(1000.0, rel=1e-5)
    assert red["push"]["far background"] == pytest.approx(1000.0, rel=1e-5)
    assert white["push"]["outer ring"] == pytest.approx(0.0, abs=1e-6)
    # Inside, the shaded pixels are darker than the albedo: both targets brighten them (a push away
    # from the object's colour, measured along albedo - white), the white one far more.
    assert white["push"]["interior"] < red["push"]["interior"] < 0


def test_force_matches_a_direct_computation():
    """F(k) per image equals <target - render(k), render(1.1k) - render(k)> over the pixels the larger
    silhouette adds."""
    from threedistill.cameras import CameraSampler, step_generator
    from threedistill.config import load_config
    from threedistill.shapes.render import render_mesh
    from threedistill.shapes.world import shape_mesh

    target = [0.2, 0.4, 0.6]
    r = gf.measure("sds-nerf", "a red cube", 0, [1.0], 16, 1, [], batch_size=3, guidance=Towards(target))
    cfg = load_config("sds-nerf")
    cams = CameraSampler(cfg.camera, 16).sample(step_generator(0, 0), batch_size=3, step=0)
    amb = float(cfg.representation.nerf.ambient_light)

    def render(k):
        m = shape_mesh("cube").copy()
        m.apply_scale(k)
        return render_mesh(m, COLORS["red"], cams, shading="diffuse", ambient=amb)

    t = torch.tensor(target).view(1, 3, 1, 1)
    small, big = render(1.0), render(1.1)
    grown = big.mask * (1 - small.mask)  # background pixels the larger cube covers
    expected = float(((t - small.rgb) * (big.rgb - small.rgb) * grown).sum()) / 3
    assert expected != 0
    assert r["force"][1.0] == pytest.approx(expected, rel=1e-5)
