"""Chunked, shape-bucketed prediction of H blocks for structures of any size.

The network runs in three jitted stages with fixed shapes:

1. ``density``: neighbour density of one chunk of edges, summed over chunks;
2. ``atoms``: atom descriptors and on-site blocks for all (padded) atoms;
3. ``bonds``: pair blocks for one chunk of bonds.

Atoms are padded to a geometric ladder of sizes (+25 % steps), edges and bonds
to fixed chunk sizes, so a structure whose size falls in an already-seen bucket
does not recompile, and memory is bounded by the chunk sizes rather than the
number of bonds.  The result is a :class:`PredictedBlocks` in GPAW orbital order
that assembles sparse H(k) with vectorised index arithmetic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from ase.neighborlist import neighbor_list

from .graph import canonical_orientation

__all__ = ["bucket", "PredictedBlocks", "Predictor", "inference_graph"]


def bucket(n: int, base: int = 64, growth: float = 1.25) -> int:
    """Smallest size on the ladder base*growth^k (rounded up to base) that is > n."""
    size = base
    while size <= n:
        size = int(np.ceil(size * growth / base) * base)
    return size


def inference_graph(atoms, species, cutoff: float, pair_cutoff: np.ndarray):
    """One neighbour-list pass: directed edges (d < cutoff) and canonical bonds
    (i < j, or i == j with R > 0; d < pair_cutoff[s_i, s_j]), as in training."""
    rmax = max(float(cutoff), float(np.max(pair_cutoff)))
    i, j, S, D = neighbor_list("ijSD", atoms, rmax, self_interaction=False)
    d = np.linalg.norm(D, axis=1)
    e = d < cutoff
    edges = (i[e].astype(np.int32), j[e].astype(np.int32), D[e].astype(np.float32))
    keep = canonical_orientation(i, j, S) & (d < pair_cutoff[species[i], species[j]])
    order = np.lexsort((S[keep, 2], S[keep, 1], S[keep, 0], j[keep], i[keep]))
    bonds = (i[keep][order].astype(np.int32), j[keep][order].astype(np.int32),
             S[keep][order].astype(np.int32), D[keep][order], d[keep][order])
    return edges, bonds


@dataclass
class PredictedBlocks:
    """Predicted H in real space: on-site and unordered pair blocks, GPAW order, eV.

    ``matrix(kpt)`` is ``sum_R exp(2 pi i k.R) H(R)`` with ``H_ji(-R) = H_ij(R)^T``.
    """
    orbital_counts: np.ndarray            # (N,)
    pair_i: np.ndarray                    # (P,)
    pair_j: np.ndarray
    pair_shift: np.ndarray                # (P, 3)
    pair_distance: np.ndarray             # (P,) A
    onsite_coo: tuple                     # rows, cols, values
    pair_coo: tuple                       # rows, cols, values, pair index
    neighbours: np.ndarray | None = None  # (N,) neighbours within the descriptor cut-off
    timings: dict = field(default_factory=dict)

    @property
    def n_orbitals(self) -> int:
        return int(self.orbital_counts.sum())

    def matrix(self, kpt=None) -> sp.csr_matrix:
        n = self.n_orbitals
        r0, c0, v0 = self.onsite_coo
        r1, c1, v1, blk = self.pair_coo
        gamma = kpt is None or not np.any(np.asarray(kpt, float))
        if gamma:
            v = v1
        else:
            k = np.asarray(kpt, float).reshape(3)
            v = v1 * np.exp(2j * np.pi * (self.pair_shift @ k))[blk]
        half = sp.csr_matrix((v, (r1, c1)), shape=(n, n))
        on = sp.csr_matrix((v0, (r0, c0)), shape=(n, n))
        out = on + half + half.conj().T
        out.sum_duplicates()
        return out.tocsr()

    @classmethod
    def from_structure(cls, structure, spin: int = 0) -> "PredictedBlocks":
        """The reference blocks of a dataset structure (:class:`ase_gearsh.data.Structure`)
        in the same form: an oracle in place of the model, e.g. to compare a
        prediction with DFT through the same calculator code."""
        from .data import _block_indices, orbital_offsets
        a = structure.arrays
        counts = np.asarray(a["orbital_counts"], np.int64)
        off = orbital_offsets(counts)
        r0, c0, _ = _block_indices(counts, counts, off[:-1], off[:-1])
        ij = np.asarray(a["pair_ij"], np.int64).reshape(-1, 2)
        r1, c1, blk = _block_indices(counts[ij[:, 0]], counts[ij[:, 1]], off[ij[:, 0]],
                                     off[ij[:, 1]])
        vec = np.asarray(a["pair_vector"], float).reshape(-1, 3)
        return cls(orbital_counts=counts, pair_i=ij[:, 0], pair_j=ij[:, 1],
                   pair_shift=np.asarray(a["pair_shift"]).reshape(-1, 3),
                   pair_distance=np.linalg.norm(vec, axis=1),
                   onsite_coo=(r0, c0, np.asarray(a["onsite_H"][spin], float)),
                   pair_coo=(r1, c1, np.asarray(a["pair_H"][spin], float), blk))

    def flat(self):
        """(onsite_flat, pair_flat) row-major per block, as stored in datasets."""
        return self.onsite_coo[2], self.pair_coo[2]


class Predictor:
    """Run a :class:`~ase_gearsh.engine.Model` on one structure of any size."""

    def __init__(self, model, edge_chunk: int = 65536, pair_chunk: int = 1024,
                 atom_base: int = 64):
        import jax
        self.model = model
        self.edge_chunk = int(edge_chunk)
        self.pair_chunk = int(pair_chunk)
        self.atom_base = int(atom_base)
        self.mp = int(model.settings.get("mp_steps", 0) or 0)
        net = model.net

        def density(params, species, ei, ej, ev):
            z = np.zeros(0, np.int32)
            return net.apply(params, species, ei, ej, ev, z, z, np.zeros((0, 3), np.float32),
                             stage="density")

        def atoms_stage(params, stats, tables, species, ei, ej, ev, rho):
            from .model import postprocess_onsite
            z = np.zeros(0, np.int32)
            d, onsite = net.apply(params, species, ei, ej, ev, z, z,
                                  np.zeros((0, 3), np.float32), stage="atoms", rho=rho)
            return d, postprocess_onsite(onsite, stats, tables, species)

        def bonds_stage(params, stats, tables, species, d, pi, pj, pv):
            from .model import postprocess_pairs
            z = np.zeros(0, np.int32)
            _, fwd, rev = net.apply(params, species, z, z, np.zeros((0, 3), np.float32),
                                    pi, pj, pv, stage="bonds", descriptors=d)
            return postprocess_pairs(fwd, rev, stats, tables, species, pi, pj, pv)

        self._density = jax.jit(density)
        self._atoms = jax.jit(lambda p, s, sp_, ei, ej, ev, rho: atoms_stage(
            p, s, model.tables, sp_, ei, ej, ev, rho))
        self._bonds = jax.jit(lambda p, s, sp_, d, pi, pj, pv: bonds_stage(
            p, s, model.tables, sp_, d, pi, pj, pv))

    @staticmethod
    def _pad_edges(ei, ej, ev, size, pad_atom, far):
        n = len(ei)
        out_i = np.full(size, pad_atom, np.int32)
        out_j = np.full(size, pad_atom, np.int32)
        out_v = np.zeros((size, 3), np.float32)
        out_v[:, 0] = far
        out_i[:n], out_j[:n], out_v[:n] = ei, ej, ev
        return out_i, out_j, out_v

    def __call__(self, atoms, progress: bool = False) -> PredictedBlocks:
        import jax.numpy as jnp
        from .engine import FAR
        model = self.model
        t0 = time.perf_counter()
        species = model.registry.species_index(atoms.numbers)
        (ei, ej, ev), (pi, pj, pS, pD, pd) = inference_graph(
            atoms, species, model.cutoff, model.pair_cutoff)
        t1 = time.perf_counter()
        N = len(atoms)
        Np = bucket(N, self.atom_base)
        pad = Np - 1
        sp_pad = np.zeros(Np, np.int32)
        sp_pad[:N] = species
        sp_j = jnp.asarray(sp_pad)
        params, stats = model.params, model.stats
        E = len(ei)
        if self.mp:  # message passing needs every edge in one call
            ce = bucket(E, 1024)
            chunks_e = [(0, E)]
        else:
            ce = min(self.edge_chunk, bucket(E, 1024))
            chunks_e = [(a, min(a + ce, E)) for a in range(0, max(E, 1), ce)]
        rho = None
        if not self.mp:
            for a, b in chunks_e:
                args = self._pad_edges(ei[a:b], ej[a:b], ev[a:b], ce, pad, FAR)
                part = self._density(params, sp_j, *map(jnp.asarray, args))
                rho = part if rho is None else rho + part
            edges = self._pad_edges(ei[:0], ej[:0], ev[:0], 1, pad, FAR)
        else:
            edges = self._pad_edges(ei, ej, ev, ce, pad, FAR)
        d, onsite = self._atoms(params, stats, sp_j, *map(jnp.asarray, edges), rho)
        onsite = np.asarray(onsite, np.float64)[:N]
        t2 = time.perf_counter()
        P = len(pi)
        cp = min(self.pair_chunk, bucket(P, 256))
        starts = range(0, max(P, 1), cp)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="bonds", unit="chunk", leave=False)
        blocks = np.empty((P, model.layout.n, model.layout.n), np.float32)
        for a in starts:
            b = min(a + cp, P)
            ci, cj, cv = self._pad_edges(pi[a:b], pj[a:b], pD[a:b].astype(np.float32), cp, pad,
                                         FAR)
            out = self._bonds(params, stats, sp_j, d, jnp.asarray(ci), jnp.asarray(cj),
                              jnp.asarray(cv))
            blocks[a:b] = np.asarray(out)[:b - a]
        t3 = time.perf_counter()
        result = self._to_gpaw(species, onsite, pi, pj, pS, pd, blocks)
        result.neighbours = np.bincount(ei, minlength=N)
        t4 = time.perf_counter()
        result.timings = {"neighbour_list": t1 - t0, "atoms": t2 - t1, "bonds": t3 - t2,
                          "to_gpaw_order": t4 - t3, "n_edges": E, "n_bonds": P,
                          "atoms_padded": Np, "edge_chunk": ce, "pair_chunk": cp}
        return result

    def _to_gpaw(self, species, onsite, pi, pj, pS, pd, blocks) -> PredictedBlocks:
        """Canonical blocks -> GPAW-order COO triplets, grouped by species pair."""
        lay = self.model.layout
        counts = np.array([len(lay.perm[s]) for s in species], np.int64)
        M0 = np.concatenate([[0], np.cumsum(counts)])
        rows, cols, vals = [], [], []
        for s in np.unique(species):
            at = np.flatnonzero(species == s)
            p = lay.perm[s]
            b = onsite[at][:, p[:, None], p[None, :]]
            n1 = len(p)
            rows.append(np.broadcast_to(M0[at][:, None, None] + np.arange(n1)[None, :, None],
                                        b.shape).ravel())
            cols.append(np.broadcast_to(M0[at][:, None, None] + np.arange(n1)[None, None, :],
                                        b.shape).ravel())
            vals.append(b.ravel())
        onsite_coo = (np.concatenate(rows), np.concatenate(cols), np.concatenate(vals))
        rows, cols, vals, idx = [], [], [], []
        si, sj = species[pi], species[pj]
        for s1 in np.unique(si) if len(pi) else []:
            for s2 in np.unique(sj[si == s1]):
                sel = np.flatnonzero((si == s1) & (sj == s2))
                p1, p2 = lay.perm[s1], lay.perm[s2]
                b = blocks[sel][:, p1[:, None], p2[None, :]].astype(np.float64)
                n1, n2 = len(p1), len(p2)
                rows.append(np.broadcast_to(M0[pi[sel]][:, None, None]
                                            + np.arange(n1)[None, :, None],
                                            b.shape).ravel())
                cols.append(np.broadcast_to(M0[pj[sel]][:, None, None]
                                            + np.arange(n2)[None, None, :],
                                            b.shape).ravel())
                vals.append(b.ravel())
                idx.append(np.repeat(sel, n1 * n2))
        if rows:
            order = np.argsort(np.concatenate(idx), kind="stable")  # pair order, row-major
            pair_coo = tuple(np.concatenate(x)[order] for x in (rows, cols, vals, idx))
        else:
            pair_coo = (np.zeros(0, np.int64),) * 2 + (np.zeros(0),) + (np.zeros(0, np.int64),)
        return PredictedBlocks(orbital_counts=counts, pair_i=pi, pair_j=pj, pair_shift=pS,
                               pair_distance=pd, onsite_coo=onsite_coo, pair_coo=pair_coo)
