"""Closed-form scale-shift statistics from the training labels (numpy only).

On-site: per species and irreps channel (parity, L, feature), a scale (RMS
over m and samples, so that it commutes with rotations); the even scalars also
get a shift (their mean).  Pairs: per ordered species pair, the even scalars
get a distance-dependent shift ``env(x) * sum_k a_k P_k(2x - 1)`` (x = d / pair
cut-off, Legendre polynomials) fitted by linear least squares, and every
channel a scale (RMS of what the shift leaves).  Both orientations of every
bond are used (the reversed one with the transposed block), as the model
predicts both.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_statistics", "N_SHIFT", "MIN_SCALE"]

N_SHIFT = 6
MIN_SCALE = 1e-3  # eV: channels with (almost) no signal keep a usable scale


def _env(x):
    inside = x < 1
    safe = np.where(inside, x, 0.0)
    return np.where(inside, np.exp(1.0 - 1.0 / (1.0 - safe * safe)), 0.0)


def _legendre(x, num):
    t = 2.0 * x - 1.0
    out = [np.ones_like(t), t]
    for k in range(2, num):
        out.append(((2 * k - 1) * t * out[-1] - (k - 1) * out[-2]) / k)
    return np.stack(out[:num], axis=-1)


def _channel_rms(values, count):
    """RMS over samples and m for every (p, L, f): values (n, 2, LM, F) -> (2, LM, F)."""
    P, LM, F = values.shape[1:]
    lmax = int(round(np.sqrt(LM))) - 1
    out = np.zeros((P, LM, F))
    sq = (values**2).sum(axis=0)
    for L in range(lmax + 1):
        sl = slice(L * L, (L + 1) ** 2)
        out[:, sl, :] = np.sqrt(
            sq[:, sl, :].sum(axis=1, keepdims=True) / max(count * (2 * L + 1), 1)
        )
    return out


def fit_statistics(graphs, layout, pair_cutoff: np.ndarray, n_shift: int = N_SHIFT) -> dict:
    """Statistics dict (numpy float32 arrays) for
    :func:`ase_gearsh.model.network.postprocess_onsite` and ``postprocess_pairs``."""
    S = layout.registry.n_species + 1
    shape = layout.irreps_shape
    on_scale = np.ones((S,) + shape)
    on_shift = np.zeros((S,) + shape)
    pair_scale = np.ones((S, S) + shape)
    pair_shift = np.zeros((S, S, shape[2], n_shift))
    mask = layout.irreps_mask
    onsite = {s: [] for s in range(1, S)}
    pairs = {}
    for g in graphs:
        on = layout.blocks_to_irreps(g.onsite.astype(np.float64))
        for s in range(1, S):
            onsite[s].append(on[g.species == s])
        fwd = layout.blocks_to_irreps(g.pairs.astype(np.float64))
        rev = layout.blocks_to_irreps(np.swapaxes(g.pairs, -1, -2).astype(np.float64))
        si, sj = g.species[g.pair_i], g.species[g.pair_j]
        x = np.linalg.norm(g.pair_vec, axis=1) / pair_cutoff[si, sj]
        for a, b, irr, xx in ((si, sj, fwd, x), (sj, si, rev, x)):
            for key in set(zip(a.tolist(), b.tolist())):
                sel = (a == key[0]) & (b == key[1])
                pairs.setdefault(key, ([], []))
                pairs[key][0].append(irr[sel])
                pairs[key][1].append(xx[sel])
    for s in range(1, S):
        if not onsite[s]:
            continue
        v = np.concatenate(onsite[s])
        if len(v) == 0:
            continue
        on_shift[s, 0, 0, :] = v[:, 0, 0, :].mean(axis=0)
        on_scale[s] = _channel_rms(v - on_shift[s], len(v))
    for (a, b), (vals, xs) in pairs.items():
        v, x = np.concatenate(vals), np.concatenate(xs)
        if len(v) == 0:
            continue
        design = _env(x)[:, None] * _legendre(x, n_shift)  # (n, K)
        k = min(n_shift, max(1, len(v) // 4))  # few samples: fewer terms
        coef, *_ = np.linalg.lstsq(design[:, :k], v[:, 0, 0, :], rcond=None)
        pair_shift[a, b, :, :k] = coef.T
        resid = v.copy()
        resid[:, 0, 0, :] -= design[:, :k] @ coef
        pair_scale[a, b] = _channel_rms(resid, len(v))
    on_scale = np.where(mask[np.arange(S), np.arange(S)], np.maximum(on_scale, MIN_SCALE), 1.0)
    pair_scale = np.where(mask, np.maximum(pair_scale, MIN_SCALE), 1.0)
    on_shift = np.where(mask[np.arange(S), np.arange(S)], on_shift, 0.0)
    pc = np.where(pair_cutoff > 0, pair_cutoff, 1.0)
    return {
        "onsite_scale": on_scale.astype(np.float32),
        "onsite_shift": on_shift.astype(np.float32),
        "pair_scale": pair_scale.astype(np.float32),
        "pair_shift": pair_shift.astype(np.float32),
        "pair_cutoff": pc.astype(np.float32),
    }


def neutral_statistics(layout, pair_cutoff: np.ndarray, n_shift: int = N_SHIFT) -> dict:
    """Unit scales and zero shifts (no data): for timing untrained models."""
    S = layout.registry.n_species + 1
    shape = layout.irreps_shape
    pc = np.where(pair_cutoff > 0, pair_cutoff, 1.0)
    return {
        "onsite_scale": np.ones((S,) + shape, np.float32),
        "onsite_shift": np.zeros((S,) + shape, np.float32),
        "pair_scale": np.ones((S, S) + shape, np.float32),
        "pair_shift": np.zeros((S, S, shape[2], n_shift), np.float32),
        "pair_cutoff": pc.astype(np.float32),
    }
