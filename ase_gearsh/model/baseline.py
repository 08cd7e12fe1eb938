"""A physics baseline H0 of the pair blocks, from two-centre integrals (numpy fit).

The network predicts pair blocks as corrections to

    H0_ij = sum_k env(x) P_k(2x - 1) (c_k S_ij + d_k T_ij),     x = d_ij / pair cut-off,

where S_ij and T_ij are the two-centre overlap and kinetic-energy integrals of the
two atoms' basis functions (GPAW's Fourier-Bessel expansions of the species' basis,
no SCF, no third atom), P_k Legendre polynomials, env the pair envelope, and the
coefficients c_k, d_k are fitted per ordered species pair and per pair of shells (so
H0 transforms like H under rotations) by least squares on the training labels
(:mod:`ase_gearsh.training.baseline`).  On the molecules benchmark this baseline
leaves a pair residual with an RMS 6.9 times smaller than the distance-dependent
scalar shift of the statistics alone (254 against 1738 meV, 60 structures).

A two-centre block along the bond direction r^ is, in the layout's irreps, a radial
function of the distance times the spherical harmonic Y_LM(r^) of each channel
(parity, L, feature).  H0 is therefore stored as these radial functions on a grid of
x, ``table[a, b, g, parity, L, feature]`` (its value at x_g along +z, where the Racah
harmonics are Y_LM = delta_M0), and evaluated in the network as a linear
interpolation in x times Y_LM(r^): a few table look-ups per bond, no basis functions
and no GPAW at prediction time.  The same table is used in training and prediction.
"""

from __future__ import annotations

import e3x
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["baseline_blocks", "onsite_baseline_blocks"]


def baseline_blocks(table, tables, pair_cutoff, si, sj, pair_vec):
    """H0 blocks (P, n, n) of bonds (JAX), symmetrised so that the blocks of the
    reversed bond are exactly the transposes: (B(a, b, r) + B(b, a, -r)^T) / 2.
    ``pair_cutoff``: the statistics' (S+1, S+1) pair cut-offs."""
    from .network import _to_blocks

    index, coef, n = tables["index"], tables["coef"], tables["n"]
    G = table.shape[2]
    L_out = table.shape[4] - 1
    lm_L = np.concatenate([np.full(2 * L + 1, L) for L in range(L_out + 1)])
    dist = jnp.sqrt(jnp.sum(pair_vec * pair_vec, axis=-1))
    x = jnp.clip(dist / pair_cutoff[si, sj], 0.0, 1.0) * (G - 1)
    i0 = jnp.clip(jnp.floor(x).astype(jnp.int32), 0, G - 2)
    w = (x - i0)[:, None, None, None]

    Y = e3x.so3.spherical_harmonics(pair_vec, L_out, cartesian_order=False)  # (P, LM)
    parity = jnp.asarray((-1.0) ** lm_L, Y.dtype)  # Y_LM(-r) = (-1)^L Y_LM(r)

    def one(a, b, Yv):
        t = (1.0 - w) * table[a, b, i0] + w * table[a, b, i0 + 1]  # (P, 2, L+1, F)
        return _to_blocks(t[:, :, lm_L, :] * Yv[:, None, :, None], index, coef, n)

    fwd = one(si, sj, Y)
    rev = one(sj, si, Y * parity)
    return 0.5 * (fwd + jnp.swapaxes(rev, -1, -2))


def _two_centre(table, tables, a, b, x, vec):
    """Blocks (K, E, n, n) of radial tables (K, S, S, G, 2, L+1, F) at x in [0, 1] (JAX)."""
    from .network import _to_blocks

    index, coef, n = tables["index"], tables["coef"], tables["n"]
    G, L_out = table.shape[3], table.shape[5] - 1
    lm_L = np.concatenate([np.full(2 * L + 1, L) for L in range(L_out + 1)])
    u = x * (G - 1)
    i0 = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, G - 2)
    w = (u - i0)[None, :, None, None, None]
    t = (1.0 - w) * table[:, a, b, i0] + w * table[:, a, b, i0 + 1]  # (K, E, 2, L+1, F)
    Y = e3x.so3.spherical_harmonics(vec, L_out, cartesian_order=False)
    irr = t[:, :, :, lm_L, :] * Y[None, :, None, :, None]
    K, E = irr.shape[:2]
    return _to_blocks(irr.reshape((K * E,) + irr.shape[2:]), index, coef, n).reshape(K, E, n, n)


def onsite_baseline_blocks(stats, tables, species, edge_i, edge_j, edge_vec):
    """On-site H0 (N, n, n) of the atoms, summed over these edges (JAX; a sum, so it can
    be accumulated over edge chunks): for every neighbour j of i,
    ``sum_k env(x) P_k(2x - 1) (a_k S S^T + b_k (S T^T + T S^T) + c_k T T^T)`` with the
    two-centre blocks S = S_ij, T = T_ij and coefficients per (species of i, species
    of j, shell pair).  Each term is D_i^T (.) D_i under rotations."""
    from .network import envelope, shift_basis

    S_t, T_t = stats["onsite_baseline_S"], stats["onsite_baseline_T"]
    coef = stats["onsite_baseline_coef"]  # (S, S, 3, K, n, n)
    si, sj = species[edge_i], species[edge_j]
    dist = jnp.sqrt(jnp.sum(edge_vec * edge_vec, axis=-1))
    x = jnp.clip(dist / stats["pair_cutoff"][si, sj], 0.0, 1.0)
    S, T = _two_centre(jnp.stack([S_t, T_t]), tables, si, sj, x, edge_vec)
    St, Tt = jnp.swapaxes(S, -1, -2), jnp.swapaxes(T, -1, -2)
    ST = S @ Tt
    feats = jnp.stack([S @ St, ST + jnp.swapaxes(ST, -1, -2), T @ Tt], axis=1)  # (E, 3, n, n)
    phi = envelope(x)[:, None] * shift_basis(x, coef.shape[3])  # (E, K)
    w = jnp.einsum("ek,eqkmn->eqmn", phi, coef[si, sj])
    contrib = (w * feats).sum(axis=1)
    out = jax.ops.segment_sum(contrib, edge_i, num_segments=species.shape[0])
    return 0.5 * (out + jnp.swapaxes(out, -1, -2))
