"""When the fast neighbour list (vesin) may be used.

vesin builds the lists about 80x faster than ASE at 4000 atoms, but version 0.6 stops
the whole process with a floating point exception when a structure spans too many
cut-offs (measured: two atoms 6e5 A apart with a 5 A cut-off, or a water molecule
scaled 3000x; 4e5 A apart is fine), and silently loses the pairs of an atom about
2**31 cells outside a periodic cell.  Such structures go to ASE's list instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VESIN_MAX_BINS", "VESIN_MAX_CELL_OFFSET", "vesin_neighbor_list"]

#: largest number of cut-off sized bins (product over the three directions) given to
#: vesin; the smallest failing case measured had about 1.2e5
VESIN_MAX_BINS = 2**15
#: largest |fractional coordinate| along a periodic direction given to vesin (its cell
#: index is int32: an atom about 2**31 cells out loses its pairs, measured)
VESIN_MAX_CELL_OFFSET = 1e6


def _bins(atoms, rmax: float) -> float:
    """Cut-off sized bins spanned by the structure: along a periodic direction the
    cell vector's length, along an open one the positions' extent."""
    pos = atoms.positions
    cell = atoms.cell.array
    n = 1.0
    for i in range(3):
        extent = np.linalg.norm(cell[i]) if atoms.pbc[i] else float(np.ptp(pos[:, i]))
        n *= 1.0 + extent / rmax
    return n


def vesin_neighbor_list(atoms, rmax: float):
    """vesin's ``NeighborList`` class when it is installed and the structure is safe for
    it (finite positions and cell, at most :data:`VESIN_MAX_BINS` bins, no atom more
    than :data:`VESIN_MAX_CELL_OFFSET` cells out along a periodic direction), else None
    (use ASE)."""
    try:
        from vesin import NeighborList
    except ImportError:  # optional dependency (extras 'model' and 'gpaw')
        return None
    if not len(atoms) or rmax <= 0 or not np.isfinite(atoms.positions).all():
        return None
    if not np.isfinite(atoms.cell.array).all() or _bins(atoms, float(rmax)) > VESIN_MAX_BINS:
        return None
    pbc = np.asarray(atoms.pbc, bool)
    if pbc.any():  # vesin's cell index of an atom is int32: far outside, pairs go missing
        try:
            frac = atoms.cell.scaled_positions(atoms.positions)
        except np.linalg.LinAlgError:
            return None
        if np.abs(frac[:, pbc]).max() > VESIN_MAX_CELL_OFFSET:
            return None
    return NeighborList
