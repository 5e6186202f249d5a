"""3D representations behind one interface (:class:`Representation`).

Importing this package registers the built-in representations by name, so
:func:`build_representation` can find ``representation.name``.
"""

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

__all__ = ["Representation", "RepresentationContext", "RenderOutput", "build_representation", "register", "representation_class",
           "representation_names"]
