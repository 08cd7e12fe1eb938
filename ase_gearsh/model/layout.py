"""The mapping between Hamiltonian blocks and irreps (JAX and e3x for the
Clebsch-Gordan table).

Every atom's orbitals are placed in one *canonical* layout shared by all
species: shell slots ordered by angular momentum l, then by the order of the
shells with that l in GPAW's basis.  A species fills the slots it has; the rest
are masked.  Because the layout is the same for every species pair, the output
of the network (e3x features of shape ``(2, (L_max+1)**2, F)``) maps to a block
through one fixed table, and no layout can differ between datasets that share a
registry.

The (l1, l2) sub-block of a block decomposes into irreps
``L = |l1-l2| .. l1+l2`` with parity ``(-1)**(l1+l2)`` through real
Clebsch-Gordan coefficients (e3x, ``cartesian_order=False``: GPAW's real
spherical harmonic order).  Each sub-block is given the first feature index
whose required (parity, L) channels are still free.

Rotation rule (e3x row vectors): ``H'_ij = D_i^T H_ij D_j`` and the irreps
transform as ``c' = c @ D_L``.
"""

from __future__ import annotations

from functools import cached_property

import e3x
import jax
import numpy as np

from ..core.basis import Registry
from ..core.compiled import compiled

__all__ = ["Layout", "clebsch_gordan"]


def clebsch_gordan(lmax: int) -> np.ndarray:
    """Real Clebsch-Gordan table ``C[l1m1, l2m2, LM]`` in GPAW/e3x orbital order."""
    with jax.enable_x64(True):  # float64 table: the block <-> irreps map is exact
        cg = e3x.so3.clebsch_gordan(lmax, lmax, 2 * lmax, cartesian_order=False)
    return np.asarray(cg, dtype=np.float64)


