"""How far each atom of a structure lies from the training set: a reliability figure
computed without DFT.

Every atom's descriptor (stage 2 of :class:`~ase_gearsh.model.engine.Model`) is
reduced to rotation-invariant features (:func:`~ase_gearsh.model.inference.atom_invariants`:
the norm over m of each parity, degree and feature channel).  Per species, the
training atoms' features are standardised (mean, standard deviation), projected
onto their first principal components, and a bounded random subsample of them is
kept as reference points.  An atom's distance to the training set is

    dist(x) = sqrt( min_r |P z - r|^2 + |z - P^T P z|^2 ),   z = (x - mean) / std,

the distance in the principal subspace to the nearest reference point r plus the
part of z outside that subspace.  Its *score* is dist(x) divided by the species'
scale: the ``quantile`` (99 %) of the same distance over training atoms, each left
out of the reference points.  So 1 is the edge of the training distribution, and
larger values mean extrapolation; a structure's figure is the largest score of its
atoms.  Species missing from the reference score ``inf``
(:func:`missing_species` says why).

The reference is a JSON-ready dict (:func:`fit_reliability`), stored in a
checkpoint's ``extra["reliability"]`` (``ase_gearsh.training.attach.attach_reliability``,
``gearsh attach-reliability``); its size is a few tens of KB.  The math is numpy
only; :func:`fit_reliability` runs the network through
:func:`~ase_gearsh.model.inference.predictor_for`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

from ..core.errors import GearsHError
from .coverage import ExtrapolationWarning
from .graph import Graph
from .inference import atom_invariants, predictor_for

__all__ = [
    "RELIABILITY_VERSION",
    "RELIABILITY_THRESHOLD",
    "ReliabilityError",
    "UnreliableWarning",
    "atom_invariants",
    "fit_reliability",
    "reference_of",
    "check_reference",
    "reliability_scores",
    "missing_species",
    "reliability_messages",
    "warn_unreliable",
    "reference_summary",
]

RELIABILITY_VERSION = 1
RELIABILITY_THRESHOLD = 2.0  # the calculator warns above this figure
SCALE_FLOOR = 0.1  # smallest scale (standardised units): float32 noise stays far below 1
# Significant digits stored, per value (positive: mean, std, scale) or relative to the
# largest value of the array (negative: unit-vector components and reference points,
# whose tiny entries become 0).  The calibration uses the rounded values, so rounding
# only has to keep the geometry; short numbers keep the JSON at tens of KB a species.
DIGITS = {"mean": 6, "std": 4, "scale": 6, "components": -3, "reference": -4}


class ReliabilityError(GearsHError, ValueError):
    """An unusable reliability reference, or no training atoms to build one."""


class UnreliableWarning(ExtrapolationWarning):
    """Atom environments lie far from the training set's (reliability figure above
    the threshold); the prediction may be inaccurate.  An
    :class:`~ase_gearsh.model.coverage.ExtrapolationWarning`, so filters on that
    class cover it too."""


# -- fitting ------------------------------------------------------------------------
def _graphs(model, items) -> Iterable[Graph]:
    """Graphs of ``items``: Graph objects as they are, ``ase.Atoms`` and dataset
    structures (anything with ``.atoms``) through ``model.graph``."""
    for k, item in enumerate(items):
        if isinstance(item, Graph):
            yield item
        elif hasattr(item, "positions") and hasattr(item, "numbers"):
            yield model.graph(item)
        elif hasattr(item, "atoms"):
            yield model.graph(item.atoms)
        else:
            raise ReliabilityError(
                f"item {k}: expected a Graph, an ase.Atoms or a dataset Structure, "
                f"got {type(item).__name__}"
            )


class _Reservoir:
    """A uniform random sample of at most ``size`` rows of a stream (Algorithm R,
    vectorised per batch)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.chunks: list[np.ndarray] = []
        self.full: np.ndarray | None = None
        self.seen = 0

    def add(self, x: np.ndarray) -> None:
        t = self.seen + np.arange(len(x))  # stream position of each row
        free = t < self.size
        if free.any():
            self.chunks.append(np.array(x[free]))
        rest = np.flatnonzero(~free)
        if len(rest):
            if self.full is None:
                self.full, self.chunks = np.concatenate(self.chunks), []
            k = self.rng.integers(0, t[rest] + 1)
            keep = k < self.size
            k, rows = k[keep], rest[keep]
            _, last = np.unique(k[::-1], return_index=True)  # the last write wins
            pick = len(k) - 1 - last
            self.full[k[pick]] = x[rows[pick]]
        self.seen += len(x)

    def array(self) -> np.ndarray:
        data = self.full if self.full is not None else np.concatenate(self.chunks)
        return np.asarray(data, np.float64)


