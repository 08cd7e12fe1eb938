"""The range of geometries a model was trained on, and warnings when a prediction
lies outside it (numpy only)."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["ExtrapolationWarning", "training_coverage", "coverage_messages", "warn_extrapolation"]


class ExtrapolationWarning(UserWarning):
    """The structure lies outside what the training set covered."""


def training_coverage(graphs, n_species: int) -> dict:
    """Per species pair the shortest bond, and per species the fewest and the most
    neighbours, seen in the training graphs (JSON-ready; -1 where never seen)."""
    S = n_species + 1
    dmin = np.full((S, S), np.inf)
    nmax = np.full(S, -1)
    nmin = np.full(S, np.iinfo(np.int64).max)
    for g in graphs:
        if len(g.pair_i):
            d = np.linalg.norm(g.pair_vec, axis=1)
            a, b = g.species[g.pair_i], g.species[g.pair_j]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            np.minimum.at(dmin, (lo, hi), d)
        counts = np.bincount(g.edge_i, minlength=g.n_atoms)
        np.maximum.at(nmax, g.species, counts)
        np.minimum.at(nmin, g.species, counts)
    dmin = np.minimum(dmin, dmin.T)
    return {
        "min_bond_distance": np.where(np.isfinite(dmin), dmin, -1.0).tolist(),
        "max_neighbours": nmax.tolist(),
        "min_neighbours": np.where(nmax >= 0, nmin, -1).tolist(),
    }


def coverage_messages(
    coverage: dict,
    symbols,
    species,
    pair_i,
    pair_j,
    pair_distance,
    neighbours,
    tolerance: float = 0.05,
) -> list[str]:
    """Human-readable reasons why a structure is outside the training coverage."""
    if not coverage:
        return []
    dmin = np.asarray(coverage["min_bond_distance"], float)
    nmax = np.asarray(coverage["max_neighbours"])
    msgs = []
    names = ["?"] + list(symbols)
    if len(pair_i):
        a, b = species[pair_i], species[pair_j]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        ref = dmin[lo, hi]
        unseen = ref < 0
        for x, y in sorted(set(zip(lo[unseen].tolist(), hi[unseen].tolist()))):
            msgs.append(f"{names[x]}-{names[y]} bonds never occurred in the training set")
        short = (~unseen) & (pair_distance < ref - tolerance)
        for x, y in sorted(set(zip(lo[short].tolist(), hi[short].tolist()))):
            sel = short & (lo == x) & (hi == y)
            msgs.append(
                f"{int(sel.sum())} {names[x]}-{names[y]} bond(s) down to "
                f"{pair_distance[sel].min():.2f} A, shorter than any in training "
                f"({dmin[x, y]:.2f} A)"
            )
    if neighbours is None:
        return msgs
    over = neighbours > nmax[species]
    for s in sorted(set(species[over].tolist())):
        sel = over & (species == s)
        msgs.append(
            f"{int(sel.sum())} {names[s]} atom(s) with up to {int(neighbours[sel].max())} "
            f"neighbours; training had at most {int(nmax[s])}"
        )
    if "min_neighbours" in coverage:  # not in checkpoints written before it existed
        nmin = np.asarray(coverage["min_neighbours"])
        under = (nmin[species] >= 0) & (neighbours < nmin[species])
        for s in sorted(set(species[under].tolist())):
            sel = under & (species == s)
            msgs.append(
                f"{int(sel.sum())} {names[s]} atom(s) with as few as "
                f"{int(neighbours[sel].min())} neighbours; training had at least {int(nmin[s])}"
            )
    return msgs


def warn_extrapolation(msgs: list[str]) -> None:
    if msgs:
        warnings.warn(
            "the prediction is an extrapolation: " + "; ".join(msgs),
            ExtrapolationWarning,
            stacklevel=3,
        )
