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

from ..core.blocks import canonical_orientation
from ..core.errors import GearsHError
from ..core.neighbours import vesin_neighbor_list

__all__ = [
    "Graph",
    "build_graph",
    "attach_labels",
    "attach_residual",
    "attach_window",
    "batch_graphs",
    "pad_residual",
    "pad_size",
    "pad_edges",
    "FAR",
    "LabelError",
]

FAR = 1.0e3  # length (A) of padding vectors: beyond every cut-off


class LabelError(GearsHError, ValueError):
    """A dataset structure that cannot be used as labels for the model."""


def pad_size(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is > n (room for one padding entry)."""
    multiple = max(int(multiple), 1)
    return (n // multiple + 1) * multiple


@dataclass
class Graph:
    species: np.ndarray  # (N,) int32, 1..S
    edge_i: np.ndarray  # (E,) centre
    edge_j: np.ndarray  # (E,) neighbour
    edge_vec: np.ndarray  # (E, 3) float32, r_j + shift - r_i
    pair_i: np.ndarray  # (P,)
    pair_j: np.ndarray  # (P,)
    pair_shift: np.ndarray  # (P, 3) int
    pair_vec: np.ndarray  # (P, 3) float32
    pair_distance: np.ndarray | None = None  # (P,) float64, A
    onsite: np.ndarray | None = None  # (N, n, n) float32 canonical labels
    pairs: np.ndarray | None = None  # (P, n, n) float32 canonical labels
    name: str = ""
    # for the eigenvalue loss (attach_labels(..., overlap=True)): canonical S labels
    # and the Fermi level (eV)
    onsite_s: np.ndarray | None = None
    pairs_s: np.ndarray | None = None
    fermi: float | None = None
    # for the level-shift loss (attach_labels(..., window=w)): canonical blocks of the
    # window density matrix rho_w (:func:`window_density`), and the number of bonds
    # of the full graph per bond kept (a subsample of bonds scales its pair terms)
    onsite_w: np.ndarray | None = None
    pairs_w: np.ndarray | None = None
    pair_scale: float = 1.0
    # for the residual loss (attach_residual): the reference's Gamma-point generalised
    # eigenvectors C (C^T S C = 1) in canonical rows per atom: all of them (res_all,
    # (N, n, K)) and those within the window (res_win, (N, n, W)); res_count: the
    # number of window states (columns beyond it, and beyond the orbitals, are zero)
    res_all: np.ndarray | None = None
    res_win: np.ndarray | None = None
    res_count: int = 0
    # and (attach_residual(..., null_cutoff=c)) S's near-null directions at Gamma,
    # x_p = u_p / sqrt(s_p) for the eigenpairs (s_p, u_p) of S with s_p < c (so that
    # x_p^T S x_p = 1), (N, n, P); res_null_count: their number
    res_null: np.ndarray | None = None
    res_null_count: int = 0

    @property
    def n_atoms(self) -> int:
        return len(self.species)


def directed_pairs(atoms, rmax: float):
    """Directed pairs (i, j, S) with |r_j - r_i + S @ cell| < rmax, self pairs (i, i, 0)
    excluded, sorted by (i, j, S): ``(i, j, S, D)`` as ASE's ``neighbor_list("ijSD")``
    returns them, in a fixed order.  vesin computes them when it is installed (the
    model extra; about 80x faster than ASE at 4000 atoms) and the structure is safe for
    it (:func:`~ase_gearsh.core.neighbours.vesin_neighbor_list`), else ASE."""
    NeighborList = vesin_neighbor_list(atoms, rmax)
    if NeighborList is not None:
        i, j, S, D = NeighborList(cutoff=float(rmax), full_list=True).compute(
            atoms.positions, atoms.cell.array, atoms.pbc, "ijSD"
        )
    else:
        i, j, S, D = neighbor_list("ijSD", atoms, float(rmax), self_interaction=False)
    i, j, S = i.astype(np.int64), j.astype(np.int64), S.astype(np.int64)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order], j[order], S[order], np.asarray(D, float)[order]


def build_graph(atoms, species, cutoff: float, pair_cutoff: np.ndarray, name="") -> Graph:
    """The one neighbour-list pass of the project (training, evaluation, prediction).

    ``species``: model species index per atom (``Registry.species_index``).
    Edges: directed pairs within ``cutoff`` (the atom descriptors).  Bonds: one
    per unordered pair in its canonical orientation
    (:func:`~ase_gearsh.core.blocks.canonical_orientation`) with distance below
    ``pair_cutoff[s_i, s_j]``, sorted by (i, j, R).
    """
    species = np.asarray(species, np.int32)
    if len(atoms) == 0:
        raise LabelError(f"{name or 'structure'}: no atoms")
    rmax = max(float(cutoff), float(np.max(pair_cutoff)))
    i, j, S, D = directed_pairs(atoms, rmax)
    d = np.linalg.norm(D, axis=1)
    e = d < cutoff
    keep = canonical_orientation(i, j, S) & (d < pair_cutoff[species[i], species[j]])
    order = np.lexsort((S[keep, 2], S[keep, 1], S[keep, 0], j[keep], i[keep]))
    return Graph(
        species=species,
        edge_i=i[e].astype(np.int32),
        edge_j=j[e].astype(np.int32),
        edge_vec=D[e].astype(np.float32),
        pair_i=i[keep][order].astype(np.int32),
        pair_j=j[keep][order].astype(np.int32),
        pair_shift=S[keep][order].astype(np.int32),
        pair_vec=D[keep][order].astype(np.float32),
        pair_distance=d[keep][order],
        name=name,
    )


def window_density(structure, window: float) -> np.ndarray:
    """rho_w = (1/N_w) sum_n C_n C_n^T over the N_w Gamma-point states of the reference
    (H, S) within ``window`` eV of the Fermi level (GPAW order, dense).  For any
    symmetric dH, <dH, rho_w> (Frobenius) is the first-order mean shift of those levels;
    <S, rho_w> = 1, so H + cS gives c."""
    from scipy.linalg import eigh

    kpts = np.asarray(structure.reference_kpts).reshape(-1, 3)
    if len(kpts) != 1 or np.any(kpts):
        raise LabelError(
            f"{structure.meta['source']['name']}: the level-shift loss needs Gamma-only "
            f"reference data (molecules, Gamma-point cells); this structure has "
            f"{len(kpts)} k-point(s)"
        )
    e, C = eigh(structure.hamiltonian(), structure.overlap())
    inside = np.abs(e - structure.fermi_level) <= window
    if not inside.any():
        raise LabelError(
            f"{structure.meta['source']['name']}: no level within {window} eV of the Fermi level"
        )
    Cw = C[:, inside]
    return (Cw @ Cw.T) / inside.sum()


def attach_residual(
    graph: Graph, structure, layout, window: float, null_cutoff: float | None = None
) -> None:
    """The reference's Gamma-point generalised eigenvectors for the residual loss:
    ``graph.res_all`` (every state), ``graph.res_win`` (those within ``window`` eV
    of the Fermi level) and ``graph.res_count``, float32, canonical rows per atom.
    With ``null_cutoff`` also S's near-null directions (``graph.res_null``: the
    eigenvectors of S with eigenvalue s < null_cutoff, divided by sqrt(s), and
    ``graph.res_null_count``), for the loss on the rows of H along them.

    For k-sampled data the Gamma point of the stored cell is used (one of its
    k-points: H(0) = sum_R H(R)).  With them, ``||C^T dH C_w||_F^2`` is the sum over
    the window states of ``||(H + dH - e_n S) c_n||^2`` in the S^-1 norm, which
    bounds each reference level's distance to the nearest level of H + dH, and
    ``||C^T dH X||_F^2`` the squared error of the rows and columns of H in S's
    canonical basis that belong to the near-null directions X (couplings included)."""
    from scipy.linalg import eigh

    S = structure.overlap()
    e, C = eigh(structure.hamiltonian(), S)
    inside = np.abs(e - structure.fermi_level) <= window
    if not inside.any():
        raise LabelError(
            f"{structure.meta['source']['name']}: no Gamma-point level within {window} eV "
            f"of the Fermi level {structure.fermi_level:.3f} eV"
        )
    sp = graph.species
    sl = structure.orbital_slices()

    def per_atom(X):
        out = np.zeros((graph.n_atoms, layout.n, X.shape[1]), dtype=np.float32)
        for k in range(graph.n_atoms):
            out[k, layout.perm[sp[k]]] = X[sl[k]]
        return out

    out = per_atom(C)
    graph.res_all = out
    graph.res_win = np.ascontiguousarray(out[:, :, inside])
    graph.res_count = int(inside.sum())
    if null_cutoff is not None:
        s, U = np.linalg.eigh(S)
        null = s < null_cutoff
        graph.res_null = per_atom(U[:, null] / np.sqrt(np.maximum(s[null], 1e-300)))
        graph.res_null_count = int(null.sum())


def pad_residual(graphs) -> None:
    """Zero-pad the residual-loss columns of ``graphs`` to common widths (one
    compiled shape for every batch)."""
    k = max(g.res_all.shape[-1] for g in graphs)
    w = max(g.res_win.shape[-1] for g in graphs)
    nulls = [g.res_null for g in graphs if g.res_null is not None]
    z = max((x.shape[-1] for x in nulls), default=0)
    for g in graphs:
        g.res_all = _pad_columns(g.res_all, k)
        g.res_win = _pad_columns(g.res_win, w)
        if nulls:
            if g.res_null is None:
                g.res_null = np.zeros((*g.res_all.shape[:-1], 0), np.float32)
            g.res_null = _pad_columns(g.res_null, max(z, 1))


def _pad_columns(x, width):
    if x.shape[-1] == width:
        return x
    return np.concatenate([x, np.zeros((*x.shape[:-1], width - x.shape[-1]), x.dtype)], -1)


def attach_labels(
    graph: Graph, structure, layout, overlap: bool = False, window: float | None = None
) -> dict:
    """Canonical float32 H labels for the graph's atoms and bonds (spin channel 0);
    with ``overlap`` also S labels and the Fermi level (for the eigenvalue loss);
    with ``window`` (eV) also the blocks of the window density matrix
    (:func:`window_density`, for the level-shift loss).

    A bond that the dataset does not store (dropped by a threshold) gets a
    zero label.  Returns a summary: stored blocks outside the model's bond
    list and their largest |H| (eV), which the model predicts as zero.
    """
    if structure.nspins != 1:
        raise LabelError(
            f"{structure.meta['source']['name']}: spin-polarised data "
            f"(nspins={structure.nspins}); the model is trained on "
            f"spin-paired Hamiltonians (nspins=1)"
        )
    sp = graph.species
    key = {
        (int(i), int(j), *map(int, R)): p
        for p, (i, j, R) in enumerate(zip(graph.pair_i, graph.pair_j, graph.pair_shift))
    }
    a = structure.arrays
    info = {}
    for which in ("H", "S") if overlap else ("H",):
        onsite = np.zeros((graph.n_atoms, layout.n, layout.n), dtype=np.float32)
        for k, blk in enumerate(structure.onsite_blocks(which)):
            onsite[k] = layout.to_canonical(blk, sp[k], sp[k])
        pairs = np.zeros((len(graph.pair_i), layout.n, layout.n), dtype=np.float32)
        outside, outside_max = 0, 0.0
        for (i, j), R, blk in zip(a["pair_ij"], a["pair_shift"], structure.pair_blocks(which)):
            p = key.get((int(i), int(j), *map(int, R)))
            if p is None:
                outside += 1
                outside_max = max(outside_max, float(np.abs(blk).max()))
            else:
                pairs[p] = layout.to_canonical(blk, sp[i], sp[j])
        if which == "H":
            graph.onsite, graph.pairs = onsite, pairs
            info = {"outside": outside, "outside_max": outside_max}
        else:
            graph.onsite_s, graph.pairs_s = onsite, pairs
            graph.fermi = structure.fermi_level
    if window is not None:
        attach_window(graph, structure, layout, window)
    return info


def attach_window(graph: Graph, structure, layout, window: float) -> None:
    """Canonical float32 blocks of the window density matrix (:func:`window_density`)
    for the graph's atoms and bonds: ``graph.onsite_w``, ``graph.pairs_w``."""
    sp = graph.species
    rho = window_density(structure, window)
    sl = structure.orbital_slices()
    graph.onsite_w = np.zeros((graph.n_atoms, layout.n, layout.n), dtype=np.float32)
    for k in range(graph.n_atoms):
        graph.onsite_w[k] = layout.to_canonical(rho[sl[k], sl[k]], sp[k], sp[k])
    graph.pairs_w = np.zeros((len(graph.pair_i), layout.n, layout.n), dtype=np.float32)
    for p, (i, j) in enumerate(zip(graph.pair_i, graph.pair_j)):
        graph.pairs_w[p] = layout.to_canonical(rho[sl[i], sl[j]], sp[i], sp[j])


