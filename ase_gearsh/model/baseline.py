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
import jax.numpy as jnp
import numpy as np

__all__ = ["baseline_blocks"]


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

    def one(a, b, vec):
        t = (1.0 - w) * table[a, b, i0] + w * table[a, b, i0 + 1]  # (P, 2, L+1, F)
        Y = e3x.so3.spherical_harmonics(vec, L_out, cartesian_order=False)  # (P, LM)
        return _to_blocks(t[:, :, lm_L, :] * Y[:, None, :, None], index, coef, n)

    fwd = one(si, sj, pair_vec)
    rev = one(sj, si, -pair_vec)
    return 0.5 * (fwd + jnp.swapaxes(rev, -1, -2))
