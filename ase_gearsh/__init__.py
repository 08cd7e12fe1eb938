"""GEARS H: E(3)-equivariant machine-learned LCAO Hamiltonians, usable from ASE.

``from ase_gearsh import GearsHCalculator`` imports the calculator (and JAX) on
first use, so that ``ase_gearsh.core`` (numpy only) stays light for the GPAW
side.  Layers, from the bottom: ``core`` (dataset schema, blocks, basis
descriptions, atomic writes), ``gpaw_tools`` (GPAW), ``model`` and
``electronic``, ``training``/``calculator``, ``predict``/``demo``, ``cli``.
"""

__version__ = "0.2.0.dev0"
__all__ = ["GearsHCalculator", "__version__"]


def __getattr__(name):
    if name == "GearsHCalculator":  # lazy: keeps JAX out of `import ase_gearsh.core`
        from .calculator import GearsHCalculator

        return GearsHCalculator
    raise AttributeError(f"module 'ase_gearsh' has no attribute {name!r}")