def pad_edges(i, j, vec, size: int, pad_atom: int, far: float = FAR):
    """Index pairs and vectors padded to ``size`` entries: padding joins the
    padding atom ``pad_atom`` to itself with a vector of length ``far``."""
    n = len(i)
    if n > size:
        raise ValueError(f"{n} entries do not fit a padded size of {size}")
    out_i = np.full(size, pad_atom, np.int32)
    out_j = np.full(size, pad_atom, np.int32)
    out_v = np.zeros((size, 3), np.float32)
    out_v[:, 0] = far
    out_i[:n], out_j[:n], out_v[:n] = i, j, vec
    return out_i, out_j, out_v


def batch_graphs(
    graphs,
    atoms_multiple: int,
    nl_multiple: int,
    far: float = FAR,
    with_labels: bool = True,
    sizes: tuple | None = None,
    structures: int | None = None,
) -> dict:
    """Concatenate graphs and pad to multiples (or to ``sizes`` = (N, E, P)).

    Padding atoms have species 0; padding edges and bonds join the last
    padding atom to itself with a vector of length ``far`` (beyond every
    cut-off).  Masks mark the real entries.  When the graphs carry S labels
    (the eigenvalue loss) and ``structures`` (G >= len(graphs)) is given, the
    batch also holds ``onsite_s``, ``pairs_s``, ``atom_graph`` (N,: the
    structure of every atom, G for padding), ``atom_local`` (N,: its index within
    the structure) and ``fermi`` (G,); with the residual loss's eigenvectors also
    ``res_all``, ``res_win`` (per atom, like the on-site labels) and ``res_count`` (G,),
    and with S's near-null directions ``res_null`` and ``res_null_count``.
    """
    n_at = sum(g.n_atoms for g in graphs)
    n_e = sum(len(g.edge_i) for g in graphs)
    n_p = sum(len(g.pair_i) for g in graphs)
    if sizes is None:
        sizes = (
            pad_size(n_at, atoms_multiple),
            pad_size(n_e, nl_multiple),
            pad_size(n_p, nl_multiple),
        )
    N, E, P = sizes
    if N <= n_at or E < n_e or P < n_p:
        raise ValueError(f"padded sizes {sizes} too small for ({n_at}, {n_e}, {n_p})")
    species = np.zeros(N, np.int32)
    edge_i, edge_j, edge_vec = pad_edges([], [], np.zeros((0, 3)), E, N - 1, far)
    pair_i, pair_j, pair_vec = pad_edges([], [], np.zeros((0, 3)), P, N - 1, far)
    out = {}
    if with_labels:
        n = graphs[0].onsite.shape[-1]
        onsite = np.zeros((N, n, n), np.float32)
        pairs = np.zeros((P, n, n), np.float32)
    eig = with_labels and structures is not None and graphs[0].onsite_s is not None
    win = eig and graphs[0].onsite_w is not None
    res = eig and graphs[0].res_all is not None
    if res:
        res_all = np.zeros((N, n, graphs[0].res_all.shape[-1]), np.float32)
        res_win = np.zeros((N, n, graphs[0].res_win.shape[-1]), np.float32)
        res_count = np.zeros(structures, np.float32)
    null = res and graphs[0].res_null is not None
    if null:
        res_null = np.zeros((N, n, graphs[0].res_null.shape[-1]), np.float32)
        res_null_count = np.zeros(structures, np.float32)
    if win:
        onsite_w = np.zeros((N, n, n), np.float32)
        pairs_w = np.zeros((P, n, n), np.float32)
    if win or res:
        pair_scale = np.zeros(P, np.float32)
    if eig:
        onsite_s = np.zeros((N, n, n), np.float32)
        pairs_s = np.zeros((P, n, n), np.float32)
        atom_graph = np.full(N, structures, np.int32)
        atom_local = np.zeros(N, np.int32)
        fermi = np.zeros(structures, np.float32)
    a = e = p = 0
    for k, g in enumerate(graphs):
        na, ne, npr = g.n_atoms, len(g.edge_i), len(g.pair_i)
        species[a : a + na] = g.species
        edge_i[e : e + ne] = g.edge_i + a
        edge_j[e : e + ne] = g.edge_j + a
        edge_vec[e : e + ne] = g.edge_vec
        pair_i[p : p + npr] = g.pair_i + a
        pair_j[p : p + npr] = g.pair_j + a
        pair_vec[p : p + npr] = g.pair_vec
        if with_labels:
            onsite[a : a + na] = g.onsite
            pairs[p : p + npr] = g.pairs
        if eig:
            onsite_s[a : a + na] = g.onsite_s
            pairs_s[p : p + npr] = g.pairs_s
            atom_graph[a : a + na] = k
            atom_local[a : a + na] = np.arange(na)
            fermi[k] = g.fermi
        if win:
            onsite_w[a : a + na] = g.onsite_w
            pairs_w[p : p + npr] = g.pairs_w
        if win or res:
            pair_scale[p : p + npr] = g.pair_scale
        if res:
            res_all[a : a + na] = g.res_all
            res_win[a : a + na] = g.res_win
            res_count[k] = g.res_count
        if null:
            res_null[a : a + na] = g.res_null
            res_null_count[k] = g.res_null_count
        a, e, p = a + na, e + ne, p + npr
    out.update(
        species=species,
        edge_i=edge_i,
        edge_j=edge_j,
        edge_vec=edge_vec,
        pair_i=pair_i,
        pair_j=pair_j,
        pair_vec=pair_vec,
    )
    if with_labels:
        out.update(onsite=onsite, pairs=pairs)
    if eig:
        out.update(
            onsite_s=onsite_s,
            pairs_s=pairs_s,
            atom_graph=atom_graph,
            atom_local=atom_local,
            fermi=fermi,
        )
    if win:
        out.update(onsite_w=onsite_w, pairs_w=pairs_w)
    if win or res:
        out.update(pair_scale=pair_scale)
    if res:
        out.update(res_all=res_all, res_win=res_win, res_count=res_count)
    if null:
        out.update(res_null=res_null, res_null_count=res_null_count)
    return out