def _rounded(a, what: str) -> np.ndarray:
    """``a`` as the JSON stores it (:data:`DIGITS` of ``what``)."""
    a = np.asarray(a, np.float64)
    digits = DIGITS[what]
    if digits < 0:
        top = np.abs(a).max() if a.size else 0.0
        if top == 0.0:
            return a
        decimals = -digits - 1 - int(np.floor(np.log10(top)))
        return np.round(a, decimals) + 0.0  # + 0.0: no negative zeros
    return np.array([float(f"{v:.{digits}g}") for v in a.ravel()]).reshape(a.shape)


def _fit_species(x: np.ndarray, n_components, max_reference, quantile, rng) -> dict:
    """Standardisation, principal components, reference points and scale of one
    species' training features ``x`` (n, K), n >= 2."""
    n, K = x.shape
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    # channels that barely vary in training (e.g. pseudoscalars of planar molecules,
    # zero up to float32 noise) are not blown up to unit variance
    floor = max(1e-2 * np.sqrt(np.mean(std**2)), 1e-3 * np.sqrt(np.mean(x**2)), 1e-12)
    std = np.maximum(std, floor)
    mean, std = _rounded(mean, "mean"), _rounded(std, "std")
    z = (x - mean) / std
    k = max(1, min(int(n_components), K, n - 1))
    _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    components = _rounded(vt[:k], "components")
    m = min(int(max_reference), n)
    chosen = np.sort(rng.choice(n, size=m, replace=False))
    reference = _rounded(z[chosen] @ components.T, "reference")
    entry = {
        "atoms": int(n),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "components": components.tolist(),
        "reference": reference.tolist(),
        "scale": 1.0,
    }
    # leave-one-out: a training atom that is a reference point is not its own neighbour
    exclude = np.full(n, -1)
    exclude[chosen] = np.arange(m)
    d = _distances(_arrays(entry), x, exclude=exclude)
    entry["scale"] = float(_rounded(max(float(np.quantile(d, quantile)), SCALE_FLOOR), "scale"))
    return entry


