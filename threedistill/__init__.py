"""threedistill: text-to-3D score distillation."""

__version__ = "0.1.0"
