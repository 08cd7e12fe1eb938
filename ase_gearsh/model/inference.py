"""Chunked, shape-bucketed prediction of H blocks for structures of any size.

:class:`Predictor` runs the three stages of :class:`~ase_gearsh.model.engine.Model`
(the forward path that training uses) jitted with fixed shapes:

1. ``density`` over chunks of edges, summed;
2. ``atoms`` for all (padded) atoms;
3. ``bonds`` over chunks of bonds.

Atoms are padded on a geometric ladder of sizes (+25 % steps), edges and bonds to
fixed chunk sizes, so a structure whose size falls in an already-seen bucket does
not recompile, and memory is bounded by the chunk sizes rather than the number
of bonds.  The result is a :class:`~ase_gearsh.core.blocks.BlockMatrices` in GPAW
orbital order; it also carries ``atom_invariants`` (N, K), the rotation-invariant
features of the atom descriptors of stage 2 (:func:`atom_invariants`), from which
:mod:`ase_gearsh.model.reliability` scores how far each atom lies from the
training set without a second network run.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from ..core.blocks import BlockMatrices, csr_layout
from ..core.processes import worker_thread
from .engine import Model, precision
from .graph import FAR, Graph, pad_edges

__all__ = ["bucket", "atom_invariants", "Predictor", "predictor_for"]


def bucket(n: int, base: int = 64, growth: float = 1.25) -> int:
    """Smallest size on the ladder base*growth^k (rounded up to base) that is > n."""
    size = base
    while size <= n:
        size = int(np.ceil(size * growth / base) * base)
    return size


def atom_invariants(descriptors):
    """Rotation-invariant features of atom descriptors.

    ``descriptors``: (N, 2, (L+1)^2, F), parity x (degree, order) x feature, as
    :meth:`~ase_gearsh.model.engine.Model.atoms` returns them.  Returns (N, 2 (L+1) F):
    the norm over the orders m of each (parity, degree, feature) channel, which a
    rotation (or an inversion) of the structure leaves unchanged, since each channel
    transforms with an orthogonal Wigner matrix.  Order of the features: parity,
    feature, degree.  Array-agnostic: numpy input is computed in float64; a JAX
    array (the :class:`Predictor` jits this function) stays a JAX array.
    """
    d = descriptors
    if not isinstance(d, jax.Array):  # tracers are jax.Array too
        d = np.asarray(d, np.float64)
    if d.ndim != 4 or d.shape[1] != 2:
        raise ValueError(
            f"expected atom descriptors of shape (N, 2, (L+1)^2, F), got {tuple(d.shape)}"
        )
    M = d.shape[2]
    L = int(round(np.sqrt(M))) - 1
    if (L + 1) ** 2 != M:
        raise ValueError(f"expected (L+1)^2 orders per channel, got {M}")
    degree = np.zeros((M, L + 1), np.float32)  # sums the orders m of each degree l
    for deg in range(L + 1):
        degree[deg * deg : (deg + 1) ** 2, deg] = 1.0
    squares = (d * d).transpose(0, 1, 3, 2) @ degree  # (N, 2, F, L+1)
    return (squares**0.5).reshape(d.shape[0], -1)


class Predictor:
    """Run a :class:`~ase_gearsh.model.engine.Model` on one structure of any size.

    ``edge_chunk``/``pair_chunk``: edges and bonds per network call (upper
    bounds; small structures use the next bucket above their size).
    ``threads``: bond chunks evaluated at the same time in threads (default 1:
    on 2 CPU cores two at a time measured no faster, ``benchmarks/device_scale.py
    --bond-threads``).
    """

    def __init__(
        self,
        model: Model,
        edge_chunk: int = 65536,
        pair_chunk: int = 512,
        atom_base: int = 64,
        threads: int | None = None,
    ):
        threads = 1 if threads is None else threads
        for name, v in (
            ("edge_chunk", edge_chunk),
            ("pair_chunk", pair_chunk),
            ("atom_base", atom_base),
            ("threads", threads),
        ):
            if int(v) < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.model = model
        self.edge_chunk = int(edge_chunk)
        self.pair_chunk = int(pair_chunk)
        self.atom_base = int(atom_base)
        self.threads = int(threads)
        self._density = jax.jit(model.density)
        self._atoms = jax.jit(model.atoms)
        self._onsite_h0 = jax.jit(model.onsite_baseline)
        # the bond stage as two compiled calls: compiled together, XLA fuses the
        # block gather into the network and the stage runs about 1.4x slower on the CPU
        self._bond_irreps = jax.jit(model.bond_irreps)
        self._bond_blocks = jax.jit(model.bond_blocks)
        self._invariants = jax.jit(atom_invariants)

    def __call__(self, atoms, progress: bool = False, layout: bool = False) -> BlockMatrices:
        """Predicted H of ``atoms`` (eV, GPAW order).  The result also carries
        ``atom_invariants`` (N, K) float32: :func:`atom_invariants` of the atom
        descriptors of this prediction (a committee's first member), and
        ``committee_spread``: for a committee, the mean absolute deviation (eV) of the
        members' H elements from their mean, over all stored elements (None for a
        single model).  ``layout``: also compute the CSR layout of H
        (:func:`~ase_gearsh.core.blocks.csr_layout`, which needs only the bonds) in a
        thread while the network runs, for a caller that will assemble H."""
        t0 = time.perf_counter()
        g = self.model.graph(atoms)
        t1 = time.perf_counter()
        pending = None
        if layout:
            counts = self.model.registry.n_orbitals[g.species]
            pending = worker_thread("gearsh-layout").submit(csr_layout, counts, g.pair_i, g.pair_j)
        try:
            with precision():
                onsite, pairs, invariants, info = self._predict(g, progress)
        except BaseException:  # the network's error (or an interrupt) first, at once
            if pending is not None:
                pending.cancel()
            raise
        csr = None if pending is None else pending.result()
        t2 = time.perf_counter()
        spread = info.pop("committee_spread")
        result = self.to_gpaw(g, onsite, pairs)
        if csr is not None:
            result.adopt_layout(csr)
        t3 = time.perf_counter()
        result.timings = {
            "neighbour_list": t1 - t0,
            "network": t2 - t1,
            "to_gpaw_order": t3 - t2,
            **info,
        }
        result.atom_invariants = invariants
        result.committee_spread = spread
        return result

    def canonical_blocks(self, g: Graph, progress: bool = False):
        """(onsite (N, n, n), pairs (P, n, n), info) in the canonical layout, float32."""
        with precision():
            onsite, pairs, _, info = self._predict(g, progress)
        return onsite, pairs, info

    def atom_invariants(self, g: Graph) -> np.ndarray:
        """:func:`atom_invariants` (N, K) float32 of the atoms of graph ``g`` (or of
        an ``ase.Atoms``): stages 1 and 2 only, no bonds."""
        if not isinstance(g, Graph):
            g = self.model.graph(g)
        params, stats = self.model.members[0]
        with precision():
            _, _, _, invariants, _ = self._atoms_stage(g, params, stats)
        return invariants

    def _atoms_stage(self, g: Graph, params, stats):
        """Stages 1 and 2 of one committee member: (padded species, descriptors
        (device), on-site blocks (N, n, n), invariants (N, K), info)."""
        model = self.model
        N = g.n_atoms
        Np = bucket(N, self.atom_base)
        pad = Np - 1
        sp_pad = np.zeros(Np, np.int32)
        sp_pad[:N] = g.species
        species = jnp.asarray(sp_pad)
        ei, ej, ev = g.edge_i, g.edge_j, g.edge_vec
        E = len(ei)
        t0 = time.perf_counter()
        with_h0 = "onsite_baseline_coef" in stats
        h0 = None
        if model.mp_steps:  # message passing needs every edge in one call
            ce = bucket(E, 1024)
            rho = None
            edges = pad_edges(ei, ej, ev, ce, pad, FAR)
            n_edge_chunks = 1
            if with_h0:
                h0 = self._onsite_h0(stats, species, *map(jnp.asarray, edges))
        else:
            ce = min(self.edge_chunk, bucket(E, 1024))
            rho = None
            starts = range(0, max(E, 1), ce)
            for a in starts:
                b = min(a + ce, E)
                chunk = [jnp.asarray(x) for x in pad_edges(ei[a:b], ej[a:b], ev[a:b], ce, pad, FAR)]
                part = self._density(params, species, *chunk)
                rho = part if rho is None else rho + part
                if with_h0:
                    part = self._onsite_h0(stats, species, *chunk)
                    h0 = part if h0 is None else h0 + part
            edges = pad_edges(ei[:0], ej[:0], ev[:0], 1, pad, FAR)
            n_edge_chunks = len(starts)
        d, onsite = self._atoms(params, stats, species, *map(jnp.asarray, edges), rho)
        if h0 is not None:
            onsite = onsite + h0
        onsite = np.asarray(onsite)[:N]
        invariants = np.asarray(self._invariants(d))[:N]
        info = {
            "atoms": time.perf_counter() - t0,
            "n_edges": E,
            "atoms_padded": Np,
            "edge_chunk": ce,
            "edge_chunks": n_edge_chunks,
        }
        return species, d, onsite, invariants, info

    def _predict(self, g: Graph, progress: bool):
        """The three stages: (onsite, pairs, invariants, info); call inside
        :func:`~ase_gearsh.model.engine.precision`.  A committee's blocks are the mean
        of its members' (each bond chunk is evaluated by every member in turn), its
        invariants the first member's; ``info["committee_spread"]``: see
        :meth:`__call__`."""
        model, members = self.model, self.model.members
        stages = [self._atoms_stage(g, params, stats) for params, stats in members]
        species, _, _, invariants, ainfo = stages[0]
        real = model.layout.orbital_mask[g.species].astype(np.float64)  # (N, n)
        every = slice(None)
        onsite, dev_sum = _member_mean([st[2] for st in stages], real, every, every)
        descriptors = [st[1] for st in stages]
        ainfo["atoms"] = sum(st[4]["atoms"] for st in stages)
        pad = len(species) - 1
        t1 = time.perf_counter()
        pi, pj, pv = g.pair_i, g.pair_j, g.pair_vec
        P = len(pi)
        cp = min(self.pair_chunk, bucket(P, 256))
        starts = range(0, max(P, 1), cp)
        bar = None
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(starts), desc="bonds", unit="chunk", leave=False)
        pairs = np.empty((P, model.layout.n, model.layout.n), np.float32)
        chunk_dev = np.zeros(len(starts))  # sums of the members' deviations, per chunk

        def chunk(a):
            b = min(a + cp, P)
            ci, cj, cv = pad_edges(pi[a:b], pj[a:b], pv[a:b], cp, pad, FAR)
            ci, cj, cv = jnp.asarray(ci), jnp.asarray(cj), jnp.asarray(cv)
            outs = []
            with precision():  # a thread-local setting: also in the worker threads
                for (params, stats), d in zip(members, descriptors):
                    first, second = self._bond_irreps(params, species, d, ci, cj, cv)
                    out = self._bond_blocks(first, second, stats, species, ci, cj, cv)
                    outs.append(np.asarray(out)[: b - a])
            pairs[a:b], chunk_dev[a // cp] = _member_mean(outs, real, pi[a:b], pj[a:b])

        threads = min(self.threads, len(starts))
        tick = bar.update if bar is not None else (lambda: None)
        try:
            if threads > 1:  # one compiled call per thread: XLA runs them side by side
                chunk(starts[0])  # compiles once, before the threads share the executable
                tick()
                with ThreadPoolExecutor(threads) as pool:
                    for _ in pool.map(chunk, starts[1:]):
                        tick()
            else:
                for a in starts:
                    chunk(a)
                    tick()
        finally:
            if bar is not None:
                bar.close()
        t2 = time.perf_counter()
        info = {
            "atoms": ainfo["atoms"],
            "bonds": t2 - t1,
            "n_edges": ainfo["n_edges"],
            "n_bonds": P,
            "atoms_padded": ainfo["atoms_padded"],
            "edge_chunk": ainfo["edge_chunk"],
            "pair_chunk": cp,
            "edge_chunks": ainfo["edge_chunks"],
            "pair_chunks": len(range(0, max(P, 1), cp)),
            "committee_spread": None,
        }
        if len(members) > 1:  # over the stored elements: n_a^2 per atom, n_i n_j per bond
            n = real.sum(axis=1)
            stored = (n**2).sum() + (n[pi] * n[pj]).sum()
            info["committee_spread"] = float((dev_sum + chunk_dev.sum()) / max(stored, 1))
        return onsite, pairs, invariants, info

    def to_gpaw(self, g: Graph, onsite, pairs) -> BlockMatrices:
        """Canonical blocks of graph ``g`` -> :class:`BlockMatrices` in GPAW order."""
        lay = self.model.layout
        sp = g.species
        counts = self.model.registry.n_orbitals[sp]
        on = lay.gpaw_blocks(sp, sp, onsite)
        pr = lay.gpaw_blocks(sp[g.pair_i], sp[g.pair_j], pairs)
        return BlockMatrices(
            orbital_counts=counts,
            pair_i=g.pair_i,
            pair_j=g.pair_j,
            pair_shift=g.pair_shift,
            onsite=on,
            pairs=pr,
            pair_distance=g.pair_distance,
            neighbours=np.bincount(g.edge_i, minlength=g.n_atoms),
        )


def _member_mean(outs: list, real: np.ndarray, i, j) -> tuple[np.ndarray, float]:
    """(mean of the members' blocks (B, n, n) (float32), sum over the orbitals' elements
    of the mean absolute deviation of the members from it).  ``real`` (N, n): the
    canonical slots that are orbitals of each atom (the others are padding, left out
    of the sum); ``i``/``j``: the atoms of the blocks' rows and columns.  A single
    member is returned as it is."""
    if len(outs) == 1:
        return np.asarray(outs[0]), 0.0
    rows, cols = real[i], real[j]
    stack = np.stack([np.asarray(o, np.float64) for o in outs])
    mean = stack.mean(axis=0)
    dev = np.abs(stack - mean).mean(axis=0)
    return mean.astype(np.float32), float(np.einsum("bij,bi,bj->", dev, rows, cols))


def predictor_for(model: Model, edge_chunk: int = 65536, pair_chunk: int = 512) -> Predictor:
    """One :class:`Predictor` (and its compiled stages) per model and chunk sizes,
    shared by every caller; kept in ``model.predictors``, so it is released with
    the model."""
    per_model = model.predictors
    key = (int(edge_chunk), int(pair_chunk))
    if key not in per_model:
        per_model[key] = Predictor(model, edge_chunk=key[0], pair_chunk=key[1])
    return per_model[key]