def fit_reliability(
    model,
    graphs,
    *,
    max_reference: int = 128,
    n_components: int = 8,
    quantile: float = 0.99,
    max_atoms: int = 20000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """The reliability reference of ``model`` from its training structures.

    ``graphs``: an iterable (read once) of :class:`~ase_gearsh.model.graph.Graph`
    built with this model's registry (``model.graph(atoms)``), ``ase.Atoms`` or
    dataset structures.  Runs stages 1 and 2 of the network on each; per species
    keeps a uniform sample of at most ``max_atoms`` atoms, from which the
    standardisation, ``n_components`` principal components and ``max_reference``
    reference points are taken, and whose leave-one-out nearest-reference
    distances give the scale (their ``quantile``).  Species with fewer than two
    training atoms are recorded with a reason and score ``inf``.  Returns a
    JSON-ready dict (see the module docstring)."""
    for name, v, lo in (
        ("max_reference", max_reference, 2),
        ("n_components", n_components, 1),
        ("max_atoms", max_atoms, 2),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ReliabilityError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not 0.0 < float(quantile) <= 1.0:
        raise ReliabilityError(f"quantile must lie in (0, 1], got {quantile!r}")
    rng = np.random.default_rng(seed)
    predictor = predictor_for(model)
    symbols = list(model.registry.symbols)
    samples: dict[int, _Reservoir] = {}
    n_graphs, n_features = 0, None
    items = _graphs(model, graphs)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="reliability reference", unit="structure", leave=False)
    for g in items:
        if len(g.species) and (g.species.min() < 1 or g.species.max() > len(symbols)):
            raise ReliabilityError(
                f"graph {g.name or n_graphs}: species indices outside 1..{len(symbols)}; "
                f"build graphs with this model's registry (model.graph(atoms))"
            )
        x = predictor.atom_invariants(g)
        n_features = x.shape[1]
        for s in np.unique(g.species):
            samples.setdefault(int(s), _Reservoir(max_atoms, rng)).add(x[g.species == s])
        n_graphs += 1
    if not n_graphs:
        raise ReliabilityError("no training structures given: cannot build a reliability reference")
    species = {}
    for s in sorted(samples):
        x = samples[s].array()
        sym = symbols[s - 1]
        if len(x) < 2:
            species[sym] = {
                "atoms": int(samples[s].seen),
                "reason": "only one training atom: no spread to compare with",
            }
            continue
        species[sym] = _fit_species(x, n_components, max_reference, quantile, rng)
        species[sym]["atoms"] = int(samples[s].seen)
        species[sym]["sampled"] = len(x)
    for sym in symbols:
        species.setdefault(sym, {"atoms": 0, "reason": "no training atoms of this element"})
    return {
        "version": RELIABILITY_VERSION,
        "method": "nearest training atom in standardised, PCA-reduced descriptor invariants",
        "n_features": int(n_features),
        "quantile": float(quantile),
        "structures": n_graphs,
        "settings": {
            "max_reference": int(max_reference),
            "n_components": int(n_components),
            "max_atoms": int(max_atoms),
            "seed": int(seed),
        },
        "species": species,
    }


# -- scoring ------------------------------------------------------------------------
def reference_of(model) -> dict | None:
    """The model's reliability reference (``model.extra["reliability"]``), checked;
    ``None`` when the checkpoint has none (older checkpoints)."""
    ref = (getattr(model, "extra", None) or {}).get("reliability")
    if ref is None:
        return None
    check_reference(ref, where=str(getattr(model, "path", "") or "model"))
    return ref


def check_reference(ref, where: str = "reliability reference") -> None:
    """Raise :class:`ReliabilityError` unless ``ref`` is a reference this code reads."""
    if not isinstance(ref, dict) or not isinstance(ref.get("species"), dict):
        raise ReliabilityError(f"{where}: the reliability reference is not a dict with 'species'")
    if ref.get("version") != RELIABILITY_VERSION:
        raise ReliabilityError(
            f"{where}: reliability reference version {ref.get('version')!r}; this "
            f"ase_gearsh reads version {RELIABILITY_VERSION}; rebuild it with "
            f"`gearsh attach-reliability`"
        )
    K = ref.get("n_features")
    for sym, e in ref["species"].items():
        if "reason" in e:
            continue
        try:
            k = len(e["components"])
            ok = (
                len(e["mean"]) == K
                and len(e["std"]) == K
                and all(len(c) == K for c in e["components"])
                and all(len(r) == k for r in e["reference"])
                and len(e["reference"]) >= 1
                and float(e["scale"]) > 0
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ReliabilityError(f"{where}: reliability reference of {sym} is incomplete")


def _arrays(entry: dict) -> dict:
    return {
        "mean": np.asarray(entry["mean"], np.float64),
        "std": np.asarray(entry["std"], np.float64),
        "components": np.asarray(entry["components"], np.float64),
        "reference": np.asarray(entry["reference"], np.float64),
    }


def _distances(a: dict, x: np.ndarray, exclude=None, chunk: int = 4096) -> np.ndarray:
    """Distance of each row of ``x`` (n, K) to the training set of one species;
    ``exclude[i]``: index of a reference point that row i may not use (-1: none)."""
    z = (np.asarray(x, np.float64) - a["mean"]) / a["std"]
    p = z @ a["components"].T
    outside = np.maximum((z * z).sum(axis=1) - (p * p).sum(axis=1), 0.0)
    r = a["reference"]
    r2 = (r * r).sum(axis=1)
    near = np.empty(len(z))
    for s in range(0, len(z), chunk):
        q = p[s : s + chunk]
        d2 = (q * q).sum(axis=1)[:, None] - 2.0 * q @ r.T + r2[None, :]
        if exclude is not None:
            rows = np.flatnonzero(exclude[s : s + chunk] >= 0)
            d2[rows, exclude[s : s + chunk][rows]] = np.inf
        near[s : s + chunk] = np.maximum(d2.min(axis=1), 0.0)
    return np.sqrt(near + outside)


def reliability_scores(ref: dict, species_symbols, invariants) -> np.ndarray:
    """Score of each atom: distance of its invariants (N, K) to the training atoms
    of its species (``species_symbols``: N chemical symbols) over the species'
    scale; 1 ~ the edge of the training distribution, larger = extrapolating,
    ``inf`` for species missing from the reference (see :func:`missing_species`).
    The structure's figure is the maximum."""
    check_reference(ref)
    x = np.asarray(invariants, np.float64)
    symbols = np.asarray(list(species_symbols))
    if x.ndim != 2 or len(x) != len(symbols):
        raise ReliabilityError(
            f"expected invariants of shape ({len(symbols)}, K) for {len(symbols)} atoms, "
            f"got {x.shape}"
        )
    if len(x) and x.shape[1] != ref["n_features"]:
        raise ReliabilityError(
            f"the atoms have {x.shape[1]} descriptor invariants, the reliability reference "
            f"{ref['n_features']}: it belongs to another model; rebuild it with "
            f"`gearsh attach-reliability`"
        )
    scores = np.full(len(x), np.inf)
    for sym in np.unique(symbols):
        entry = ref["species"].get(str(sym))
        if entry is None or "reason" in entry:
            continue
        sel = symbols == sym
        scores[sel] = _distances(_arrays(entry), x[sel]) / float(entry["scale"])
    return scores


def missing_species(ref: dict, species_symbols) -> dict[str, str]:
    """{symbol: why it has no reference} for the species of these atoms that the
    reference cannot score (their scores are ``inf``)."""
    out = {}
    for sym in sorted(set(map(str, species_symbols))):
        entry = ref["species"].get(sym)
        if entry is None:
            out[sym] = "not in the reliability reference (the model was not fitted on it)"
        elif "reason" in entry:
            out[sym] = entry["reason"]
    return out


def reliability_messages(ref: dict, species_symbols, scores, worst: int = 5) -> list[str]:
    """Human-readable description of a structure's scores: the figure, the worst
    atoms, and the species without a reference."""
    scores = np.asarray(scores, float)
    symbols = list(map(str, species_symbols))
    if not len(scores):
        return []
    order = np.argsort(-scores, kind="stable")[:worst]
    atoms = ", ".join(f"{int(i)} ({symbols[i]}) {scores[i]:.2f}" for i in order)
    msgs = [
        f"reliability figure {scores.max():.2f} (1 ~ edge of the training set's atom "
        f"environments; larger = extrapolating); worst atoms: {atoms}"
    ]
    for sym, why in missing_species(ref, symbols).items():
        msgs.append(f"{sym}: {why}")
    return msgs


def warn_unreliable(
    ref: dict, species_symbols, scores, threshold: float = RELIABILITY_THRESHOLD
) -> bool:
    """Issue an :class:`UnreliableWarning` when the figure exceeds ``threshold``;
    returns whether it did."""
    scores = np.asarray(scores, float)
    if not len(scores) or not scores.max() > threshold:
        return False
    warnings.warn(
        f"the prediction may be unreliable (figure above {threshold:g}): "
        + "; ".join(reliability_messages(ref, species_symbols, scores)),
        UnreliableWarning,
        stacklevel=3,
    )
    return True


def reference_summary(ref: dict) -> str:
    """One line: training atoms, reference points and scale per species."""
    parts = []
    for sym, e in ref["species"].items():
        if "reason" in e:
            parts.append(f"{sym}: none ({e['reason']})")
        else:
            parts.append(
                f"{sym}: {len(e['reference'])} of {e['atoms']} atoms, "
                f"{len(e['components'])} components, scale {float(e['scale']):.3g}"
            )
    return f"{ref['structures']} structures; " + "; ".join(parts)