class Layout:
    """Canonical orbital layout and block <-> irreps tables for a registry."""

    def __init__(self, registry: Registry):
        self.registry = registry
        lmax = max(max(e["l"]) for e in registry.species)
        self.lmax = lmax
        self.lmax_out = 2 * lmax
        nslots = [0] * (lmax + 1)
        for e in registry.species:
            for l in range(lmax + 1):
                nslots[l] = max(nslots[l], sum(1 for x in e["l"] if x == l))
        # shell slots (l, k) and their first canonical orbital
        self.slots = [(l, k) for l in range(lmax + 1) for k in range(nslots[l])]
        starts, n = [], 0
        for l, _ in self.slots:
            starts.append(n)
            n += 2 * l + 1
        self.slot_start = starts
        self.n = n  # canonical orbitals per atom
        # per species: canonical index of each GPAW orbital, and mask of used slots
        self.perm = [np.zeros(0, dtype=np.int64)]
        self.orbital_mask = np.zeros((registry.n_species + 1, n), dtype=bool)
        for s, e in enumerate(registry.species, start=1):
            seen = [0] * (lmax + 1)
            idx = []
            for l in e["l"]:
                slot = self.slots.index((l, seen[l]))
                seen[l] += 1
                idx.extend(range(starts[slot], starts[slot] + 2 * l + 1))
            self.perm.append(np.array(idx, dtype=np.int64))
            self.orbital_mask[s, idx] = True
        self._assign_features()

    def _assign_features(self):
        used = set()
        self.subblocks = []  # (slot_a, slot_b, l1, l2, parity, feature)
        for a, (l1, _) in enumerate(self.slots):
            for b, (l2, _) in enumerate(self.slots):
                p = (l1 + l2) % 2
                Ls = range(abs(l1 - l2), l1 + l2 + 1)
                f = 0
                while any((p, L, f) in used for L in Ls):
                    f += 1
                used.update((p, L, f) for L in Ls)
                self.subblocks.append((a, b, l1, l2, p, f))
        self.n_features = 1 + max(sb[5] for sb in self.subblocks)
        self.irreps_shape = (2, (self.lmax_out + 1) ** 2, self.n_features)

    @cached_property
    def gather_tables(self):
        """``block[e] = sum_t coef[e, t] * irreps_flat[index[e, t]]`` for the n*n block.

        Also returns, for every flat irreps slot, the (parity, L, feature) it
        belongs to (-1 for unused slots).
        """
        cg = clebsch_gordan(self.lmax)
        n = self.n
        terms = [[] for _ in range(n * n)]
        P, LM, F = self.irreps_shape
        flat = lambda p, lm, f: (p * LM + lm) * F + f  # noqa: E731
        slot_of = np.full(P * LM * F, -1)
        for a, b, l1, l2, p, f in self.subblocks:
            ra, rb = self.slot_start[a], self.slot_start[b]
            for L in range(abs(l1 - l2), l1 + l2 + 1):
                for M in range(2 * L + 1):
                    slot_of[flat(p, L * L + M, f)] = L
                    sub = cg[l1 * l1 : (l1 + 1) ** 2, l2 * l2 : (l2 + 1) ** 2, L * L + M]
                    for m1, m2 in zip(*np.nonzero(np.abs(sub) > 1e-12)):
                        terms[(ra + m1) * n + rb + m2].append((flat(p, L * L + M, f), sub[m1, m2]))
        T = max(len(t) for t in terms)
        index = np.zeros((n * n, T), dtype=np.int32)
        coef = np.zeros((n * n, T), dtype=np.float64)
        for e, t in enumerate(terms):
            for k, (i, c) in enumerate(t):
                index[e, k], coef[e, k] = i, c
        return index, coef, slot_of

    @cached_property
    def scatter_matrix(self) -> np.ndarray:
        """Dense (n*n, 2*(Lout+1)^2*F) map irreps -> block (for numpy use)."""
        index, coef, _ = self.gather_tables
        M = np.zeros((self.n * self.n, int(np.prod(self.irreps_shape))))
        for e in range(self.n * self.n):
            np.add.at(M[e], index[e], coef[e])
        return M

    def irreps_to_blocks(self, irreps: np.ndarray) -> np.ndarray:
        """(..., 2, (Lout+1)^2, F) -> canonical blocks (..., n, n)."""
        flat = irreps.reshape(*irreps.shape[:-3], -1)
        return (flat @ self.scatter_matrix.T).reshape(*irreps.shape[:-3], self.n, self.n)

    def blocks_to_irreps(self, blocks: np.ndarray) -> np.ndarray:
        """Canonical blocks (..., n, n) -> irreps (..., 2, (Lout+1)^2, F).

        Exact inverse of :meth:`irreps_to_blocks` on the used irreps slots (the
        Clebsch-Gordan map of each sub-block is orthogonal).
        """
        flat = blocks.reshape(*blocks.shape[:-2], -1) @ self.scatter_matrix
        return flat.reshape(*blocks.shape[:-2], *self.irreps_shape)

    @cached_property
    def irreps_mask(self) -> np.ndarray:
        """(n_species+1, n_species+1, 2, (Lout+1)^2, F): slots used by a species pair."""
        ns = self.registry.n_species + 1
        mask = np.zeros((ns, ns) + self.irreps_shape, dtype=bool)
        P, LM, F = self.irreps_shape
        for a, b, l1, l2, p, f in self.subblocks:
            for s1 in range(1, ns):
                if not self.orbital_mask[s1, self.slot_start[a]]:
                    continue
                for s2 in range(1, ns):
                    if self.orbital_mask[s2, self.slot_start[b]]:
                        for L in range(abs(l1 - l2), l1 + l2 + 1):
                            mask[s1, s2, p, L * L : (L + 1) ** 2, f] = True
        return mask

    def block_mask(self, s1, s2) -> np.ndarray:
        """(…, n, n) mask of the canonical block entries used by species pairs."""
        m1 = self.orbital_mask[np.asarray(s1)]
        m2 = self.orbital_mask[np.asarray(s2)]
        return m1[..., :, None] & m2[..., None, :]

    def to_canonical(self, block: np.ndarray, s1: int, s2: int, dtype=np.float32):
        """GPAW-order block (n1, n2) -> canonical (n, n), zeros in unused slots."""
        out = np.zeros((self.n, self.n), dtype=dtype)
        out[np.ix_(self.perm[s1], self.perm[s2])] = block
        return out

    def from_canonical(self, block: np.ndarray, s1: int, s2: int) -> np.ndarray:
        """Canonical (..., n, n) -> GPAW-order (..., n1, n2)."""
        return block[..., self.perm[s1][:, None], self.perm[s2][None, :]]

    @cached_property
    def perm_table(self) -> np.ndarray:
        """(n_species+1, n) int64: ``perm`` of every species, padded with -1."""
        table = np.full((self.registry.n_species + 1, self.n), -1, dtype=np.int64)
        for s, p in enumerate(self.perm):
            table[s, : len(p)] = p
        return table

    def gpaw_blocks(self, species_a, species_b, blocks) -> np.ndarray:
        """Canonical blocks (P, n, n) of atom pairs with species ``species_a``,
        ``species_b`` (P,) -> their GPAW-order blocks, flat row-major and
        concatenated in input order (as ``onsite_H``/``pair_H`` of a dataset),
        float64.  One compiled pass over the blocks (numba), or vectorised per
        species pair without numba; the values are the same."""
        species_a = np.asarray(species_a)
        species_b = np.asarray(species_b)
        counts = np.asarray(self.registry.n_orbitals, dtype=np.int64)
        sizes = counts[species_a] * counts[species_b]
        start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out = np.empty(int(start[-1]), dtype=np.float64)
        if not len(species_a):
            return out
        blocks = np.asarray(blocks)
        kernel = compiled(_gather_blocks)
        if kernel is not None and blocks.dtype in (np.float32, np.float64):
            kernel(
                np.ascontiguousarray(blocks),
                species_a.astype(np.int64),
                species_b.astype(np.int64),
                self.perm_table,
                counts,
                start,
                out,
            )
            return out
        key = species_a.astype(np.int64) * (self.registry.n_species + 1) + species_b
        for k in np.unique(key):
            sel = np.flatnonzero(key == k)
            p1, p2 = self.perm[int(species_a[sel[0]])], self.perm[int(species_b[sel[0]])]
            vals = blocks[sel][:, p1[:, None], p2[None, :]]
            pos = start[sel][:, None] + np.arange(len(p1) * len(p2))[None, :]
            out[pos.ravel()] = vals.reshape(len(sel), -1).ravel()
        return out


def _gather_blocks(blocks, species_a, species_b, perm, counts, start, out):
    """``out[start[p]:]`` = block p in GPAW order, row-major: element (r, c) is
    ``blocks[p, perm[a, r], perm[b, c]]`` (numba kernel of :meth:`Layout.gpaw_blocks`)."""
    for p in range(len(species_a)):
        a, b = species_a[p], species_b[p]
        na, nb, o = counts[a], counts[b], start[p]
        for r in range(na):
            pr = perm[a, r]
            for c in range(nb):
                out[o + r * nb + c] = blocks[p, pr, perm[b, c]]
