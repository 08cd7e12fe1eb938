"""Fit of the two-centre baseline H0 (see :mod:`ase_gearsh.model.baseline`): the
two-centre overlap and kinetic integrals of the training bonds (GPAW's expansions of
the species' basis functions), per-shell-pair coefficient functions of the distance by
ridge-regularised least squares, and the table the network evaluates."""

from __future__ import annotations

import numpy as np

from gpaw_tools.overlap import OverlapCalculator

from ..core.basis import SpeciesBasis
from ..model.statistics import _env, _legendre

__all__ = ["TwoCentre", "fit_baseline", "fit_onsite_baseline", "N_GRID", "N_TERMS"]

N_GRID = 512  # points of the x grid of the table (linear interpolation: ~2 meV at 1 A)
N_TERMS = 6  # Legendre terms of each coefficient function c(x), d(x)
KINDS = ("O", "T")
RIDGE = 1e-3  # ridge of the fit, relative to unit-norm columns
ONSITE_RIDGE = 1e-6  # the on-site fit (many atoms per column)


class TwoCentre:
    """Canonical two-centre S and T blocks of bonds, from the species' basis functions."""

    def __init__(self, basis: dict, registry, layout):
        species = {
            s: (b if isinstance(b, SpeciesBasis) else SpeciesBasis.from_dict(b))
            for s, b in basis.items()
        }
        missing = [s for s in registry.symbols if s not in species]
        if missing:
            raise ValueError(f"no basis functions for {missing} (have {sorted(species)})")
        self.calc = OverlapCalculator({s: species[s] for s in registry.symbols}, engine="numpy")
        self.registry = registry
        self.layout = layout

    def blocks(self, kind: str, si, sj, vectors) -> np.ndarray:
        """(P, n, n) canonical blocks of bonds with species indices ``si``, ``sj`` (P,)
        at ``vectors`` (P, 3), Angstrom; zeros in unused slots; T in eV."""
        si, sj = np.asarray(si), np.asarray(sj)
        vectors = np.asarray(vectors, dtype=float).reshape(-1, 3)
        lay = self.layout
        out = np.zeros((len(si), lay.n, lay.n))
        sym = self.registry.symbols
        for a, b in set(zip(si.tolist(), sj.tolist())):
            sel = np.flatnonzero((si == a) & (sj == b))
            blk = self.calc.two_centre_blocks(kind, sym[a - 1], sym[b - 1], vectors[sel])
            p1, p2 = lay.perm[a], lay.perm[b]
            out[sel[:, None, None], p1[None, :, None], p2[None, None, :]] = blk
        return out


def _slot_index(layout) -> np.ndarray:
    """Shell slot of every canonical orbital, (n,)."""
    slot = np.zeros(layout.n, np.int64)
    for k, (l, _) in enumerate(layout.slots):
        slot[layout.slot_start[k] : layout.slot_start[k] + 2 * l + 1] = k
    return slot


def _design(x, K):
    return _env(x)[:, None] * _legendre(x, K)  # (P, K)


