"""Helpers for equivariance and consistency tests of models (shipped, as nequip and
e3nn-jax ship theirs, so users can test their own models the same way).

Rotation rule (e3x row vectors): ``Y(r @ R) = Y(r) @ D(R)``, so an atom's
orbitals transform with a block-diagonal ``D`` and a block as
``H'_ij = D_i^T H_ij D_j``.  Under inversion an orbital of angular momentum l
picks up ``(-1)**l``.

>>> from ase_gearsh.testing import random_rotation, check_block_equivariance
>>> R = random_rotation(seed=1)
>>> err = check_block_equivariance(model, atoms, R, inversion=True)   # eV
"""

from __future__ import annotations

import e3x
import jax
import numpy as np
from scipy.linalg import block_diag

from .model.engine import Model, precision
from .model.graph import Graph, batch_graphs
from .model.inference import predictor_for
from .model.layout import Layout

__all__ = [
    "random_rotation",
    "wigner_d",
    "orbital_rotation",
    "canonical_rotation",
    "forward_blocks",
    "predicted_blocks",
    "check_block_equivariance",
]


def random_rotation(seed: int = 0) -> np.ndarray:
    """A uniformly random proper rotation matrix (3, 3), reproducible from ``seed``."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=seed).as_matrix()


def wigner_d(rot, lmax: int, inversion: bool = False) -> np.ndarray:
    """Real Wigner D ((lmax+1)^2, (lmax+1)^2) in GPAW/e3x order, float64: the one
    builder of the project's tests.  With ``inversion`` the rotation is followed
    by r -> -r (degree l multiplied by (-1)^l)."""
    with jax.enable_x64(True):
        D = np.asarray(
            e3x.so3.wigner_d(np.asarray(rot, np.float64), lmax, cartesian_order=False),
            dtype=np.float64,
        )
    if inversion:
        degree = np.repeat(np.arange(lmax + 1), 2 * np.arange(lmax + 1) + 1)
        D = D * ((-1.0) ** degree)[:, None]
    return D


def orbital_rotation(rot, l_per_atom, inversion: bool = False) -> np.ndarray:
    """Block-diagonal D over all orbitals of a structure in GPAW order
    (``l_per_atom``: the l of every radial function of every atom)."""
    lmax = max((max(ls) for ls in l_per_atom if len(ls)), default=0)
    D = wigner_d(rot, lmax, inversion)
    return block_diag(
        *[D[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] for ls in l_per_atom for l in ls]
    )


def canonical_rotation(rot, layout: Layout, inversion: bool = False) -> np.ndarray:
    """Block-diagonal D over one atom's canonical orbitals (the model's layout)."""
    D_all = wigner_d(rot, layout.lmax, inversion)
    D = np.zeros((layout.n, layout.n))
    for (l, _), start in zip(layout.slots, layout.slot_start):
        D[start : start + 2 * l + 1, start : start + 2 * l + 1] = D_all[
            l * l : (l + 1) ** 2, l * l : (l + 1) ** 2
        ]
    return D


def forward_blocks(model: Model, graph: Graph, atoms_multiple: int = 100, nl_multiple: int = 10000):
    """Canonical blocks (onsite, pairs) of ``graph`` through the training path
    (:meth:`Model.forward` on one padded batch; a committee: the mean over its
    members), float64."""
    b = batch_graphs([graph], atoms_multiple, nl_multiple, with_labels=False)
    forward = jax.jit(model.forward)
    ons, prs = [], []
    with precision():
        for params, stats in model.members:
            on, pr = forward(params, stats, b)
            ons.append(np.asarray(on, np.float64)[: graph.n_atoms])
            prs.append(np.asarray(pr, np.float64)[: len(graph.pair_i)])
    return np.mean(ons, axis=0), np.mean(prs, axis=0)


def predicted_blocks(model: Model, graph: Graph, edge_chunk: int = 65536, pair_chunk: int = 512):
    """Canonical blocks (onsite, pairs) of ``graph`` through the prediction path
    (:class:`~ase_gearsh.model.inference.Predictor`, chunked), float64."""
    on, pr, _ = predictor_for(model, edge_chunk, pair_chunk).canonical_blocks(graph)
    return np.asarray(on, np.float64), np.asarray(pr, np.float64)


def check_block_equivariance(
    model: Model, atoms, rot, inversion: bool = False, shift=(0.3, -1.1, 2.0)
) -> tuple[float, float]:
    """Largest deviation (eV) of on-site and pair blocks of the rotated (and
    translated, optionally inverted) structure from ``D^T H D``.

    Raises ``AssertionError`` when the bond list changes under the operation or
    the pair blocks are trivially zero (a test that cannot fail is no test).
    """
    sign = -1.0 if inversion else 1.0
    g = model.graph(atoms)
    on, pr = predicted_blocks(model, g)
    moved = atoms.copy()
    moved.positions = sign * atoms.positions @ rot + np.asarray(shift)
    moved.cell = sign * atoms.cell.array @ rot
    g2 = model.graph(moved)
    on2, pr2 = predicted_blocks(model, g2)
    if not (np.array_equal(g.pair_i, g2.pair_i) and np.array_equal(g.pair_j, g2.pair_j)):
        raise AssertionError("the bond list changed under the rotation")
    if len(pr) and np.abs(pr).max() <= 1e-3:
        raise AssertionError("pair blocks are trivially zero: the check would prove nothing")
    D = canonical_rotation(rot, model.layout, inversion)
    exp_on = np.einsum("ab,nbc,cd->nad", D.T, on, D)
    exp_pr = np.einsum("ab,nbc,cd->nad", D.T, pr, D)
    return float(np.abs(on2 - exp_on).max()), float(np.abs(pr2 - exp_pr).max())
