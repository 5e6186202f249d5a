"""The shapes world: one colored object per scene, with known ground truth.

Six shapes (sphere, cube, cylinder, cone, torus and a mug whose handle gives it a distinct front
and back) times six colors make 36 prompts of the form ``"a red cube"``. A few (shape, color)
pairs are held out of the prior's training data (:data:`HELD_OUT`) to measure compositional
generalization.

Geometry follows the project's camera convention (:mod:`threedistill.cameras`): world Z is up and
the object's front faces +X. Every object sits centred at the origin inside a sphere of radius
0.5, so it fits the default camera ranges and the NeRF's ``[-1, 1]^3`` bounds. The mug's handle
points to +Y, which is the image's right-hand side in a front view and its left in a back view:
a Janus (two-faced) result shows a handle on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np

SHAPES: Tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "mug")

#: Albedo of each color name (RGB in [0, 1]).
COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.85, 0.12),
    "green": (0.12, 0.68, 0.22),
    "blue": (0.14, 0.32, 0.90),
    "purple": (0.55, 0.20, 0.76),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)

#: Background of every shapes-world image (white), the same as ``representation.nerf.background: white``.
BACKGROUND: Tuple[float, float, float] = (1.0, 1.0, 1.0)

#: (shape, color) pairs the prior never sees in training: one per shape except the mug, whose
#: view consistency is measured on its held-in colors, and every color but one at least once.
HELD_OUT: Tuple[Tuple[str, str], ...] = (
    ("sphere", "purple"),
    ("cube", "yellow"),
    ("cylinder", "blue"),
    ("cone", "green"),
    ("torus", "orange"),
)

#: The object with a distinct front (for the view-consistency score).
FRONTED_SHAPE = "mug"


@dataclass(frozen=True)
class ShapePrompt:
    shape: str
    color: str

    @property
    def text(self) -> str:
        return prompt_for(self.shape, self.color)

    @property
    def held_out(self) -> bool:
        return (self.shape, self.color) in HELD_OUT

    @property
    def albedo(self) -> Tuple[float, float, float]:
        return COLORS[self.color]


def prompt_for(shape: str, color: str) -> str:
    return f"a {color} {shape}"


def all_prompts() -> List[ShapePrompt]:
    """All 36 (shape, color) pairs, shapes-major."""
    return [ShapePrompt(s, c) for s in SHAPES for c in COLOR_NAMES]


def training_prompts() -> List[ShapePrompt]:
    return [p for p in all_prompts() if not p.held_out]


def held_out_prompts() -> List[ShapePrompt]:
    return [p for p in all_prompts() if p.held_out]


_PROMPT_RE = re.compile(r"^\s*(?:an?\s+)?(?P<color>[a-z]+)\s+(?P<shape>[a-z]+)\s*(?:,.*)?$", re.IGNORECASE)


def parse_prompt(prompt: str) -> Optional[ShapePrompt]:
    """``"a red cube"`` (optionally with a ``", front view"`` suffix) -> ShapePrompt; None if the
    prompt does not name one shapes-world color and shape."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        return None
    shape, color = m.group("shape").lower(), m.group("color").lower()
    if shape not in SHAPES or color not in COLORS:
        return None
    return ShapePrompt(shape, color)


def vocabulary() -> List[str]:
    """Every word the shapes-world prompts use (with the prior's view suffixes)."""
    words = ["a", "an", "view", "front", "side", "back", "overhead"]
    return words + list(SHAPES) + list(COLOR_NAMES)


# ----------------------------------------------------------------------------------------------
# Ground-truth meshes
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def shape_mesh(shape: str):
    """The ground-truth ``trimesh.Trimesh`` of ``shape`` (Z up, front +X, within radius 0.5).

    The mesh is "smooth shaded": vertices are split along sharp edges (cube edges, cylinder rims),
    so interpolated vertex normals are exact on flat faces and smooth on curved ones.
    """
    import trimesh

    if shape == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.42)
    elif shape == "cube":
        mesh = trimesh.creation.box(extents=(0.56, 0.56, 0.56))
    elif shape == "cylinder":
        # Tall and narrow, so that it differs from the squat mug even where the handle is hidden.
        mesh = trimesh.creation.cylinder(radius=0.24, height=0.84, sections=48)
    elif shape == "cone":
        mesh = trimesh.creation.cone(radius=0.36, height=0.72, sections=48)
        mesh.apply_translation((0.0, 0.0, -0.32))  # base at z=-0.32, apex at z=+0.40
    elif shape == "torus":
        mesh = trimesh.creation.torus(major_radius=0.3, minor_radius=0.13, major_sections=40, minor_sections=12)
    elif shape == "mug":
        body = trimesh.creation.cylinder(radius=0.28, height=0.46, sections=48)
        body.apply_translation((0.0, -0.06, 0.0))
        handle = trimesh.creation.torus(major_radius=0.13, minor_radius=0.045, major_sections=24, minor_sections=8)
        # Ring in the YZ plane (its axis along X), centred on the body's +Y wall.
        handle.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1.0, 0.0, 0.0)))
        handle.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (0.0, 0.0, 1.0)))
        handle.apply_translation((0.0, 0.22, 0.0))
        mesh = trimesh.util.concatenate([body, handle])
    else:
        raise ValueError(f"unknown shape '{shape}' (shapes: {', '.join(SHAPES)})")
    # Split vertices along edges sharper than 30 degrees.
    return trimesh.graph.smooth_shade(mesh, angle=np.radians(30.0))


def mirrored_mug():
    """The mug with its handle on the -Y side: the view-consistency reference for a wrong front."""
    import trimesh

    mesh = shape_mesh(FRONTED_SHAPE).copy()
    mesh.apply_transform(trimesh.transformations.reflection_matrix((0, 0, 0), (0, 1, 0)))
    return mesh
