"""GEARS H: E(3)-equivariant machine-learned LCAO Hamiltonians, usable from ASE.

``from ase_gearsh import GearsHCalculator`` (imports JAX only when a model is
loaded).
"""
__all__ = ["GearsHCalculator"]


def __getattr__(name):
    if name == "GearsHCalculator":
        from .calculator import GearsHCalculator
        return GearsHCalculator
    raise AttributeError(f"module 'ase_gearsh' has no attribute {name!r}")