def fit_baseline(graphs, two_centre: TwoCentre, pair_cutoff, n_terms: int = N_TERMS):
    """Fit H0 on the labelled training graphs.

    Returns ``(table, coef, residuals)``: the table for :func:`baseline_blocks`
    (float32, (S+1, S+1, N_GRID, 2, Lout+1, F)); the coefficients (S+1, S+1, ns, ns,
    2, K) (c for S, d for T, per shell-slot pair); and per graph the pair labels
    minus H0 (float32), on which the scale-shift statistics are fitted.
    """
    lay = two_centre.layout
    S1 = two_centre.registry.n_species + 1
    ns = len(lay.slots)
    slot = _slot_index(lay)
    K = int(n_terms)
    feats, xs, sis, sjs = [], [], [], []
    for g in graphs:
        si, sj = g.species[g.pair_i], g.species[g.pair_j]
        feats.append(np.stack([two_centre.blocks(k, si, sj, g.pair_vec) for k in KINDS], 1))
        xs.append(np.linalg.norm(g.pair_vec, axis=1) / pair_cutoff[si, sj])
        sis.append(si)
        sjs.append(sj)
    F = np.concatenate(feats) if feats else np.zeros((0, 2, lay.n, lay.n))
    H = np.concatenate([g.pairs for g in graphs]).astype(np.float64)
    X, SI, SJ = (np.concatenate(v) if v else np.zeros(0) for v in (xs, sis, sjs))
    # both orientations: the reversed bond has the transposed blocks (S and T are
    # symmetric two-centre integrals: S_ji(-r) = S_ij(r)^T)
    Hb = np.concatenate([H, np.swapaxes(H, -1, -2)])
    Fb = np.concatenate([F, np.swapaxes(F, -1, -2)])
    Xb, A, B = np.concatenate([X, X]), np.concatenate([SI, SJ]), np.concatenate([SJ, SI])
    coef = np.zeros((S1, S1, ns, ns, len(KINDS), K))
    for a, b in set(zip(A.tolist(), B.tolist())):
        sel = np.flatnonzero((A == a) & (B == b))
        design = _design(Xb[sel], K)
        k_use = min(K, max(1, len(sel) // 8))
        for p in range(ns):
            rp = slot == p
            if not lay.orbital_mask[a][rp].any():
                continue
            for q in range(ns):
                rq = slot == q
                if not lay.orbital_mask[b][rq].any():
                    continue
                h = Hb[sel][:, rp][:, :, rq].reshape(len(sel), -1)
                cols = []
                for f in range(len(KINDS)):
                    v = Fb[sel, f][:, rp][:, :, rq].reshape(len(sel), -1)
                    cols.append((design[:, None, :k_use] * v[:, :, None]).reshape(-1, k_use))
                M = np.concatenate(cols, axis=1)
                if not np.abs(M).any():
                    continue
                coef[a, b, p, q, :, :k_use] = _ridge(M, h.reshape(-1)).reshape(len(KINDS), k_use)
    coef = 0.5 * (coef + coef.transpose(1, 0, 3, 2, 4, 5))  # H0_ji = H0_ij^T exactly
    residuals, start = [], 0
    for g, f in zip(graphs, feats):
        P = len(g.pair_i)
        si, sj = g.species[g.pair_i], g.species[g.pair_j]
        h0 = _apply(coef, slot, f, X[start : start + P], si, sj)
        residuals.append((g.pairs - h0).astype(np.float32))
        start += P
    return _table(coef, two_centre, pair_cutoff), coef.astype(np.float32), residuals


def _ridge(M, h, lam: float = RIDGE):
    """Least squares with columns scaled to unit norm and a ridge ``lam``: S and T of
    one shell pair are smooth, nearly collinear functions of the distance, and an
    unregularised fit trades them against each other with huge coefficients that
    extrapolate badly outside the distances seen in training."""
    norm = np.sqrt((M * M).sum(axis=0))
    norm = np.where(norm > 0, norm, 1.0)
    Ms = M / norm
    A = Ms.T @ Ms + lam * np.eye(M.shape[1])
    return np.linalg.solve(A, Ms.T @ h) / norm


def _apply(coef, slot, feats, x, si, sj):
    """H0 blocks (P, n, n) from features (P, 2, n, n) and coefficients."""
    K = coef.shape[-1]
    w = np.einsum("pk,pabfk->pabf", _design(x, K), coef[si, sj])  # (P, ns, ns, 2)
    w = w[:, slot][:, :, slot]  # (P, n, n, 2)
    return np.einsum("pmnf,pfmn->pmn", w, feats)


def _table(coef, two_centre: TwoCentre, pair_cutoff):
    """Radial functions of H0 in irreps along +z on the x grid."""
    lay = two_centre.layout
    S1 = coef.shape[0]
    slot = _slot_index(lay)
    xg = np.linspace(0.0, 1.0, N_GRID)
    L_out = lay.lmax_out
    m0 = np.array([L * L + L for L in range(L_out + 1)])
    table = np.zeros((S1, S1, N_GRID, 2, L_out + 1, lay.n_features), np.float32)
    for a in range(1, S1):
        for b in range(1, S1):
            if not np.abs(coef[a, b]).any():
                continue
            r = np.maximum(xg * pair_cutoff[a, b], 1e-6)
            vec = np.zeros((N_GRID, 3))
            vec[:, 2] = r
            si, sj = np.full(N_GRID, a), np.full(N_GRID, b)
            feats = np.stack([two_centre.blocks(k, si, sj, vec) for k in KINDS], 1)
            h0 = _apply(coef, slot, feats, xg, si, sj)
            irr = lay.blocks_to_irreps(h0)  # (G, 2, LM, F); along z only M = 0 survives
            table[a, b] = irr[:, :, m0, :]
    return table


def _radial_table(two_centre: TwoCentre, pair_cutoff, kind: str):
    """Radial functions of the plain two-centre blocks ('O' or 'T') in irreps along +z."""
    lay = two_centre.layout
    S1 = two_centre.registry.n_species + 1
    xg = np.linspace(0.0, 1.0, N_GRID)
    m0 = np.array([L * L + L for L in range(lay.lmax_out + 1)])
    table = np.zeros((S1, S1, N_GRID, 2, lay.lmax_out + 1, lay.n_features), np.float32)
    for a in range(1, S1):
        for b in range(1, S1):
            vec = np.zeros((N_GRID, 3))
            vec[:, 2] = np.maximum(xg * pair_cutoff[a, b], 1e-6)
            blocks = two_centre.blocks(kind, np.full(N_GRID, a), np.full(N_GRID, b), vec)
            table[a, b] = lay.blocks_to_irreps(blocks)[:, :, m0, :]
    return table


def _onsite_features(g, two_centre: TwoCentre, pair_cutoff, K: int) -> np.ndarray:
    """(N, S+1, 3, K, n, n): per atom and neighbour species, the sums over neighbours of
    env(x) P_k(x) times S S^T, S T^T + T S^T and T T^T."""
    lay = two_centre.layout
    S1 = two_centre.registry.n_species + 1
    si, sj = g.species[g.edge_i], g.species[g.edge_j]
    S = two_centre.blocks("O", si, sj, g.edge_vec)
    T = two_centre.blocks("T", si, sj, g.edge_vec)
    ST = S @ np.swapaxes(T, -1, -2)
    F = np.stack(
        [S @ np.swapaxes(S, -1, -2), ST + np.swapaxes(ST, -1, -2), T @ np.swapaxes(T, -1, -2)],
        axis=1,
    )
    x = np.minimum(np.linalg.norm(g.edge_vec, axis=1) / pair_cutoff[si, sj], 1.0)
    d = _design(x, K)
    out = np.zeros((g.n_atoms, S1, 3, K, lay.n, lay.n))
    np.add.at(out, (g.edge_i, sj), d[:, None, :, None, None] * F[:, :, None])
    return out


def fit_onsite_baseline(graphs, two_centre: TwoCentre, pair_cutoff, n_terms: int = 4):
    """Fit the on-site H0 of :func:`ase_gearsh.model.baseline.onsite_baseline_blocks`.

    Returns ``(stats, residuals)``: the statistics entries (``onsite_baseline_S``,
    ``_T``: radial tables of S and T; ``onsite_baseline_coef`` (S+1, S+1, 3, K, n, n))
    and per graph the on-site labels minus H0 (float32).
    """
    lay = two_centre.layout
    S1 = two_centre.registry.n_species + 1
    slot = _slot_index(lay)
    ns = len(lay.slots)
    K = int(n_terms)
    feats = [_onsite_features(g, two_centre, pair_cutoff, K) for g in graphs]
    F = np.concatenate(feats)
    H = np.concatenate([g.onsite for g in graphs]).astype(np.float64)
    sp = np.concatenate([g.species for g in graphs])
    coef = np.zeros((S1, S1, 3, K, ns, ns))
    for s in range(1, S1):
        sel = np.flatnonzero(sp == s)
        if not len(sel):
            continue
        used = lay.orbital_mask[s]
        for p in range(ns):
            rp = (slot == p) & used
            if not rp.any():
                continue
            for q in range(ns):
                rq = (slot == q) & used
                if not rq.any():
                    continue
                h = H[sel][:, rp][:, :, rq].reshape(len(sel), -1)
                f = F[sel][..., rp, :][..., rq]  # (A, S1, 3, K, np, nq)
                M = np.moveaxis(f.reshape(len(sel), -1, h.shape[1]), 1, 2).reshape(-1, S1 * 3 * K)
                keep = np.abs(M).max(axis=0) > 0
                if not keep.any():
                    continue
                # an intercept (the element's mean block, left to the statistics' shift)
                # keeps the features from being bent to reproduce the mean levels
                same_l = lay.slots[p][0] == lay.slots[q][0]
                eye = np.eye(rp.sum(), rq.sum()).reshape(1, -1) if same_l else None
                cols = [M[:, keep]]
                if eye is not None:
                    cols.append(np.broadcast_to(eye, h.shape).reshape(-1, 1))
                c = np.zeros(S1 * 3 * K)
                c[keep] = _ridge(np.concatenate(cols, axis=1), h.reshape(-1), ONSITE_RIDGE)[
                    : keep.sum()
                ]
                coef[s, :, :, :, p, q] = c.reshape(S1, 3, K)
    coef = 0.5 * (coef + np.swapaxes(coef, -1, -2))  # symmetric on-site blocks
    full = coef[..., slot[:, None], slot[None, :]]  # (S1, S1, 3, K, n, n)
    mask = lay.orbital_mask[:, :, None] & lay.orbital_mask[:, None, :]  # (S1, n, n)
    full = full * mask[:, None, None, None]
    residuals = []
    for g, f in zip(graphs, feats):
        residuals.append((g.onsite - _onsite_h0(f, full, g.species)).astype(np.float32))
    stats = {
        "onsite_baseline_S": _radial_table(two_centre, pair_cutoff, "O"),
        "onsite_baseline_T": _radial_table(two_centre, pair_cutoff, "T"),
        "onsite_baseline_coef": full.astype(np.float32),
    }
    return stats, residuals


def _onsite_h0(feats, full, species):
    """(N, n, n) on-site H0 from features (N, S+1, 3, K, n, n) and expanded coefficients."""
    h0 = np.einsum("atqkmn,atqkmn->amn", feats, full[species])
    return 0.5 * (h0 + np.swapaxes(h0, -1, -2))
