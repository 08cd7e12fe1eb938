"""Neighbour lists, pair lists, labels and padded batches (numpy only).

A *graph* is one structure: species indices, the atom-centred neighbour list
(directed edges i <- j with vectors r_j - r_i + shift) and the bond list (one
entry per unordered pair: i < j, or i == j with a lattice shift R > 0
lexicographically), in the same convention as the dataset.  Batches
concatenate graphs and pad atoms, edges and pairs up to multiples so that the
number of distinct shapes (and therefore compilations) stays bounded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.neighborlist import neighbor_list

__all__ = ["Graph", "build_graph", "bond_pairs", "attach_labels", "batch_graphs",
           "pad_size", "canonical_orientation", "LabelError"]


class LabelError(ValueError):
    """A dataset structure that cannot be used as labels for the model."""


def pad_size(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is > n (room for one padding entry)."""
    multiple = max(int(multiple), 1)
    return (n // multiple + 1) * multiple


@dataclass
class Graph:
    species: np.ndarray       # (N,) int32, 1..S
    edge_i: np.ndarray        # (E,) centre
    edge_j: np.ndarray        # (E,) neighbour
    edge_vec: np.ndarray      # (E, 3) float32, r_j + shift - r_i
    pair_i: np.ndarray        # (P,)
    pair_j: np.ndarray        # (P,)
    pair_shift: np.ndarray    # (P, 3) int
    pair_vec: np.ndarray      # (P, 3) float32
    onsite: np.ndarray | None = None   # (N, n, n) float32 canonical labels
    pairs: np.ndarray | None = None    # (P, n, n) float32 canonical labels
    name: str = ""

    @property
    def n_atoms(self) -> int:
        return len(self.species)


def _vectors(atoms, i, j, shifts):
    pos = atoms.positions
    return pos[j] - pos[i] + shifts @ atoms.cell.array


def bond_pairs(atoms, species, pair_cutoff):
    """Unordered pairs (i, j, R) with distance < pair_cutoff[s_i, s_j]."""
    i, j, S = neighbor_list("ijS", atoms, float(np.max(pair_cutoff)), self_interaction=False)
    keep = canonical_orientation(i, j, S)
    i, j, S = i[keep], j[keep], S[keep]
    vec = _vectors(atoms, i, j, S)
    d = np.linalg.norm(vec, axis=1)
    keep = d < pair_cutoff[species[i], species[j]]
    order = np.lexsort((S[keep, 2], S[keep, 1], S[keep, 0], j[keep], i[keep]))
    return i[keep][order], j[keep][order], S[keep][order], vec[keep][order]


def canonical_orientation(i, j, S) -> np.ndarray:
    """True where the directed pair (i, j, R) is the stored orientation of its
    unordered pair: i < j, or i == j with R > 0 lexicographically."""
    S = np.asarray(S).reshape(-1, 3)
    first = np.argmax(S != 0, axis=1)
    positive = S[np.arange(len(S)), first] > 0
    return (np.asarray(i) < np.asarray(j)) | ((np.asarray(i) == np.asarray(j)) & positive)


def build_graph(atoms, registry, cutoff: float, pair_cutoff: np.ndarray, name="") -> Graph:
    """Neighbour list within ``cutoff`` and bond list for one structure."""
    species = registry.species_index(atoms.numbers)
    if len(atoms) == 0:
        raise LabelError(f"{name or 'structure'}: no atoms")
    i, j, S = neighbor_list("ijS", atoms, float(cutoff), self_interaction=False)
    vec = _vectors(atoms, i, j, S)
    pi, pj, pS, pvec = bond_pairs(atoms, species, pair_cutoff)
    return Graph(species=species, edge_i=i.astype(np.int32), edge_j=j.astype(np.int32),
                 edge_vec=vec.astype(np.float32), pair_i=pi.astype(np.int32),
                 pair_j=pj.astype(np.int32), pair_shift=pS.astype(np.int32),
                 pair_vec=pvec.astype(np.float32), name=name)


def attach_labels(graph: Graph, structure, layout) -> dict:
    """Canonical float32 H labels for the graph's atoms and bonds (spin channel 0).

    A bond that the dataset does not store (dropped by a threshold) gets a
    zero label.  Returns a summary: stored blocks outside the model's bond
    list and their largest |H| (eV), which the model predicts as zero.
    """
    if structure.nspins != 1:
        raise LabelError(f"{structure.meta['source']['name']}: spin-polarised data "
                         f"(nspins={structure.nspins}); the model is trained on "
                         f"spin-paired Hamiltonians (nspins=1)")
    sp = graph.species
    onsite = np.zeros((graph.n_atoms, layout.n, layout.n), dtype=np.float32)
    for a, blk in enumerate(structure.onsite_blocks("H")):
        onsite[a] = layout.to_canonical(blk, sp[a], sp[a])
    key = {(int(i), int(j), *map(int, R)): p for p, (i, j, R) in
           enumerate(zip(graph.pair_i, graph.pair_j, graph.pair_shift))}
    pairs = np.zeros((len(graph.pair_i), layout.n, layout.n), dtype=np.float32)
    a = structure.arrays
    outside, outside_max = 0, 0.0
    for (i, j), R, blk in zip(a["pair_ij"], a["pair_shift"], structure.pair_blocks("H")):
        p = key.get((int(i), int(j), *map(int, R)))
        if p is None:
            outside += 1
            outside_max = max(outside_max, float(np.abs(blk).max()))
        else:
            pairs[p] = layout.to_canonical(blk, sp[i], sp[j])
    graph.onsite, graph.pairs = onsite, pairs
    return {"outside": outside, "outside_max": outside_max}


def batch_graphs(graphs, atoms_multiple: int, nl_multiple: int, far: float,
                 with_labels: bool = True, sizes: tuple | None = None) -> dict:
    """Concatenate graphs and pad to multiples (or to ``sizes`` = (N, E, P)).

    Padding atoms have species 0; padding edges and bonds join the last
    padding atom to itself with a vector of length ``far`` (beyond every
    cut-off).  Masks mark the real entries.
    """
    n_at = sum(g.n_atoms for g in graphs)
    n_e = sum(len(g.edge_i) for g in graphs)
    n_p = sum(len(g.pair_i) for g in graphs)
    if sizes is None:
        sizes = (pad_size(n_at, atoms_multiple), pad_size(n_e, nl_multiple),
                 pad_size(n_p, nl_multiple))
    N, E, P = sizes
    if N <= n_at or E < n_e or P < n_p:
        raise ValueError(f"padded sizes {sizes} too small for ({n_at}, {n_e}, {n_p})")
    species = np.zeros(N, np.int32)
    edge_i = np.full(E, N - 1, np.int32)
    edge_j = np.full(E, N - 1, np.int32)
    edge_vec = np.zeros((E, 3), np.float32)
    edge_vec[:, 0] = far
    pair_i = np.full(P, N - 1, np.int32)
    pair_j = np.full(P, N - 1, np.int32)
    pair_vec = np.zeros((P, 3), np.float32)
    pair_vec[:, 0] = far
    out = {}
    if with_labels:
        n = graphs[0].onsite.shape[-1]
        onsite = np.zeros((N, n, n), np.float32)
        pairs = np.zeros((P, n, n), np.float32)
    a = e = p = 0
    for g in graphs:
        na, ne, npr = g.n_atoms, len(g.edge_i), len(g.pair_i)
        species[a:a + na] = g.species
        edge_i[e:e + ne] = g.edge_i + a
        edge_j[e:e + ne] = g.edge_j + a
        edge_vec[e:e + ne] = g.edge_vec
        pair_i[p:p + npr] = g.pair_i + a
        pair_j[p:p + npr] = g.pair_j + a
        pair_vec[p:p + npr] = g.pair_vec
        if with_labels:
            onsite[a:a + na] = g.onsite
            pairs[p:p + npr] = g.pairs
        a, e, p = a + na, e + ne, p + npr
    out.update(species=species, edge_i=edge_i, edge_j=edge_j, edge_vec=edge_vec,
               pair_i=pair_i, pair_j=pair_j, pair_vec=pair_vec)
    if with_labels:
        out.update(onsite=onsite, pairs=pairs)
    return out
