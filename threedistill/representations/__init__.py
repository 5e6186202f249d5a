"""3D representations behind one interface (:class:`Representation`), and their config groups.

Importing this package registers the built-in representations by name, so
:func:`build_representation` can find ``representation.name``.
"""

from dataclasses import dataclass, field

from threedistill.representations.base import (
    RenderOutput,
    Representation,
    RepresentationContext,
    build_representation,
    register,
    representation_class,
    representation_names,
)
from threedistill.representations import nerf  # noqa: F401  (registers "nerf")
from threedistill.representations import gaussians  # noqa: F401  (registers "gaussians")
from threedistill.representations import mesh  # noqa: F401  (registers "mesh")
from threedistill.representations.gaussians import GaussiansConfig
from threedistill.representations.mesh import MeshConfig
from threedistill.representations.nerf import NerfConfig


@dataclass
class RepresentationConfig:
    """``representation``: which representation to train (``name``, checked where it is looked
    up: :func:`build_representation`) and one group per representation."""

    name: str = "nerf"
    nerf: NerfConfig = field(default_factory=NerfConfig)
    gaussians: GaussiansConfig = field(default_factory=GaussiansConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self, key: str = "representation") -> None:
        """Each group's checks (call as ``RepresentationConfig.validate(node, key)`` on an
        OmegaConf node: structured nodes do not carry dataclass methods)."""
        NerfConfig.validate(self.nerf, f"{key}.nerf")
        GaussiansConfig.validate(self.gaussians, f"{key}.gaussians")
        MeshConfig.validate(self.mesh, f"{key}.mesh")


__all__ = ["GaussiansConfig", "MeshConfig", "NerfConfig", "Representation", "RepresentationConfig",
           "RepresentationContext", "RenderOutput", "build_representation", "register", "representation_class",
           "representation_names"]
