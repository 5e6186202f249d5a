"""Guidance losses over one shared core (see ``base.py``); each loss registers itself by name."""

from threedistill.guidance.base import (Guidance, GuidanceConfig, GuidanceContext, GuidanceOutput, build_guidance,
                                        guidance_names, register)
from threedistill.guidance import csd, esd, ism, nfsd, sds, vsd  # noqa: F401  (register their names)

__all__ = ["Guidance", "GuidanceConfig", "GuidanceContext", "GuidanceOutput", "build_guidance", "guidance_names", "register"]
