"""Exact LCAO overlap matrices S(k) for any structure, without an SCF.

The PAW-LCAO overlap is

    S_mu,nu(k) = <phi_mu | phi_nu>(k) + sum_a sum_ij <phi_mu|p_ai> dO^a_ij <p_aj|phi_nu>

The two-centre integrals are GPAW's own Fourier-Bessel expansions
(``gpaw.lcao.overlap``), evaluated here vectorised over all atom pairs and
assembled as sparse matrices, so S of a 4000-atom structure costs seconds and
memory proportional to its number of non-zeros (GPAW builds dense matrices).
The basis functions, projectors and ``dO`` come from :class:`SpeciesBasis`, a
plain-array description of a PAW setup that is stored inside model checkpoints:
S does not depend on the installed basis files.

Two engines give the same S (to rounding, ~1e-15):

* ``numba`` (default when numba is installed): compiled kernels in threads.  S is
  laid out by radial function (the 2l + 1 rows of one radial function share one
  sorted column list: the radial functions it overlaps directly or through a
  projector) and written once, in sorted CSR order, group of nearby atoms by group.
  A first pass finds each group's columns (and so the row lengths) and keeps them; the
  second sums the group's rows in a dense buffer (two-centre blocks; for each projector atom
  c one matrix product conj(P_c)^T dO_c P_c), only for the columns of atoms in later
  groups; the other half is the conjugate transpose, copied afterwards.
* ``numpy``: no compiled code, an atom-level layout and numpy scatters (several
  times slower, more memory).

Orbital order is GPAW's (atom, radial function, m); lengths in the public API
are Angstrom, S is dimensionless.  S has sorted indices and no explicit zeros;
entries that cancel to exactly zero in one summation order may be kept as ~1e-19
in another.  Matches GPAW's S to ~1e-15 (tests).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
from ase import Atoms
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list
from ase.units import Bohr, Hartree

from ase_gearsh.core.basis import BasisDataError, SpeciesBasis
from ase_gearsh.core.blocks import _ranges, block_indices, canonical_orientation
from ase_gearsh.core.neighbours import vesin_neighbor_list
from ase_gearsh.core.processes import usable_cores
from ase_gearsh.core.threads import single_threaded_blas

__all__ = [
    "SpeciesBasis",
    "OverlapCalculator",
    "species_from_gpaw",
    "species_from_setup",
    "BasisDataError",
    "splines",
    "basis_for_registry",
    "check_screen",
]


# GPAW's two-centre evaluator (c/ tci_overlap) drops expansion terms whose radial
# spline value is below this magnitude; matching it makes S equal to GPAW's to ~1e-15.
_SPLINE_ZERO = 1e-10


def splines(species: SpeciesBasis, kind: str):
    """GPAW Spline objects of ``kind`` 'basis' or 'projectors' (cached on ``species``)."""
    if kind not in species._splines:
        from gpaw.spline import Spline

        species._splines[kind] = [
            Spline.from_data(int(l), float(rmax), np.asarray(f, float))
            for l, rmax, f in getattr(species, kind)
        ]
    return species._splines[kind]


def _spline_data(spline) -> tuple[int, float, np.ndarray]:
    rmax = float(spline.get_cutoff())
    values = spline.map(np.linspace(0.0, rmax, spline.get_npoints()))
    return int(spline.get_angular_momentum_number()), rmax, values


def species_from_setup(
    setup, name: str = "", setup_type: str = "paw", xc: str = ""
) -> SpeciesBasis:
    """Plain-array description of one GPAW setup (``calc.setups[a]``)."""
    bfs = getattr(setup, "basis_functions_J", None)
    if bfs is None:
        bfs = setup.phit_j
    return SpeciesBasis(
        symbol=setup.symbol,
        valence=float(setup.Nv),
        basis=[_spline_data(s) for s in bfs],
        projectors=[_spline_data(p) for p in setup.pt_j],
        dO=np.array(setup.dO_ii, float),
        name=name,
        setup=setup_type,
        xc=xc,
    )


def species_from_gpaw(
    symbols, xc: str = "PBE", basis: str = "szp(dzp)", setups: str = "paw"
) -> dict[str, SpeciesBasis]:
    """Build :class:`SpeciesBasis` from the installed GPAW data files.

    ``basis`` and ``setups`` take the values of GPAW's keywords of the same name.
    """
    from gpaw.setup import Setups
    from gpaw.xc import XC

    symbols = sorted(set(symbols), key=lambda s: atomic_numbers[s])
    try:
        gsetups = Setups([atomic_numbers[s] for s in symbols], setups, basis, XC(xc))
    except NameError as err:  # GPAW's answer to an unknown functional
        raise BasisDataError(
            f"xc={xc!r} is not a functional GPAW knows ({err}); pass the "
            f"functional of the training data, e.g. PBE"
        ) from None
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise BasisDataError(
            f"GPAW could not load setups={setups!r}, basis={basis!r}, "
            f"xc={xc!r} for {symbols}: {err}"
        ) from None
    return {s.symbol: species_from_setup(s, basis, setups, xc) for s in gsetups}


def _neighbour_pairs(atoms: Atoms, cutoff: np.ndarray, compiled: bool = False):
    """Unordered atom pairs with ``d < cutoff[i] + cutoff[j]``, each once in its canonical
    orientation (:func:`canonical_orientation`); self pairs (i, i, 0) excluded.

    Returns ``(i, j, S, D, d)``: indices, integer cell shifts, vectors
    ``D = r_j - r_i + S @ cell`` and distances (Angstrom).  Uses vesin when it is
    installed (much faster) and safe for the structure
    (:func:`~ase_gearsh.core.neighbours.vesin_neighbor_list`), else ASE's neighbour list;
    ``compiled``: vesin's list filtered by a compiled kernel (:func:`_k_orient`).
    """
    cutoff = np.asarray(cutoff, float)
    rmax = 2.0 * float(cutoff.max(initial=0.0))
    if len(atoms) == 0 or rmax <= 0.0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros(0)
    NeighborList = vesin_neighbor_list(atoms, rmax)  # None: not installed, or unsafe
    if NeighborList is not None:
        i, j, S, D, d = NeighborList(cutoff=rmax, full_list=False).compute(
            atoms.positions, atoms.cell.array, atoms.pbc, "ijSDd"
        )
        if compiled:
            n = len(i)
            out = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty((n, 3), np.int64))
            out += (np.empty((n, 3)), np.empty(n))
            k = _k_orient(i, j, S, D, d, cutoff, *out)
            return tuple(x[:k] for x in out)
        i, j, S = i.astype(np.int64), j.astype(np.int64), S.astype(np.int64)
        keep = (d < cutoff[i] + cutoff[j]) & ~((i == j) & ~S.any(axis=1))
        i, j, S, D, d = i[keep], j[keep], S[keep], D[keep], d[keep]
        flip = ~canonical_orientation(i, j, S)
        i, j = np.where(flip, j, i), np.where(flip, i, j)
        S[flip] *= -1
        D[flip] *= -1
    else:
        i, j, S, D = neighbor_list("ijSD", atoms, cutoff=cutoff, self_interaction=False)
        keep = canonical_orientation(i, j, S)
        i, j, S, D = i[keep], j[keep], S[keep].astype(np.int64), D[keep]
        d = np.linalg.norm(D, axis=1)
    return i, j, S, D, d


def _real_harmonics(vec: np.ndarray, lmax: int) -> np.ndarray:
    """r^l Y_L(vec) for L < (lmax + 1)^2 (GPAW's real harmonics), shape (P, (lmax+1)^2)."""
    from gpaw.sphere.spherical_harmonics import Y

    x, y, z = np.ascontiguousarray(vec.T)
    out = np.empty((len(vec), (lmax + 1) ** 2))
    for L in range(out.shape[1]):
        out[:, L] = Y(L, x, y, z)
    return out


class _PairTable:
    """The two-centre integrals of one species pair as one matrix product.

    GPAW's expansion is ``X_ab(R) = sum_t s_t(|R|) sum_m rlY_{l_t m}(R) G^t_{abm}``, one
    term t per (radial function pair, l).  Here ``A[p, (t, m)] = s_t(r_p) rlY_{l_t m}(R_p)``
    and the Gaunt coefficients form one constant matrix ``B[(t, m), (a, b)]``, so all
    blocks are ``A @ B`` (P, n1 * n2).
    """

    def __init__(self, tsoe):
        from gpaw.sphere.gaunt import gaunt

        self.shape = tsoe.shape
        self.splines, self.ls, rows = [], [], []
        if tsoe.oe_jj.size == 0:
            self.B = np.zeros((0, self.shape[0] * self.shape[1]))
            self.lmax = 0
            self.row_t = self.row_L = np.zeros(0, np.int64)
            return
        G = gaunt(tsoe.lmaxgaunt)
        n2 = self.shape[1]
        for x_mm, oe in tsoe.slice(np.zeros(self.shape)):
            Ma, Mb = self._offsets(x_mm, n2)
            la, lb = oe.la, oe.lb
            for k, l in enumerate(range((la + lb) % 2, la + lb + 1, 2)):
                g = G[la * la : (la + 1) ** 2, lb * lb : (lb + 1) ** 2, l * l : (l + 1) ** 2]
                blk = np.zeros((2 * l + 1,) + self.shape)
                blk[:, Ma : Ma + 2 * la + 1, Mb : Mb + 2 * lb + 1] = g.transpose(2, 0, 1)
                rows.append(blk.reshape(2 * l + 1, -1))
                self.splines.append(oe.spline_l[k])
                self.ls.append(l)
        self.B = np.concatenate(rows)
        self.lmax = max(self.ls)
        # row (t, m) of B: spline t, harmonic L = l_t^2 + m
        self.row_t = np.repeat(np.arange(len(self.ls)), [2 * l + 1 for l in self.ls])
        self.row_L = np.concatenate([l * l + np.arange(2 * l + 1) for l in self.ls])

    @staticmethod
    def _offsets(view, n2):
        """(row, column) of a sub-block view inside its (n1, n2) parent array."""
        off = (
            view.__array_interface__["data"][0] - view.base.__array_interface__["data"][0]
        ) // view.itemsize
        return divmod(off, n2)

    def evaluate(self, r: np.ndarray, rlY: np.ndarray) -> np.ndarray:
        """Blocks (P, n1 * n2) at distances r (P,) with harmonics rlY (P, >= (lmax+1)^2), Bohr."""
        A = np.empty((len(r), len(self.B)))
        c = 0
        for spline, l in zip(self.splines, self.ls):
            s = spline.map(r)
            s[np.abs(s) < _SPLINE_ZERO] = 0.0  # GPAW's C evaluator skips these terms
            np.multiply(rlY[:, l * l : (l + 1) ** 2], s[:, None], out=A[:, c : c + 2 * l + 1])
            c += 2 * l + 1
        return A @ self.B


class _Layout:
    """Sorted CSR layout of S written block by block.

    All orbital rows of one atom share one column pattern (the orbitals of the atoms
    in its row of the atom-level pattern), so block (a, b), element (mu, nu) sits at
    ``data[rowbase[a] + mu * L[a] + coloff(a, b) + nu]``: no index arithmetic per element
    beyond that, no COO and no sort.
    """

    def __init__(self, nao: np.ndarray, pattern: sp.csr_matrix):
        pattern.sum_duplicates()
        pattern.sort_indices()
        self.nat = len(nao)
        self.nao = nao
        self.aptr = pattern.indptr.astype(np.int64)
        self.acol = pattern.indices.astype(np.int64)
        self.M0 = np.concatenate([[0], np.cumsum(nao)]).astype(np.int64)
        w = nao[self.acol]
        cum = np.concatenate([[0], np.cumsum(w)])
        row = np.repeat(np.arange(self.nat), np.diff(self.aptr))
        self.coloff = cum[:-1] - cum[self.aptr[:-1]][row]  # per atom-level entry
        self.L = cum[self.aptr[1:]] - cum[self.aptr[:-1]]  # row length per atom
        self.rowbase = np.concatenate([[0], np.cumsum(nao * self.L)]).astype(np.int64)
        self.nnz = int(self.rowbase[-1])
        self.keys = row * self.nat + self.acol  # sorted

    def entry(self, a, b) -> np.ndarray:
        """Atom-level entry index of pairs (a, b) (they must be in the pattern)."""
        return np.searchsorted(self.keys, np.asarray(a, np.int64) * self.nat + b)

    def block_start(self, a, b) -> np.ndarray:
        """Position in ``data`` of element (0, 0) of block (a, b)."""
        return self.rowbase[a] + self.coloff[self.entry(a, b)]

    def rows(self, data, a):
        """The orbital rows of atom a as a (nao_a, L_a) view into ``data``."""
        return data[self.rowbase[a] : self.rowbase[a + 1]].reshape(self.nao[a], self.L[a])

    def csr(self, data) -> sp.csr_matrix:
        """CSR matrix on this layout (indices written atom row by atom row)."""
        nM = int(self.M0[-1])
        idx_t = np.int32 if max(self.nnz, nM) < 2**31 - 1 else np.int64
        indptr = np.empty(nM + 1, idx_t)
        indptr[0] = 0
        indptr[1:] = np.cumsum(np.repeat(self.L, self.nao))
        indices = np.empty(self.nnz, idx_t)
        for a in range(self.nat):
            ent = self.acol[self.aptr[a] : self.aptr[a + 1]]
            if not len(ent) or not self.nao[a]:
                continue
            pat = (
                np.concatenate([np.arange(self.M0[b], self.M0[b + 1]) for b in ent])
                if len(ent) < 8
                else _ranges(self.M0[ent], self.nao[ent])
            )
            indices[self.rowbase[a] : self.rowbase[a + 1]] = np.tile(pat, self.nao[a])
        S = sp.csr_matrix((data, indices, indptr), shape=(nM, nM), copy=False)
        S.has_sorted_indices = True
        return S


def _local_order(atoms: Atoms, cell: float = 4.0) -> np.ndarray:
    """Atom indices sorted by a grid of ``cell``-Angstrom boxes (nearby atoms adjacent)."""
    if not len(atoms):
        return np.zeros(0, np.int64)
    pos = atoms.positions - atoms.positions.min(axis=0)
    g = np.floor(pos / cell).astype(np.int64)
    return np.lexsort((g[:, 2], g[:, 1], g[:, 0]))


def _clusters(atoms: Atoms, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Atoms in groups of about ``size`` nearby atoms (boxes of a grid, in grid order):
    (pointers, atom indices)."""
    nat = len(atoms)
    if not nat:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    pos = atoms.positions - atoms.positions.min(axis=0)
    extent = np.maximum(pos.max(axis=0), 1.0)
    box = max(float(np.prod(extent) * size / nat) ** (1 / 3), 0.5)
    g = np.floor(pos / box).astype(np.int64)
    key = (g[:, 0] * (g[:, 1].max() + 1) + g[:, 1]) * (g[:, 2].max() + 1) + g[:, 2]
    order = np.argsort(key, kind="stable")
    ptr = np.flatnonzero(np.diff(key[order])) + 1
    ptr = np.concatenate([[0], ptr, [nat]])
    # split boxes with more than 2 * size atoms
    parts = [np.arange(s, e, 2 * size) for s, e in zip(ptr[:-1], ptr[1:])]
    ptr = np.concatenate(parts + [[nat]]).astype(np.int64)
    return ptr, order.astype(np.int64)


def _scatter_add(data, idx, values, unique: bool):
    """``data[idx] += values``, also where ``idx`` repeats (``unique`` false)."""
    if unique:
        data[idx] += values
    else:
        np.add.at(data, idx, values)


# -- compiled engine: numba kernels -------------------------------------------------------
#
# Plain Python functions, compiled on first use by :func:`_compiled` (numba is optional).
# All of them release the GIL, so the per-atom kernels run in threads over atom ranges.
# Notation: ``g`` a radial function of the structure (global index, orbital order), ``ja``
# the local index of a radial function on its atom, ``w`` = 2l + 1 its orbitals.  S is laid
# out by radial function: the w rows of g share one sorted column list of length L[g] (the
# radial functions it overlaps, directly or through a projector), so row m of g starts at
# ``rowbase[g] + m * L[g]`` and its columns are runs of w' orbitals.


def _k_orient(i, j, S, D, d, cutoff, oi, oj, oS, oD, od):
    """The pairs of a half neighbour list with ``d < cutoff[i] + cutoff[j]``, self pairs
    at zero shift left out, each in its canonical orientation
    (:func:`~ase_gearsh.core.blocks.canonical_orientation`), written to ``o*``; returns
    their number."""
    n = 0
    for p in range(i.shape[0]):
        a = np.int64(i[p])
        b = np.int64(j[p])
        if not d[p] < cutoff[a] + cutoff[b]:
            continue
        s0, s1, s2 = S[p, 0], S[p, 1], S[p, 2]
        if a == b and s0 == 0 and s1 == 0 and s2 == 0:
            continue
        if a != b:
            flip = a > b
        else:
            first = s0 if s0 != 0 else (s1 if s1 != 0 else s2)
            flip = not first > 0
        sg = -1 if flip else 1
        oi[n] = b if flip else a
        oj[n] = a if flip else b
        for x in range(3):
            oS[n, x] = sg * S[p, x]
            oD[n, x] = -D[p, x] if flip else D[p, x]
        od[n] = d[p]
        n += 1
    return n


def _k_ppairs(nat, i, j, S, D, d, rc, rp):
    """Projector pairs (c, b, S, D): (a, a, 0) for every atom, then (i, j) where d <
    rp_i + rc_j and (j, i) where d < rp_j + rc_i, ordered by c, then b, stably (two
    counting sorts)."""
    m = i.shape[0]
    n = nat
    for p in range(m):
        if d[p] < rp[i[p]] + rc[j[p]]:
            n += 1
        if d[p] < rp[j[p]] + rc[i[p]]:
            n += 1
    c0 = np.empty(n, np.int64)
    b0 = np.empty(n, np.int64)
    src = np.empty(n, np.int64)  # -1: on-site; p: pair p forward; -2 - p: pair p backward
    for a in range(nat):
        c0[a] = a
        b0[a] = a
        src[a] = -1
    k = nat
    for p in range(m):
        if d[p] < rp[i[p]] + rc[j[p]]:
            c0[k], b0[k], src[k] = i[p], j[p], p
            k += 1
    for p in range(m):
        if d[p] < rp[j[p]] + rc[i[p]]:
            c0[k], b0[k], src[k] = j[p], i[p], -2 - p
            k += 1
    pos = np.zeros(nat + 1, np.int64)
    for k in range(n):
        pos[b0[k] + 1] += 1
    for a in range(nat):
        pos[a + 1] += pos[a]
    by_b = np.empty(n, np.int64)
    for k in range(n):
        by_b[pos[b0[k]]] = k
        pos[b0[k]] += 1
    pos[:] = 0
    for k in range(n):
        pos[c0[k] + 1] += 1
    for a in range(nat):
        pos[a + 1] += pos[a]
    c = np.empty(n, np.int64)
    b = np.empty(n, np.int64)
    Sp = np.zeros((n, 3), np.int64)
    Dp = np.zeros((n, 3))
    for u in range(n):
        k = by_b[u]
        t = pos[c0[k]]
        pos[c0[k]] += 1
        c[t] = c0[k]
        b[t] = b0[k]
        q = src[k]
        if q >= 0:
            for x in range(3):
                Sp[t, x] = S[q, x]
                Dp[t, x] = D[q, x]
        elif q <= -2:
            for x in range(3):
                Sp[t, x] = -S[-2 - q, x]
                Dp[t, x] = -D[-2 - q, x]
    return c, b, Sp, Dp


def _k_rly(vec, coef, px, py, pz, ptr, n_l, lmax):
    """r^l Y_L(vec) for L < n_l from GPAW's monomial table (spherical_harmonics.YL)."""
    n = vec.shape[0]
    out = np.empty((n, n_l))
    xp = np.empty(lmax + 1)
    yp = np.empty(lmax + 1)
    zp = np.empty(lmax + 1)
    for p in range(n):
        xp[0] = yp[0] = zp[0] = 1.0
        for k in range(1, lmax + 1):
            xp[k] = xp[k - 1] * vec[p, 0]
            yp[k] = yp[k - 1] * vec[p, 1]
            zp[k] = zp[k - 1] * vec[p, 2]
        for L in range(n_l):
            acc = 0.0
            for t in range(ptr[L], ptr[L + 1]):
                acc += coef[t] * xp[px[t]] * yp[py[t]] * zp[pz[t]]
            out[p, L] = acc
    return out


def _k_table(vec, coef, px, py, pz, ptr, n_l, lmax, s, row_t, row_l, nz_row, dst, val, base, out):
    """out[base[p] + dst[n]] += A[p, nz_row[n]] val[n] with A[p, (t, m)] = s[t, p] y[p, L]:
    the blocks of one species pair from radial spline values s (terms t, pairs p; values
    below ``_SPLINE_ZERO`` in magnitude are left out, as GPAW's evaluator does), the
    harmonics y of the pair vectors (:func:`_k_rly`) and the sparse Gaunt table (rows
    (t, m), non-zeros n)."""
    y = _k_rly(vec, coef, px, py, pz, ptr, n_l, lmax)
    nt, npair = s.shape
    st = np.empty((npair, nt))  # by pair, tiny values dropped
    for t in range(nt):
        for p in range(npair):
            v = s[t, p]
            st[p, t] = v if abs(v) >= _SPLINE_ZERO else 0.0
    a = np.empty(row_t.shape[0])
    for p in range(npair):
        for k in range(row_t.shape[0]):
            a[k] = st[p, row_t[k]] * y[p, row_l[k]]
        o = base[p]
        for n in range(val.shape[0]):
            out[o + dst[n]] += a[nz_row[n]] * val[n]


def _k_omask(p0, p1, oi, oj, ooff, om_off, nao, nrad, rad0, gw, groff, blocks, omask):
    """omask[om_off[p] + ja * nrad_j + jb]: max |element| of sub-block (ja, jb) of
    two-centre block p."""
    for p in range(p0, p1):
        a = oi[p]
        b = oj[p]
        n2 = nao[b]
        for ja in range(nrad[a]):
            ra = groff[rad0[a] + ja]
            wa = gw[rad0[a] + ja]
            for jb in range(nrad[b]):
                rb = groff[rad0[b] + jb]
                wb = gw[rad0[b] + jb]
                big = 0.0
                for m in range(wa):
                    s0 = ooff[p] + (ra + m) * n2 + rb
                    for nu in range(wb):
                        big = max(big, abs(blocks[s0 + nu]))
                omask[om_off[p] + ja * nrad[b] + jb] = big


def _k_pmask(q0, q1, pc, pb, poff, pm_off, npr, nrad, rad0, gw, groff, blocks, pmask):
    """pmask[pm_off[q] + jb]: the largest 2-norm over the projectors of c of an orbital of
    radial function jb of b (<p_c,i | orbital>, i = 1..ni) for projector pair q."""
    for q in range(q0, q1):
        ni = npr[pc[q]]
        b = pb[q]
        for jb in range(nrad[b]):
            s0 = poff[q] + groff[rad0[b] + jb] * ni
            big = 0.0
            for m in range(gw[rad0[b] + jb]):
                acc = 0.0
                for k in range(s0 + m * ni, s0 + (m + 1) * ni):
                    acc += blocks[k] * blocks[k]
                big = max(big, acc)
            pmask[pm_off[q] + jb] = np.sqrt(big)


def _k_q(
    c0,
    c1,
    npr,
    spc,
    do_flat,
    do_off,
    segptr,
    seg_q,
    seg_row,
    seg_w,
    seg_col,
    mc,
    qoff,
    poff,
    pblocks,
    pph,
    qflat,
):
    """Q_c = dO_c P_c(k) (ni_c, m_c) for projector atoms c0 <= c < c1, over the radial
    functions that c reaches (segments, in their order), Bloch phase of each projector
    pair included: rows of m_c contiguous columns, for :func:`_k_pq`."""
    for c in range(c0, c1):
        ni = npr[c]
        m = mc[c]
        if ni == 0 or m == 0:
            continue
        y = np.empty((ni, m), qflat.dtype)
        for s in range(segptr[c], segptr[c + 1]):
            q = seg_q[s]
            ph = pph[q]
            for nu in range(seg_w[s]):
                prow = poff[q] + (seg_row[s] + nu) * ni
                for j in range(ni):
                    y[j, seg_col[s] + nu] = pblocks[prow + j] * ph
        d = do_flat[do_off[spc[c]] : do_off[spc[c]] + ni * ni].reshape((ni, ni))
        qm = qflat[qoff[c] : qoff[c] + ni * m].reshape((ni, m))
        np.dot(d.astype(qflat.dtype), y, qm)


def _k_pq(x, r, s, qflat, q0, m, col0, mw, t0, t1):
    """Rows r and s of conj(P)^T Q: ``t0[:mw]``, ``t1[:mw]`` = (x[r] Q, x[s] Q)[col0:col0 +
    mw] for Q = ``qflat[q0:q0 + ni m]`` as (ni, m) (:func:`_k_q`).  Four projectors per
    sweep over the rows, each sweep one vectorised loop over contiguous columns that
    loads Q once for both rows: no packing of Q, which BLAS repeats for every small
    product (measured: 35 GFLOP/s on one core in cache for 14 x 16 x 300, numpy.dot 28)."""
    ni = x.shape[1]
    o0 = t0[:mw]
    o1 = t1[:mw]
    i = 0
    if ni < 4:
        o0[:] = 0.0
        o1[:] = 0.0
    while i + 4 <= ni:
        a0, a1, a2, a3 = x[r, i], x[r, i + 1], x[r, i + 2], x[r, i + 3]
        c0, c1, c2, c3 = x[s, i], x[s, i + 1], x[s, i + 2], x[s, i + 3]
        b = q0 + i * m + col0
        u0 = qflat[b : b + mw]
        u1 = qflat[b + m : b + m + mw]
        u2 = qflat[b + 2 * m : b + 2 * m + mw]
        u3 = qflat[b + 3 * m : b + 3 * m + mw]
        if i == 0:
            for j in range(mw):
                v0, v1, v2, v3 = u0[j], u1[j], u2[j], u3[j]
                o0[j] = a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                o1[j] = c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
        else:
            for j in range(mw):
                v0, v1, v2, v3 = u0[j], u1[j], u2[j], u3[j]
                o0[j] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                o1[j] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
        i += 4
    while i < ni:
        a0 = x[r, i]
        c0 = x[s, i]
        u0 = qflat[q0 + i * m + col0 : q0 + i * m + col0 + mw]
        for j in range(mw):
            v0 = u0[j]
            o0[j] += a0 * v0
            o1[j] += c0 * v0
        i += 1


def _k_columns(
    k0,
    n,
    cl_atoms,
    optr,
    oe_col,
    bptr,
    bq,
    pc,
    pm_off,
    pmask,
    segptr,
    seg_b,
    nrad,
    apos,
    cand,
    cq,
    cqk,
):
    """Columns of the rows of the n atoms ``cl_atoms[k0:k0 + n]`` (a cluster): ``cand[:nc]``
    the atoms they reach (sorted, with ``apos[b]`` their position), and ``cq[:nq]``,
    ``cqk[:nq]`` the projector pairs (c, a) that reach the cluster's atoms (the pair, the
    atom's place in the cluster).  Returns (nc, nq)."""
    nc = 0  # columns: the atoms any row of the cluster reaches
    nq = 0  # projector pairs (c, a) with a in the cluster that reach a
    for k in range(n):
        a = cl_atoms[k0 + k]
        for e in range(optr[a], optr[a + 1]):
            b = oe_col[e]
            if apos[b] < 0:
                apos[b] = nc
                cand[nc] = b
                nc += 1
        for e in range(bptr[a], bptr[a + 1]):
            q = bq[e]
            reach = False
            for ja in range(nrad[a]):
                if pmask[pm_off[q] + ja]:
                    reach = True
            if not reach:
                continue
            cq[nq] = q
            cqk[nq] = k
            nq += 1
            c = pc[q]
            for s in range(segptr[c], segptr[c + 1]):
                b = seg_b[s]
                if apos[b] < 0:
                    apos[b] = nc
                    cand[nc] = b
                    nc += 1
    srt = np.sort(cand[:nc])
    for ci in range(nc):
        cand[ci] = srt[ci]
        apos[srt[ci]] = ci
    return nc, nq


def _k_masks(
    k0,
    n,
    cl_atoms,
    optr,
    oe_p,
    oe_t,
    oe_col,
    om_off,
    omask,
    pc,
    pm_off,
    pmask,
    segptr,
    seg_b,
    seg_jb,
    seg_nrm,
    seg_nord,
    pnorm,
    cthr,
    nrad,
    apos,
    cmask,
    cq,
    cqk,
    nq,
):
    """``cmask[k, ja, ci, jb]`` (zero on entry) = 1 for the radial functions jb of column
    atom ci (:func:`_k_columns`) in the rows of radial function ja of the cluster's k-th
    atom: two-centre partners and, for every projector atom c that reaches ja, every
    radial function c reaches, marked only where the screening bound passes
    (:func:`_screening`)."""
    # two-centre sub-blocks, then the radial functions reached through projectors (the
    # buffer pass gives a buffer column only to atoms with a structural column)
    for k in range(n):
        a = cl_atoms[k0 + k]
        nra = nrad[a]
        for e in range(optr[a], optr[a + 1]):
            p = oe_p[e]
            ci = apos[oe_col[e]]
            nrb = nrad[oe_col[e]]
            for ja in range(nra):
                for jb in range(nrb):
                    if oe_t[e]:
                        hit = omask[om_off[p] + jb * nra + ja]
                    else:
                        hit = omask[om_off[p] + ja * nrb + jb]
                    if hit:
                        cmask[k, ja, ci, jb] = 1
    # the pairs (c, a) grouped by c, whose segments are taken in order of falling norm
    # (seg_nord), so that a row stops at the first one below its bound
    rmax = cmask.shape[3]
    width = cmask.shape[2] * rmax
    cs = np.empty(nq, np.int64)
    for u in range(nq):
        cs[u] = pc[cq[u]]
    order = np.argsort(cs)
    g = 0
    while g < nq:
        c = cs[order[g]]
        h = g
        while h < nq and cs[order[h]] == c:
            h += 1
        s0 = segptr[c]
        ns = segptr[c + 1] - s0
        slot = np.empty(ns, np.int64)  # place of each segment in a row of cmask
        nrm = np.empty(ns)
        for i in range(ns):
            sg = seg_nord[s0 + i]
            slot[i] = apos[seg_b[sg]] * rmax + seg_jb[sg]
            nrm[i] = seg_nrm[sg]
        thr = cthr[c]
        for u in range(g, h):
            q = cq[order[u]]
            k = cqk[order[u]]
            a = cl_atoms[k0 + k]
            for ja in range(nrad[a]):
                if pmask[pm_off[q] + ja]:
                    na = pnorm[pm_off[q] + ja]
                    row = cmask[k, ja].reshape(width)
                    for i in range(ns):
                        if na * nrm[i] <= thr:  # see _screening
                            break
                        row[slot[i]] = 1
        g = h


def _k_segorder(c0, c1, segptr, rank, seg_b, o):
    """``o[segptr[c]:segptr[c + 1]]``: the segments of projector atom c (in the order of
    its projector pairs, by atom b) ordered by the rank of b, stably, for c0 <= c < c1."""
    for c in range(c0, c1):
        s0 = segptr[c]
        s1 = segptr[c + 1]
        key = np.empty(s1 - s0, np.int64)
        for i in range(s1 - s0):
            key[i] = rank[seg_b[s0 + i]]
        oc = np.argsort(key, kind="mergesort")
        for i in range(s1 - s0):
            o[s0 + i] = s0 + oc[i]


def _k_nord(c0, c1, segptr, seg_nrm, seg_nord):
    """``seg_nord[segptr[c]:segptr[c + 1]]``: the segments of projector atom c in order of
    falling norm, for c0 <= c < c1."""
    for c in range(c0, c1):
        s0 = segptr[c]
        o = np.argsort(-seg_nrm[s0 : segptr[c + 1]])
        for i in range(o.shape[0]):
            seg_nord[s0 + i] = s0 + o[i]


def _k_append(buf, used, n):
    """buf with room for n more entries after ``used`` (a larger copy when needed)."""
    if used + n > buf.shape[0]:
        nb = np.empty(max(used + n, 2 * buf.shape[0]), buf.dtype)
        nb[:used] = buf[:used]
        return nb
    return buf


def _k_count(
    t0,
    t1,
    cl_ptr,
    cl_atoms,
    optr,
    oe_p,
    oe_t,
    oe_col,
    om_off,
    omask,
    bptr,
    bq,
    pc,
    pm_off,
    pmask,
    segptr,
    seg_b,
    seg_jb,
    seg_nrm,
    pnorm,
    cthr,
    seg_nord,
    nrad,
    rad0,
    gw,
    nao,
    mc,
    L,
    work,
    ccount,
    rcount,
    rmax,
    apos,
    cand,
    cq,
    cqk,
):
    """Row lengths L[g] of the radial functions of the atoms of clusters t0 <= cl < t1, an
    estimate of the work of each atom (elements written), and each cluster's columns
    (:func:`_k_columns`, :func:`_k_masks`), kept for :func:`_k_fill` so that they are
    found once: returned in cluster order as (columns, projector pairs, their atoms'
    places, the column runs of each row: ``ci * rmax + jb`` for radial function jb of column
    atom ci, in column order, for each (k, ja) of the cluster in turn), with ``ccount[cl]``
    = (nc, nq, runs) and ``rcount[rad0[a] + ja]`` the runs of row (a, ja)."""
    s_cand = np.empty(1 << 12, np.int64)
    s_cq = np.empty(1 << 12, np.int64)
    s_cqk = np.empty(1 << 12, np.int64)
    s_run = np.empty(1 << 16, np.int32)
    s_cm = np.empty(1 << 16, np.uint8)  # the cluster's column masks (scratch)
    u_cand = 0
    u_cq = 0
    u_run = 0
    for cl in range(t0, t1):
        k0 = cl_ptr[cl]
        n = cl_ptr[cl + 1] - k0
        nc, nq = _k_columns(
            k0, n, cl_atoms, optr, oe_col, bptr, bq, pc, pm_off, pmask, segptr, seg_b, nrad,
            apos, cand, cq, cqk,
        )  # fmt: skip
        size = n * rmax * nc * rmax
        s_cm = _k_append(s_cm, 0, size)
        flat = s_cm[:size]
        flat[:] = 0
        cmask = flat.reshape((n, rmax, nc, rmax))
        _k_masks(
            k0,
            n,
            cl_atoms,
            optr,
            oe_p,
            oe_t,
            oe_col,
            om_off,
            omask,
            pc,
            pm_off,
            pmask,
            segptr,
            seg_b,
            seg_jb,
            seg_nrm,
            seg_nord,
            pnorm,
            cthr,
            nrad,
            apos,
            cmask,
            cq,
            cqk,
            nq,
        )
        u0 = u_run
        for k in range(n):
            a = cl_atoms[k0 + k]
            wk = 0
            for ja in range(nrad[a]):
                tot = 0
                s_run = _k_append(s_run, u_run, nc * rmax)
                u1 = u_run
                for ci in range(nc):
                    b = cand[ci]
                    for jb in range(nrad[b]):
                        if cmask[k, ja, ci, jb]:
                            tot += gw[rad0[b] + jb]
                            s_run[u_run] = ci * rmax + jb
                            u_run += 1
                L[rad0[a] + ja] = tot
                rcount[rad0[a] + ja] = u_run - u1
                wk += tot * gw[rad0[a] + ja]
            for e in range(bptr[a], bptr[a + 1]):
                wk += nao[a] * mc[pc[bq[e]]]
            work[a] = wk
        ccount[cl, 0] = nc
        ccount[cl, 1] = nq
        ccount[cl, 2] = u_run - u0
        s_cand = _k_append(s_cand, u_cand, nc)
        s_cand[u_cand : u_cand + nc] = cand[:nc]
        u_cand += nc
        s_cq = _k_append(s_cq, u_cq, nq)
        s_cqk = _k_append(s_cqk, u_cq, nq)
        s_cq[u_cq : u_cq + nq] = cq[:nq]
        s_cqk[u_cq : u_cq + nq] = cqk[:nq]
        u_cq += nq
        for ci in range(nc):
            apos[cand[ci]] = -1
    return s_cand[:u_cand], s_cq[:u_cq], s_cqk[:u_cq], s_run[:u_run]


def _k_fill(
    t0,
    t1,
    cl_ptr,
    cl_atoms,
    rank,
    paw,
    optr,
    oe_p,
    oe_t,
    oe_col,
    om_off,
    omask,
    bptr,
    bq,
    pc,
    pm_off,
    pmask,
    segptr,
    seg_b,
    seg_jb,
    seg_nrm,
    pnorm,
    cthr,
    seg_w,
    seg_col,
    seg_rank,
    nrad,
    rad0,
    gw,
    groff,
    gm0,
    nao,
    npr,
    L,
    rowbase,
    ooff,
    oblocks,
    oph,
    poff,
    pblocks,
    pph,
    mc,
    qoff,
    qflat,
    data,
    indices,
    c_cand,
    cc_ptr,
    c_cq,
    c_cqk,
    cq_ptr,
    c_run,
    cr_ptr,
    rcount,
    rmax,
    apos,
):
    """Indices of the rows of the atoms of clusters t0 <= cl < t1 and their values at the
    columns of atoms b with ``rank[b] >= cl`` (the other half is the conjugate transpose:
    :func:`_k_mirror`), at their place in the layout (exact zeros kept: :func:`_k_compact`).

    A cluster is a few nearby atoms (``rank`` of an atom: its cluster).  Its rows are summed
    in one dense buffer over the orbitals of the atoms b they reach with rank[b] >= cl: the
    two-centre blocks, then (``paw``) for each projector atom c that reaches the cluster
    one matrix product conj(P_c,rows)^T Q_c over the radial functions c reaches in such
    atoms (a trailing range: segments are sorted by rank); the buffer is then read out at
    the structural columns of each row (the column runs kept by :func:`_k_count`)."""
    dt = data.dtype
    bmem = np.empty(1 << 16, dt)  # buffers reused from cluster to cluster (no page faults)
    tmem = np.empty(1 << 16, dt)
    xmem = np.empty(1 << 12, dt)
    most = apos.shape[0] * rmax  # radial functions a row can reach
    run_g = np.empty(most, np.int64)
    run_b = np.empty(most, np.int64)
    run_w = np.empty(most, np.int64)
    for cl in range(t0, t1):
        k0 = cl_ptr[cl]
        n = cl_ptr[cl + 1] - k0
        nc = cc_ptr[cl + 1] - cc_ptr[cl]  # columns: the atoms any row of the cluster reaches
        nq = cq_ptr[cl + 1] - cq_ptr[cl]  # projector pairs (c, a) that reach its atoms
        cand = c_cand[cc_ptr[cl] : cc_ptr[cl + 1]]
        cq = c_cq[cq_ptr[cl] : cq_ptr[cl + 1]]
        cqk = c_cqk[cq_ptr[cl] : cq_ptr[cl + 1]]
        runs = c_run[cr_ptr[cl] : cr_ptr[cl + 1]]
        for ci in range(nc):
            apos[cand[ci]] = ci
        used = np.zeros(nc, np.bool_)
        for e in range(runs.shape[0]):
            used[runs[e] // rmax] = True
        # buffer columns of the used atoms with rank >= cl, in the order of the segments
        # (rank, atom), so that a projector's columns fall in long contiguous runs;
        # -1: columns mirrored later, or not stored; the last column collects what
        # projector products give to columns that are not stored
        coff = np.full(nc, -1, np.int64)
        key = np.empty(nc, np.int64)
        for ci in range(nc):
            key[ci] = rank[cand[ci]] * apos.shape[0] + cand[ci]
        ncol = 0
        for ci in np.argsort(key):
            if used[ci] and rank[cand[ci]] >= cl:
                coff[ci] = ncol
                ncol += nao[cand[ci]]
        sink = ncol
        ncol += 1
        roff = np.empty(n + 1, np.int64)
        roff[0] = 0
        for k in range(n):
            roff[k + 1] = roff[k] + nao[cl_atoms[k0 + k]]
        if roff[n] * ncol > bmem.shape[0]:
            bmem = np.empty(roff[n] * ncol * 5 // 4, dt)
        buf = bmem[: roff[n] * ncol].reshape((roff[n], ncol))
        buf[:] = 0.0
        for k in range(n):  # two-centre blocks
            a = cl_atoms[k0 + k]
            r0 = roff[k]
            na = nao[a]
            for e in range(optr[a], optr[a + 1]):
                p = oe_p[e]
                b = oe_col[e]
                c0 = coff[apos[b]]
                if c0 < 0:
                    continue
                tr = oe_t[e]
                ph = np.conj(oph[p]) if tr else oph[p]
                nb = nao[b]
                src = ooff[p]
                if tr:  # stored as (b, a): element (mu, nu) at nu * na + mu
                    for mu in range(na):
                        for nu in range(nb):
                            buf[r0 + mu, c0 + nu] += oblocks[src + nu * na + mu] * ph
                else:
                    for mu in range(na):
                        for nu in range(nb):
                            buf[r0 + mu, c0 + nu] += oblocks[src + mu * nb + nu] * ph
        if paw and nq:
            cs = np.empty(nq, np.int64)
            for u in range(nq):
                cs[u] = rank[pc[cq[u]]] * rank.shape[0] + pc[cq[u]]  # nearby c together
            order = np.argsort(cs, kind="mergesort")
            g = 0
            while g < nq:
                c = pc[cq[order[g]]]
                h = g
                while h < nq and cs[order[h]] == cs[order[g]]:
                    h += 1
                ni = npr[c]
                s0 = segptr[c]
                s1 = segptr[c + 1]
                sf = s0 + np.searchsorted(seg_rank[s0:s1], cl)  # first column kept
                if ni == 0 or sf == s1:
                    g = h
                    continue
                col0 = seg_col[sf]
                mw = mc[c] - col0
                nr = 0
                for u in range(g, h):
                    q = cq[order[u]]
                    a = cl_atoms[k0 + cqk[order[u]]]
                    for ja in range(nrad[a]):
                        if pmask[pm_off[q] + ja]:
                            nr += gw[rad0[a] + ja]
                if nr * ni > xmem.shape[0]:
                    xmem = np.empty(nr * ni * 5 // 4, dt)
                if 2 * mw > tmem.shape[0]:
                    tmem = np.empty(2 * mw * 5 // 4, dt)
                x = xmem[: nr * ni].reshape((nr, ni))
                xrow = np.empty(nr, np.int64)
                nr = 0
                for u in range(g, h):
                    q = cq[order[u]]
                    k = cqk[order[u]]
                    a = cl_atoms[k0 + k]
                    ph = np.conj(pph[q])
                    for ja in range(nrad[a]):
                        if not pmask[pm_off[q] + ja]:
                            continue
                        gg = rad0[a] + ja
                        for m in range(gw[gg]):
                            src = poff[q] + (groff[gg] + m) * ni
                            for i in range(ni):
                                x[nr, i] = np.conj(pblocks[src + i]) * ph
                            xrow[nr] = roff[k] + groff[gg] + m
                            nr += 1
                dcol = np.empty(mw, np.int64)  # buffer column of each column of t
                for s in range(sf, s1):
                    b = seg_b[s]
                    col = seg_col[s] - col0
                    if coff[apos[b]] < 0:  # an atom with no stored column in this cluster
                        for nu in range(seg_w[s]):
                            dcol[col + nu] = sink
                        continue
                    d = coff[apos[b]] + groff[rad0[b] + seg_jb[s]]
                    for nu in range(seg_w[s]):
                        dcol[col + nu] = d + nu
                t0 = tmem[:mw]
                t1 = tmem[mw : 2 * mw]
                for r in range(0, nr, 2):  # two rows of conj(P)^T Q_c at a time, added
                    r2 = min(r + 1, nr - 1)
                    _k_pq(x, r, r2, qflat, qoff[c], mc[c], col0, mw, t0, t1)
                    b0 = buf[xrow[r]]
                    if r2 > r:
                        b1 = buf[xrow[r2]]
                        for j in range(mw):
                            d = dcol[j]
                            b0[d] += t0[j]
                            b1[d] += t1[j]
                    else:
                        for j in range(mw):
                            b0[dcol[j]] += t0[j]
                g = h
        e0 = 0
        for k in range(n):  # read out at the structural columns, row by row
            a = cl_atoms[k0 + k]
            for ja in range(nrad[a]):
                gg = rad0[a] + ja
                lg = L[gg]
                base = rowbase[gg]
                br = roff[k] + groff[gg]
                nrun = 0  # runs of columns: (global column, buffer column or -1, width)
                for e in range(e0, e0 + rcount[gg]):
                    ci = runs[e] // rmax
                    b = cand[ci]
                    gb = rad0[b] + runs[e] % rmax
                    run_g[nrun] = gm0[gb]
                    run_b[nrun] = coff[ci] + groff[gb] if coff[ci] >= 0 else -1
                    run_w[nrun] = gw[gb]
                    nrun += 1
                e0 += rcount[gg]
                for m in range(gw[gg]):
                    dst = base + m * lg
                    row = buf[br + m]
                    for r in range(nrun):
                        col0 = run_g[r]
                        lc = run_b[r]
                        for nu in range(run_w[r]):
                            indices[dst + nu] = col0 + nu
                        if lc >= 0:
                            for nu in range(run_w[r]):
                                data[dst + nu] = row[lc + nu]
                        dst += run_w[r]
        for ci in range(nc):
            apos[cand[ci]] = -1


def _k_mirror(a0, a1, rank, nrad, rad0, gw, gm0, L, rowbase, orb_rad, rad_atom, data, indices, cur):
    """The values of the rows of atoms a0 <= a < a1 at the columns of atoms b with
    rank[b] < rank[a]: conj(S_ba)^T, read from the rows of b (written by _k_fill).  Rows are
    visited in order, so the place of column a in a row of b only moves forward
    (``cur``: per radial function, -1 before its first use)."""
    for a in range(a0, a1):
        for ja in range(nrad[a]):
            ga = rad0[a] + ja
            lg = L[ga]
            base = rowbase[ga]
            wa = gw[ga]
            target = gm0[ga]
            k = 0
            while k < lg:
                gb = orb_rad[indices[base + k]]
                wb = gw[gb]
                if rank[rad_atom[gb]] < rank[a]:
                    rb = rowbase[gb]
                    p = cur[gb]
                    if p < 0:
                        p = np.searchsorted(indices[rb : rb + L[gb]], target)
                    while indices[rb + p] < target:
                        p += 1
                    cur[gb] = p
                    p0 = rb + p
                    lb = L[gb]
                    for nu in range(wb):  # reads contiguous, writes in rows of a
                        for m in range(wa):
                            data[base + m * lg + k + nu] = np.conj(data[p0 + nu * lb + m])
                k += wb


def _k_compact(a0, a1, rad0, gw, gm0, L, rowbase, data, indices, rowcnt, drop):
    """Drop the elements with |value| <= ``drop`` (0: the exact zeros) of the rows of atoms
    a0 <= a < a1 in place, from the start of their range on; rowcnt receives each row's
    length.  Returns the end."""
    wp = rowbase[rad0[a0]]
    for g in range(rad0[a0], rad0[a1]):
        lg = L[g]
        for m in range(gw[g]):
            k0 = rowbase[g] + m * lg
            n = 0
            for k in range(k0, k0 + lg):
                if abs(data[k]) > drop:
                    data[wp] = data[k]
                    indices[wp] = indices[k]
                    wp += 1
                    n += 1
            rowcnt[gm0[g] + m] = n
    return wp


def _k_shift(data, indices, src, dst, n):
    """Move ``n`` entries from ``src`` down to ``dst`` <= src (overlapping, in place)."""
    for k in range(n):
        data[dst + k] = data[src + k]
        indices[dst + k] = indices[src + k]


_KERNELS = (
    "_k_orient",
    "_k_ppairs",
    "_k_rly",
    "_k_table",
    "_k_omask",
    "_k_pmask",
    "_k_q",
    "_k_pq",
    "_k_columns",
    "_k_segorder",
    "_k_nord",
    "_k_masks",
    "_k_append",
    "_k_count",
    "_k_fill",
    "_k_mirror",
    "_k_compact",
    "_k_shift",
)
_COMPILED: bool | None = None


def _compiled() -> bool:
    """Compile the kernels (once; numba's on-disk cache makes later processes cheap);
    False when numba is not installed."""
    global _COMPILED
    if _COMPILED is None:
        try:
            import numba
        except ImportError:
            _COMPILED = False
            return False
        g = globals()
        for name in _KERNELS:  # callees first: callers resolve them as compiled globals
            g[name] = numba.njit(cache=True, nogil=True)(g[name])
        _COMPILED = True
    return _COMPILED


_YL_TABLES: dict = {}


def _yl_table(lmax: int) -> tuple:
    """GPAW's r^l Y_L monomials for L < (lmax + 1)^2 as flat arrays for :func:`_k_rly`."""
    if lmax not in _YL_TABLES:
        from gpaw.sphere.spherical_harmonics import YL

        n_l = (lmax + 1) ** 2
        terms = [YL[L] for L in range(n_l)]
        flat = [(c, n) for t in terms for c, n in t]
        _YL_TABLES[lmax] = (
            np.array([c for c, _ in flat], float),
            np.array([n[0] for _, n in flat], np.int64),
            np.array([n[1] for _, n in flat], np.int64),
            np.array([n[2] for _, n in flat], np.int64),
            np.concatenate([[0], np.cumsum([len(t) for t in terms])]).astype(np.int64),
            n_l,
            lmax,
        )
    return _YL_TABLES[lmax]


def check_screen(screen) -> float:
    """``screen`` as a float, or a ValueError that says what is expected."""
    if isinstance(screen, bool) or not isinstance(screen, (int, float, np.integer, np.floating)):
        raise ValueError(f"screen must be a number (0: exact S, e.g. 1e-8), got {screen!r}")
    if not (np.isfinite(screen) and 0 <= screen < 1e-3):
        raise ValueError(
            f"screen={screen!r}: expected 0 (exact) or a small tolerance on the elements "
            f"of S in [0, 1e-3), such as 1e-8"
        )
    return float(screen)


_TERM_SHARE = 0.05  # the largest left-out projector term, as a fraction of ``screen``


def _screening(screen, omax, pnorm, pc, pb, nrad, codes, spc):
    """Which two-centre sub-blocks and projector segments enter S, and the |value| at
    or below which elements are dropped, for ``screen`` = e (0: exact, only exact zeros
    left out):

    * projector atom c adds p_am^T dO_c p_bn to S_(am, bn), at most
      |p_am| |dO_c|_2 |p_bn|.  A segment (c, radial function of atom a) is left out when
      that bound with the largest |p_bn| of c is <= e / 20 (``_TERM_SHARE``), and a pair
      of radial functions (of a and b) is not stored through c when the bound with their
      largest norms is <= e / 20 (``cthr`` holds e / (20 |dO_c|_2));
    * elements with |S| <= e / 2 are dropped, and so are two-centre sub-blocks whose
      largest element is <= e / 2 (when no projector term reaches them).

    An element can lose several projector terms, so the worst case is e / 2 plus e / 20
    per projector atom that reaches both orbitals; the terms left out are the far tails,
    orders of magnitude below e / 20, and the measured largest change of any element is
    within e (tests; 5.0e-9 for e = 1e-8 on 1000 atoms of the device structure,
    ``benchmarks/overlap_speed.py --screen``).
    """
    nat = len(codes)
    if not screen:
        return omax > 0, pnorm > 0, np.zeros(nat), 0.0
    half, term = 0.5 * screen, _TERM_SHARE * screen
    seg_c = np.repeat(pc, nrad[pb])  # sorted: projector pairs are sorted by c
    pmax = np.zeros(nat)
    if len(seg_c):
        starts = np.flatnonzero(np.r_[True, seg_c[1:] != seg_c[:-1]])
        pmax[seg_c[starts]] = np.maximum.reduceat(pnorm, starts)
    don = np.array([np.linalg.norm(s.dO, 2) if s.n_projectors else 0.0 for s in spc])[codes]
    with np.errstate(divide="ignore"):
        cthr = np.where(don > 0, term / don, np.inf)
    return omax > half, pnorm * (don * pmax)[seg_c] > term, cthr, half


class OverlapCalculator:
    """Sparse exact S(k) for structures made of the given species.

    >>> oc = OverlapCalculator(species)             # dict symbol -> SpeciesBasis
    >>> S = oc.overlap(atoms)                      # scipy.sparse CSR at Gamma
    >>> S_k = oc.overlap(atoms, kpts=[[0, 0, 0.25]])[0]

    ``chunk`` is the number of atom pairs whose blocks are evaluated at once (memory).
    ``engine``: 'numba' (compiled kernels, threads; numba must be installed), 'numpy'
    (no compiled code, several times slower and with more memory) or 'auto' (numba when
    installed).  ``threads``: threads of the compiled engine (default: the usable cores).
    Both engines give the same S (to rounding) with no explicit zeros.

    ``screen``: 0 (default) gives S exactly (GPAW's to rounding).  A small e > 0 drops the
    elements of S below e / 2 and leaves out projector terms below e / 20 (see
    :func:`_screening`; measured: every element within e of the exact one): at device
    scale most stored elements of the projector term P^T dO P are tiny products of
    projector tails, and e = 1e-8 stores about a third as many non-zeros, faster
    (``benchmarks/overlap_speed.py --screen``).
    The numpy engine only drops the elements <= e / 2.

    ``keep_buffers`` (compiled engine): keep the large scratch arrays of a call (the
    two-centre and projector blocks and their products, about 1.4 GB at 4000 atoms) for
    the next one, so that a new structure of a similar size writes into memory that is
    already mapped instead of fresh pages (``benchmarks/overlap_speed.py
    --new-structure``); :meth:`release_buffers` frees them.  False frees them after each
    call.  Calls on one calculator are serialised (a lock), so it may be shared by
    threads.
    """

    def __init__(
        self,
        species: dict,
        chunk: int = 20_000,
        engine: str = "auto",
        threads: int | None = None,
        screen: float = 0.0,
        keep_buffers: bool = True,
    ):
        self.species = {
            k: (v if isinstance(v, SpeciesBasis) else SpeciesBasis.from_dict(v))
            for k, v in species.items()
        }
        self.chunk = int(chunk)
        if engine not in ("auto", "numba", "numpy"):
            raise ValueError(f"engine={engine!r}: 'auto', 'numba' or 'numpy'")
        self.engine = engine
        self.screen = check_screen(screen)
        if threads is None:
            threads = usable_cores()
        self.threads = max(1, int(threads))
        self.cluster = 8  # atoms per group of rows assembled together (compiled engine)
        self.fill_ranges = 32  # ranges of clusters per thread in the buffer pass (balance)
        self.timings: dict = {}
        self._expansions: dict = {}
        self.keep_buffers = bool(keep_buffers)
        self._buffers: dict = {}
        self._lock = threading.RLock()

    def __getstate__(self):  # pickle / deepcopy: no lock, no kept arrays, no GPAW splines
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_buffers"] = {}
        state["_expansions"] = {}  # a cache (GPAW's splines do not pickle): made again
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def release_buffers(self) -> None:
        """Free the scratch arrays kept from the last call (``keep_buffers``)."""
        with self._lock:
            self._buffers.clear()

    def _buffer(self, name: str, n: int, dtype=float, zero: bool = False) -> np.ndarray:
        """A 1D scratch array of ``n`` elements (zeroed when ``zero``): a view of the
        one kept under ``name`` when it is large enough, else a new one (kept when
        ``keep_buffers``).  Never part of a result."""
        dtype = np.dtype(dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < n:
            self._buffers.pop(name, None)  # free the old one first
            if not self.keep_buffers:
                return np.zeros(n, dtype) if zero else np.empty(n, dtype)
            buf = self._buffers[name] = np.empty(n, dtype)
        out = buf[:n]
        if zero:
            out.fill(0)
        return out

    # -- per-structure setup -------------------------------------------------
    def _check(self, atoms: Atoms) -> list[str]:
        symbols = atoms.get_chemical_symbols()
        missing = sorted(set(symbols) - set(self.species))
        if missing:
            raise BasisDataError(
                f"no basis functions for element(s) {missing}; available: "
                f"{sorted(self.species, key=lambda s: atomic_numbers[s])}"
            )
        return symbols

    def _transformer(self, present):
        # GPAW's rule (TCIExpansions): one Fourier-Bessel grid for the whole
        # calculation, sized by the longest basis function or projector present.
        rc = [
            max(
                [b[1] for b in self.species[s].basis]
                + [p[1] for p in self.species[s].projectors]
                + [1e-3]
            )
            for s in present
        ]
        return max(rc + [1e-3])

    def _expansion(self, kind, s1, s2, rcut):
        key = (kind, s1, s2, rcut)
        if key not in self._expansions:
            from gpaw.lcao.overlap import FourierTransformer, TwoSiteOverlapCalculator

            ft_key = ("ft", rcut)
            if ft_key not in self._expansions:
                self._expansions[ft_key] = TwoSiteOverlapCalculator(
                    FourierTransformer(rcut=rcut, N=2**10)
                )
            tsoc = self._expansions[ft_key]
            a = splines(self.species[s1], "projectors" if kind == "P" else "basis")
            b = splines(self.species[s2], "basis")
            fb = tsoc.transform(b)
            if kind == "T":  # <phi_a| -nabla^2 / 2 |phi_b>: k^2 / 2 in Fourier space
                fb = tsoc.laplacian(fb)
            tsoe = tsoc.calculate_expansions(
                [f.l for f in a], tsoc.transform(a), [f.l for f in b], fb
            )
            self._expansions[key] = tsoe
        return self._expansions[key]

    def _table(self, kind, s1, s2, rcut) -> _PairTable:
        key = ("table", kind, s1, s2, rcut)
        if key not in self._expansions:
            self._expansions[key] = _PairTable(self._expansion(kind, s1, s2, rcut))
        return self._expansions[key]

    def _blocks(self, kind, codes, i, j, D, rcut):
        """Evaluate all blocks grouped by species pair and in chunks of ``self.chunk``
        pairs; yields (pair indices, blocks (n, n1, n2)).  ``codes`` are species indices
        into ``self._present``; D in Angstrom."""
        if not len(i):
            return
        nsp = len(self._present)
        group = codes[i] * nsp + codes[j]
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(nsp * nsp + 1))
        for g in range(nsp * nsp):
            sel = order[bounds[g] : bounds[g + 1]]
            if not len(sel):
                continue
            s1, s2 = self._present[g // nsp], self._present[g % nsp]
            table = self._table(kind, s1, s2, rcut)
            for c in range(0, len(sel), self.chunk):
                part = sel[c : c + self.chunk]
                vec = D[part] / Bohr
                r = np.linalg.norm(vec, axis=1)
                if not len(table.B):
                    blocks = np.zeros((len(part),) + table.shape)
                else:
                    blocks = table.evaluate(r, _real_harmonics(vec, table.lmax))
                yield part, blocks.reshape((len(part),) + table.shape)

    def two_centre_blocks(self, kind: str, s1: str, s2: str, vectors) -> np.ndarray:
        """Two-centre blocks of species ``s1`` (rows) and ``s2`` (columns) at the
        vectors (P, 3) from the first atom to the second, Angstrom: ``'O'`` the
        overlap <phi_a|phi_b> (no PAW term), ``'T'`` the kinetic energy
        <phi_a| -nabla^2 / 2 |phi_b> in eV.  GPAW orbital order, (P, n1, n2).

        One Fourier-Bessel grid for all species of this calculator (GPAW's rule
        for one calculation with all of them), so the blocks of a species pair
        do not depend on which other elements a structure holds."""
        if kind not in ("O", "T"):
            raise ValueError(f"kind={kind!r}: 'O' (overlap) or 'T' (kinetic)")
        for s in (s1, s2):
            if s not in self.species:
                raise BasisDataError(f"no basis functions for element {s!r}")
        vec = np.asarray(vectors, dtype=float).reshape(-1, 3) / Bohr
        table = self._table(kind, s1, s2, self._transformer(sorted(self.species)))
        if not len(vec) or not len(table.B):
            return np.zeros((len(vec),) + table.shape)
        r = np.linalg.norm(vec, axis=1)
        out = table.evaluate(r, _real_harmonics(vec, table.lmax)).reshape((len(vec),) + table.shape)
        return out * Hartree if kind == "T" else out

    # -- the two parts of S ----------------------------------------------------
    def _add_two_centre(self, data, lay, codes, pairs, rcut, phase):
        """data += <phi|phi> blocks: on-site (given in ``pairs`` with S = 0) and each
        canonical pair (i, j, S) at (i, j) and, transposed and conjugated, at (j, i)."""
        i, j, S, D, onsite = pairs
        for part, blocks in self._blocks("O", codes, i, j, D, rcut):
            a, b = i[part], j[part]
            n1, n2 = blocks.shape[1:]
            if phase is not None:
                blocks = blocks * phase[part][:, None, None]
            mu, nu = np.arange(n1), np.arange(n2)
            for direct in (True, False):
                if direct:
                    ra, rb, vals = a, b, blocks
                else:
                    off = ~onsite[part]
                    ra, rb = b[off], a[off]
                    vals = blocks[off]
                    vals = vals.conj() if phase is not None else vals
                if not len(ra):
                    continue
                ent = lay.entry(ra, rb)
                start = lay.rowbase[ra] + lay.coloff[ent]
                L = lay.L[ra]
                if direct:  # element (mu, nu) at row mu of atom a, column nu of atom b
                    idx = (
                        start[:, None, None]
                        + mu[None, :, None] * L[:, None, None]
                        + nu[None, None, :]
                    )
                else:  # element (mu, nu) at row nu of atom b, column mu of atom a
                    idx = (
                        start[:, None, None]
                        + nu[None, None, :] * L[:, None, None]
                        + mu[None, :, None]
                    )
                _scatter_add(
                    data,
                    idx.ravel(),
                    np.ascontiguousarray(vals).ravel(),
                    len(np.unique(ent)) == len(ent),
                )
                del idx
        return data

    def _projector_blocks(self, codes, pairs, rcut, nao, npr):
        """<p_c|phi_b> for all directed (c, b, S) (sorted by c), stored transposed and
        concatenated: rows ``start[c]:start[c+1]`` of the (sum, ni_c) array of atom c are
        ``P_c^T`` (m_c, ni_c), m_c the orbitals of all b seen by c."""
        c, b, S, D = pairs
        sizes = nao[b] * npr[c]
        off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        flat = np.zeros(int(off[-1]))
        for part, blocks in self._blocks("P", codes, c, b, D, rcut):
            n_i, n_b = blocks.shape[1:]
            idx = off[part][:, None] + np.arange(n_i * n_b)[None, :]
            flat[idx] = blocks.transpose(0, 2, 1).reshape(len(part), -1)
        return flat, off

    def _add_paw(self, data, lay, pairs, flat, off, npr, symbols, phase, order):
        """data += sum_c P_c^H dO^c P_c: one dense product per projector atom c over the
        orbitals that c's projectors reach (columns of P_c that are exactly zero, i.e.
        radial functions shorter than the distance, are dropped: exact), added with one
        scatter per c.  ``order``: the projector atoms in a spatially local order (cache)."""
        c_all, b_all = pairs[0], pairs[1]
        nao = lay.nao
        cstart = np.searchsorted(c_all, np.arange(lay.nat + 1))
        for c in order:
            p0, p1 = cstart[c], cstart[c + 1]
            ni = int(npr[c])
            if p0 == p1 or not ni:
                continue
            nb = b_all[p0:p1]
            counts = nao[nb]
            PT = flat[off[p0] : off[p1]].reshape(-1, ni)  # (m_c, ni) = P_c^T
            keep = np.flatnonzero(PT.any(axis=1))  # orbitals c reaches
            if not len(keep):
                continue
            PT = PT[keep]
            owner = np.repeat(np.arange(len(nb)), counts)[keep]  # neighbour entry
            local = (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))[
                keep
            ]
            if phase is not None:
                PT = PT * phase[p0:p1][owner][:, None]
            dO = self.species[symbols[c]].dO
            R = PT.conj() @ (PT @ dO.T).T  # (m, m)
            n = len(nb)
            coloff = lay.coloff[lay.entry(np.repeat(nb, n), np.tile(nb, n))].reshape(n, n)
            atom = nb[owner]
            rowstart = lay.rowbase[atom] + local * lay.L[atom]
            idx = coloff[owner][:, owner]
            idx += rowstart[:, None]
            idx += local[None, :]
            np.add.at(data, idx.ravel(), R.ravel())
        return data

    def overlap(self, atoms: Atoms, kpts=None, parts: bool = False, screen: float | None = None):
        """Sparse S at Gamma (``kpts=None``: one real CSR matrix) or a list of
        complex CSR matrices, one per scaled k-point in ``kpts`` (n, 3).
        ``screen``: this call's tolerance (default: the calculator's ``screen``).

        ``parts=True`` returns ``(S, O, P, dO)`` for Gamma (diagnostics).  The stage
        times of the last call are in ``self.timings`` (seconds).
        """
        with self._lock:
            return self._overlap(atoms, kpts, parts, screen)

    def _overlap(self, atoms, kpts, parts, screen):
        t0 = time.perf_counter()
        screen = self.screen if screen is None else check_screen(screen)
        self.timings = {}
        self.thread_times: dict = {}
        symbols = self._check(atoms)
        self._present = sorted(set(symbols))
        codes = (
            np.array([self._present.index(s) for s in symbols], np.int64)
            if symbols
            else np.zeros(0, np.int64)
        )
        sb = [self.species[s] for s in symbols]
        rc = np.array([s.rc for s in sb])
        rp = np.array([s.projector_rc for s in sb])
        opairs, ppairs = self._pairs(atoms, rc, rp, self._use_compiled())
        self._lap("neighbours", t0)
        run = self._overlap_compiled if self._use_compiled() else self._overlap_numpy
        with single_threaded_blas():  # many small products: BLAS threads only cost
            out = run(atoms, symbols, codes, opairs, ppairs, kpts, parts, screen)
        self.timings["total"] = time.perf_counter() - t0
        return out

    def _use_compiled(self) -> bool:
        if self.engine == "numpy":
            return False
        if _compiled():
            return True
        if self.engine == "numba":
            raise ImportError("engine='numba' needs numba (pip install numba)")
        return False

    def _lap(self, stage: str, since: float) -> float:
        """Add the time since ``since`` to ``timings[stage]``; returns now."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - since
        return now

    def _overlap_numpy(self, atoms, symbols, codes, opairs, ppairs, kpts, parts, screen):
        """Engine without numba: atom-level CSR layout, numpy scatters."""
        t = time.perf_counter()
        rcut = self._transformer(self._present)
        nat = len(atoms)
        sb = [self.species[s] for s in symbols]
        nao = np.array([s.n_orbitals for s in sb], np.int64)
        npr = np.array([s.n_projectors for s in sb], np.int64)
        kpts_arr = np.zeros((1, 3)) if kpts is None else np.asarray(kpts, float).reshape(-1, 3)
        flat, off = self._projector_blocks(codes, ppairs, rcut, nao, npr)
        t = self._lap("projector blocks", t)
        lay = _Layout(nao, self._pattern(nat, opairs, ppairs, npr))
        t = self._lap("layout", t)
        out = []
        for k in kpts_arr:
            gamma = not np.any(k)
            ph_o = None if gamma else np.exp(2j * np.pi * (opairs[2] @ k))
            ph_p = None if gamma else np.exp(2j * np.pi * (ppairs[2] @ k))
            data = np.zeros(lay.nnz, float if gamma else complex)
            self._add_two_centre(data, lay, codes, opairs, rcut, ph_o)
            t = self._lap("two-centre", t)
            if parts and kpts is None:
                O = lay.csr(data.copy())
                O.eliminate_zeros()
            self._add_paw(data, lay, ppairs, flat, off, npr, symbols, ph_p, _local_order(atoms))
            t = self._lap("projector term", t)
            if screen:  # this engine only drops small elements (<= screen / 2)
                data[np.abs(data) <= 0.5 * screen] = 0.0
            S = lay.csr(data)
            S.eliminate_zeros()
            t = self._lap("csr", t)
            if parts and kpts is None:
                return (
                    S,
                    O,
                    self._projector_matrix(ppairs, flat, off, nao, npr),
                    self._dO_matrix(symbols, npr),
                )
            out.append(S)
        return out[0] if kpts is None else out

    # -- compiled engine -------------------------------------------------------
    def _sparse_table(self, kind, s1, s2, rcut):
        """(table, its non-zeros as kernel arrays, its GPAW splines)."""
        key = ("sparse", kind, s1, s2, rcut)
        if key not in self._expansions:
            tab = self._table(kind, s1, s2, rcut)
            rows, cols = np.nonzero(tab.B)
            n1, n2 = tab.shape
            a, b = np.divmod(cols, n2)
            self._expansions[key] = (
                tab,
                tab.row_t.astype(np.int64),
                tab.row_L.astype(np.int64),
                rows.astype(np.int64),
                cols.astype(np.int64),
                (b * n1 + a).astype(np.int64),
                tab.B[rows, cols],
            )
        return self._expansions[key]

    def _evaluate(self, kind, codes, i, j, D, rcut, out, base, transpose):
        """Blocks of all pairs (i, j) (D in Angstrom), species pair by species pair in
        chunks of ``self.chunk`` pairs, added at ``out[base[p]:]`` row-major, (n_i, n_j) or
        with ``transpose`` (n_j, n_i)."""
        if not len(i):
            return
        nsp = len(self._present)
        group = codes[i] * nsp + codes[j]
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(nsp * nsp + 1))
        chunk = max(256, min(self.chunk, len(i) // (4 * self.threads) + 1))
        pending: list = []
        with ThreadPoolExecutor(self.threads) as ex:
            for g in range(nsp * nsp):
                sel = order[bounds[g] : bounds[g + 1]]
                if not len(sel):
                    continue
                s1, s2 = self._present[g // nsp], self._present[g % nsp]
                tab, row_t, row_l, nz_row, dst, dst_t, val = self._sparse_table(kind, s1, s2, rcut)
                if not len(val):
                    continue
                for c in range(0, len(sel), chunk):
                    part = sel[c : c + chunk]
                    vec = np.ascontiguousarray(D[part]) / Bohr
                    r = np.linalg.norm(vec, axis=1)
                    s = np.empty((len(tab.splines), len(part)))
                    for t, spline in enumerate(tab.splines):  # GPAW's splines (C, GIL)
                        spline.spline.map(r, s[t])  # in place (the kernel drops tiny ones)
                    while len(pending) > 2 * self.threads:  # bounded memory
                        pending.pop(0).result()
                    args = (vec, *_yl_table(tab.lmax), s, row_t, row_l, nz_row)
                    args += (dst_t if transpose else dst, val, base[part], out)
                    pending.append(ex.submit(_k_table, *args))
            for f in pending:
                f.result()

    def _threads(self, fn, bounds, *args, scratch=None):
        """fn(bounds[t], bounds[t + 1], *args, *scratch(t)) for each range t, in
        ``self.threads`` threads, each taking the next range when it is done (more ranges
        than threads balance work that cannot be estimated well); the seconds each
        thread worked are added to ``self.thread_times[fn name]``."""
        n = len(bounds) - 1
        extra = scratch or (lambda t: ())
        name = getattr(fn, "__name__", "kernel")
        nt = max(1, min(self.threads, n))
        times = self.thread_times.setdefault(name, [0.0] * nt)
        ids: dict = {}  # worker thread -> its slot in times
        lock = threading.Lock()

        def run(t):
            t0 = time.perf_counter()
            out = fn(bounds[t], bounds[t + 1], *args, *extra(t))
            with lock:
                w = ids.setdefault(threading.get_ident(), len(ids)) % nt
                times[w] += time.perf_counter() - t0
            return out

        if nt == 1:
            return [run(t) for t in range(n)]
        with ThreadPoolExecutor(nt) as ex:
            return list(ex.map(run, range(n)))

    def _split(self, weights, ptr=None, members=None, per_thread=1) -> np.ndarray:
        """Bounds of ``per_thread * self.threads`` contiguous ranges of about equal total
        weight; with ``ptr``, weights are per element of groups ``ptr[i]:ptr[i + 1]``
        (elements ``members`` of the weights) and the bounds are group indices."""
        weights = np.asarray(weights, float)
        if members is not None:
            weights = weights[members]
        if ptr is not None:
            weights = np.add.reduceat(weights, ptr[:-1]) if len(weights) else weights
            weights[np.diff(ptr) == 0] = 0.0
        n = max(1, min(self.threads * per_thread, len(weights)))
        cum = np.cumsum(weights)
        if not len(cum) or cum[-1] <= 0:
            return np.linspace(0, len(weights), n + 1).astype(np.int64)
        inner = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n)
        return np.concatenate([[0], inner, [len(weights)]]).astype(np.int64)

    def _overlap_compiled(self, atoms, symbols, codes, opairs, ppairs, kpts, parts, screen):
        """Engine with numba kernels: S written once, radial function by radial function,
        in sorted CSR order, in threads over atoms (see the kernels' notes)."""
        t = time.perf_counter()
        rcut = self._transformer(self._present)
        nat = len(atoms)
        i64 = np.int64
        spc = [self.species[s] for s in self._present]
        l_sp = [np.array(s.l, i64) for s in spc]
        w_sp = [2 * l + 1 for l in l_sp]
        r_sp = [np.concatenate([[0], np.cumsum(w)[:-1]]).astype(i64) for w in w_sp]
        nrad = np.array([len(l) for l in l_sp], i64)[codes]
        nao = np.array([s.n_orbitals for s in spc], i64)[codes]
        npr = np.array([s.n_projectors for s in spc], i64)[codes]
        rad0 = np.concatenate([[0], np.cumsum(nrad)]).astype(i64)
        am0 = np.concatenate([[0], np.cumsum(nao)]).astype(i64)
        cat = lambda arrs: np.concatenate([arrs[c] for c in codes]) if nat else np.zeros(0, i64)  # noqa: E731
        gw = cat(w_sp).astype(i64)
        groff = cat(r_sp).astype(i64)
        gm0 = (np.repeat(am0[:-1], nrad) + groff).astype(i64)
        do_flat = np.concatenate([s.dO.ravel() for s in spc] + [np.zeros(0)])
        do_off = np.concatenate([[0], np.cumsum([s.dO.size for s in spc])]).astype(i64)
        rmax = int(nrad.max(initial=1))

        # two-centre pairs grouped by species pair; their blocks and radial masks
        oi, oj, oS, oD, onsite = opairs
        order = np.argsort(codes[oi] * len(spc) + codes[oj], kind="stable")
        oi, oj, oS, oD, onsite = oi[order], oj[order], oS[order], oD[order], onsite[order]
        osize = nao[oi] * nao[oj]
        ooff = np.concatenate([[0], np.cumsum(osize)]).astype(i64)
        oblocks = self._buffer("oblocks", int(ooff[-1]), zero=True)
        self._evaluate("O", codes, oi, oj, oD, rcut, oblocks, ooff, False)
        t = self._lap("two-centre integrals", t)
        pc, pb, pS, pD = ppairs
        psize = nao[pb] * npr[pc]
        poff = np.concatenate([[0], np.cumsum(psize)]).astype(i64)
        pblocks = self._buffer("pblocks", int(poff[-1]), zero=True)
        self._evaluate("P", codes, pc, pb, pD, rcut, pblocks, poff, True)
        t = self._lap("projector integrals", t)

        om_off = np.concatenate([[0], np.cumsum(nrad[oi] * nrad[oj])]).astype(i64)
        omax = self._buffer("omax", int(om_off[-1]))
        oargs = (oi, oj, ooff, om_off, nao, nrad, rad0, gw, groff, oblocks, omax)
        self._threads(_k_omask, self._split(osize), *oargs)
        pm_off = np.concatenate([[0], np.cumsum(nrad[pb])]).astype(i64)
        pnorm = self._buffer("pnorm", int(pm_off[-1]))
        pargs = (pc, pb, poff, pm_off, npr, nrad, rad0, gw, groff, pblocks, pnorm)
        self._threads(_k_pmask, self._split(psize), *pargs)
        omask, pmask, cthr, drop = _screening(screen, omax, pnorm, pc, pb, nrad, codes, spc)
        # clusters of nearby atoms, assembled together; rank: an atom's cluster
        cl_ptr, cl_atoms = _clusters(atoms, self.cluster)
        rank = np.empty(nat, i64)
        rank[cl_atoms] = np.repeat(np.arange(len(cl_ptr) - 1), np.diff(cl_ptr))
        # segments: the radial functions each projector atom c reaches, by rank of atom
        sidx = np.flatnonzero(pmask)
        seg_q = (np.searchsorted(pm_off, sidx, side="right") - 1).astype(i64)
        seg_jb = sidx - pm_off[seg_q]
        seg_b = pb[seg_q]
        segptr = np.searchsorted(pc[seg_q], np.arange(nat + 1)).astype(i64)  # pc is sorted
        o = np.empty(len(sidx), i64)
        self._threads(_k_segorder, self._split(np.diff(segptr) + 1), segptr, rank, seg_b, o)
        seg_q, seg_jb, seg_b = seg_q[o], seg_jb[o], seg_b[o]
        seg_nrm = pnorm[sidx[o]]
        seg_rank = rank[seg_b]
        sg = rad0[seg_b] + seg_jb
        seg_w, seg_row = gw[sg], groff[sg]
        seg_c = pc[seg_q]
        excl = np.cumsum(seg_w) - seg_w
        seg_col = (excl - excl[segptr[seg_c]]).astype(i64) if len(sidx) else excl
        mc = np.bincount(seg_c, weights=seg_w, minlength=nat).astype(i64)
        qoff = np.concatenate([[0], np.cumsum(npr * mc)]).astype(i64)
        # two-centre blocks by row atom (both orientations), projector pairs by orbital atom
        off = ~onsite
        npair = np.arange(len(oi), dtype=i64)
        rows = np.concatenate([oi, oj[off]])
        o = np.argsort(rows, kind="stable")
        oe_col = np.concatenate([oj, oi[off]])[o]
        oe_p = np.concatenate([npair, npair[off]])[o]
        oe_t = np.concatenate([np.zeros(len(oi), np.bool_), np.ones(int(off.sum()), np.bool_)])[o]
        optr = np.searchsorted(rows[o], np.arange(nat + 1)).astype(i64)
        bq = np.argsort(pb, kind="stable").astype(i64)
        bptr = np.searchsorted(pb[bq], np.arange(nat + 1)).astype(i64)
        t = self._lap("masks and lists", t)

        def scratch(t):
            return (
                np.full(nat, -1, i64),
                np.empty(nat, i64),
                np.empty(len(pc), i64),
                np.empty(len(pc), i64),
            )

        common = (optr, oe_p, oe_t, oe_col, om_off, omask, bptr, bq, pc, pm_off, pmask)
        seg_nord = np.empty(len(seg_nrm), i64)
        self._threads(_k_nord, self._split(np.diff(segptr) + 1), segptr, seg_nrm, seg_nord)
        common += (segptr, seg_b, seg_jb, seg_nrm, pnorm, cthr)
        L = np.zeros(len(gw), i64)
        work = np.zeros(nat, i64)
        ncl = len(cl_ptr) - 1
        ccount = np.zeros((ncl, 3), i64)
        rcount = np.zeros(len(gw), i64)
        bounds = self._split(nao * (np.diff(optr) + np.diff(bptr)) + 1, cl_ptr, cl_atoms)
        cargs = (seg_nord, nrad, rad0, gw, nao, mc, L, work, ccount, rcount, rmax)
        kept = self._threads(_k_count, bounds, cl_ptr, cl_atoms, *common, *cargs, scratch=scratch)
        # each cluster's columns, projector pairs and column runs, for the fill
        c_cand, c_cq, c_cqk, c_run = (np.concatenate([k[i] for k in kept]) for i in range(4))
        del kept  # the threads' stores (up to twice their size)
        cc_ptr = np.concatenate([[0], np.cumsum(ccount[:, 0])]).astype(i64)
        cq_ptr = np.concatenate([[0], np.cumsum(ccount[:, 1])]).astype(i64)
        cr_ptr = np.concatenate([[0], np.cumsum(ccount[:, 2])]).astype(i64)
        rowbase = np.concatenate([[0], np.cumsum(gw * L)]).astype(i64)
        nnz = int(rowbase[-1])
        nM = int(am0[-1])
        idx_t = np.int32 if max(nnz, nM) < 2**31 - 1 else i64
        # work of a cluster: its atoms' work times the fraction of columns it computes
        e_row = np.repeat(np.arange(nat), np.diff(optr))
        upper = np.bincount(e_row, rank[oe_col] >= rank[e_row], minlength=nat)
        frac = (upper + 1) / (np.diff(optr) + 1)
        cbounds = self._split(work * frac + 1, cl_ptr, cl_atoms, self.fill_ranges)
        orb_rad = np.repeat(np.arange(len(gw), dtype=i64), gw)
        rad_atom = np.repeat(np.arange(nat, dtype=i64), nrad)
        abounds = self._split(gw * L, rad0)
        t = self._lap("pattern", t)

        def fill(paw: bool, dtype, oph, pph, qflat):
            data = np.empty(nnz, dtype)
            indices = np.empty(nnz, idx_t)
            rowcnt = np.empty(nM, idx_t)

            def scratch_fill(t):
                return (np.full(nat, -1, i64),)

            args = (cl_ptr, cl_atoms, rank, paw) + common
            args += (seg_w, seg_col, seg_rank, nrad, rad0, gw, groff, gm0, nao, npr, L)
            args += (rowbase, ooff, oblocks, oph, poff, pblocks, pph, mc, qoff, qflat)
            args += (
                data,
                indices,
                c_cand,
                cc_ptr,
                c_cq,
                c_cqk,
                cq_ptr,
                c_run,
                cr_ptr,
                rcount,
                rmax,
            )
            tf = time.perf_counter()
            self._threads(_k_fill, cbounds, *args, scratch=scratch_fill)
            tf = self._lap("  rows, half (dense buffers)", tf)
            mir = (rank, nrad, rad0, gw, gm0, L, rowbase, orb_rad, rad_atom, data, indices)
            self._threads(_k_mirror, abounds, *mir, scratch=lambda t: (np.full(len(gw), -1, i64),))
            tf = self._lap("  rows, other half (conjugate transpose)", tf)
            ends = self._threads(
                _k_compact, abounds, rad0, gw, gm0, L, rowbase, data, indices, rowcnt, drop
            )
            end = ends[0]
            for b, e in zip(abounds[1:-1], ends[1:]):  # close the gaps between threads
                start = int(rowbase[rad0[b]])
                if start != end:
                    _k_shift(data, indices, start, end, e - start)
                end += e - start
            indptr = np.empty(nM + 1, idx_t)
            indptr[0] = 0
            np.cumsum(rowcnt, out=indptr[1:])
            self._lap("  zeros dropped", tf)
            M = sp.csr_matrix((data[:end], indices[:end], indptr), shape=(nM, nM), copy=False)
            M.has_sorted_indices = True
            return M

        kpts_arr = np.zeros((1, 3)) if kpts is None else np.asarray(kpts, float).reshape(-1, 3)
        out = []
        for k in kpts_arr:
            gamma = not np.any(k)
            dtype = float if gamma else complex
            oph = np.ones(len(oi)) if gamma else np.exp(2j * np.pi * (oS @ k))
            pph = np.ones(len(pc)) if gamma else np.exp(2j * np.pi * (pS @ k))
            qflat = self._buffer("qflat", int(qoff[-1]), dtype)
            qargs = (npr, codes, do_flat, do_off, segptr, seg_q, seg_row, seg_w, seg_col, mc)
            self._threads(
                _k_q, self._split(npr * npr * mc + 1), *qargs, qoff, poff, pblocks, pph, qflat
            )
            t = self._lap("projector products", t)

            S = fill(True, dtype, oph, pph, qflat)
            t = self._lap("assembly", t)
            if parts and kpts is None:
                O = fill(False, dtype, oph, pph, qflat)
                t = self._lap("two-centre only (parts)", t)
                return (
                    S,
                    O,
                    self._projector_matrix(ppairs, pblocks, poff, nao, npr),
                    self._dO_matrix(symbols, npr),
                )
            out.append(S)
        return out[0] if kpts is None else out

    # -- helpers of overlap() ----------------------------------------------
    @staticmethod
    def _pairs(atoms, rc, rp, compiled=False):
        """Two-centre pairs ``(i, j, S, D, onsite)`` (on-site blocks first, then canonical
        pairs with d < rc_i + rc_j) and projector pairs ``(c, b, S, D)`` (all directed
        pairs with d < rp_c + rc_b, including (c, c, 0), sorted by c then b);
        ``compiled``: with the compiled kernels (the same pairs in the same order)."""
        nat = len(atoms)
        i, j, S, D, d = _neighbour_pairs(atoms, np.maximum(rc, rp), compiled)
        ar = np.arange(nat, dtype=np.int64)
        z3i, z3 = np.zeros((nat, 3), np.int64), np.zeros((nat, 3))
        ko = d < rc[i] + rc[j]
        opairs = (
            np.concatenate([ar, i[ko]]),
            np.concatenate([ar, j[ko]]),
            np.concatenate([z3i, S[ko]]),
            np.concatenate([z3, D[ko]]),
            np.concatenate([np.ones(nat, bool), np.zeros(int(ko.sum()), bool)]),
        )
        if compiled:
            return opairs, _k_ppairs(nat, i, j, S, D, d, rc, rp)
        fwd = d < rp[i] + rc[j]
        bwd = d < rp[j] + rc[i]
        c = np.concatenate([ar, i[fwd], j[bwd]])
        b = np.concatenate([ar, j[fwd], i[bwd]])
        Sp = np.concatenate([z3i, S[fwd], -S[bwd]])
        Dp = np.concatenate([z3, D[fwd], -D[bwd]])
        order = np.lexsort((b, c))
        return opairs, (c[order], b[order], Sp[order], Dp[order])

    @staticmethod
    def _pattern(nat, opairs, ppairs, npr) -> sp.csr_matrix:
        """Atom-level pattern of S: two-centre pairs (both ways) and every pair of atoms
        seen by one projector atom (P^T P at atom level)."""
        i, j = opairs[0], opairs[1]
        one = np.ones(len(i), np.float32)
        A = sp.csr_matrix((one, (i, j)), shape=(nat, nat))
        c, b = ppairs[0], ppairs[1]
        has = npr[c] > 0
        Pa = sp.csr_matrix(
            (np.ones(int(has.sum()), np.float32), (c[has], b[has])), shape=(nat, nat)
        )
        return (A + A.T + Pa.T @ Pa).tocsr()

    @staticmethod
    def _projector_matrix(ppairs, flat, off, nao, npr) -> sp.csr_matrix:
        """P (n_projectors, n_orbitals) at Gamma as CSR (diagnostics)."""
        c, b = ppairs[0], ppairs[1]
        I0 = np.concatenate([[0], np.cumsum(npr)])
        M0 = np.concatenate([[0], np.cumsum(nao)])
        cols, rows, _ = block_indices(nao[b], npr[c], M0[b], I0[c])  # transposed blocks
        P = sp.coo_matrix((flat, (rows, cols)), shape=(int(I0[-1]), int(M0[-1]))).tocsr()
        P.eliminate_zeros()
        return P

    def _dO_matrix(self, symbols, npr) -> sp.csr_matrix:
        if not npr.sum():
            return sp.csr_matrix((0, 0))
        return sp.block_diag(
            [self.species[s].dO for s in symbols if self.species[s].n_projectors], format="csr"
        )


def basis_for_registry(registry, xc: str, setups="paw") -> dict:
    """{symbol: SpeciesBasis} from the installed GPAW data, checked against the
    registry's basis names, angular momenta and radii (Angstrom, 1e-6)."""
    if not isinstance(setups, str):
        raise BasisDataError(
            f"setups={setups!r}: only one setup type for all elements "
            f"(a string such as 'paw') is supported"
        )
    out = {}
    for e in registry.species:
        sb = species_from_gpaw([e["symbol"]], xc=xc, basis=e["name"], setups=setups)
        sb = sb[e["symbol"]]
        if tuple(sb.l) != tuple(e["l"]) or abs(sb.rc - e["rc"]) > 1e-6:
            raise BasisDataError(
                f"{e['symbol']}: the installed GPAW basis {e['name']!r} has l={sb.l}, "
                f"rc={sb.rc:.6f} A but the training data used l={list(e['l'])}, "
                f"rc={e['rc']:.6f} A; install the GPAW data the dataset was made with"
            )
        out[e["symbol"]] = sb
    return out
