"""Exact LCAO overlap matrices S(k) for any structure, without an SCF.

The PAW-LCAO overlap is

    S_mu,nu(k) = <phi_mu | phi_nu>(k) + sum_a sum_ij <phi_mu|p_ai> dO^a_ij <p_aj|phi_nu>

The two-centre integrals are GPAW's own Fourier-Bessel expansions
(``gpaw.lcao.overlap``), evaluated here vectorised over all atom pairs and
assembled as sparse matrices, so S of a 4000-atom structure costs seconds and
memory proportional to its number of non-zero blocks (GPAW builds dense
matrices).  The basis functions, projectors and ``dO`` come from
:class:`SpeciesBasis`, a plain-array description of a PAW setup that is stored
inside model checkpoints: S does not depend on the installed basis files.

Orbital order is GPAW's (atom, radial function, m); lengths in the public API
are Angstrom, S is dimensionless.  Matches GPAW's S to ~1e-15 (tests).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from ase import Atoms
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list
from ase.units import Bohr

from ase_gearsh.core.basis import BasisDataError, SpeciesBasis
from ase_gearsh.core.blocks import block_indices, canonical_orientation

__all__ = [
    "SpeciesBasis",
    "OverlapCalculator",
    "species_from_gpaw",
    "species_from_setup",
    "BasisDataError",
    "splines",
    "basis_for_registry",
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


def _neighbour_pairs(atoms: Atoms, cutoff: np.ndarray):
    """Unordered atom pairs with ``d < cutoff[i] + cutoff[j]``, each once in its canonical
    orientation (:func:`canonical_orientation`); self pairs (i, i, 0) excluded.

    Returns ``(i, j, S, D, d)``: indices, integer cell shifts, vectors
    ``D = r_j - r_i + S @ cell`` and distances (Angstrom).  Uses vesin when it is
    installed (much faster), else ASE's neighbour list.
    """
    cutoff = np.asarray(cutoff, float)
    rmax = 2.0 * float(cutoff.max(initial=0.0))
    if len(atoms) == 0 or rmax <= 0.0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros(0)
    try:
        from vesin import NeighborList
    except ImportError:  # optional dependency (extra 'gpaw')
        NeighborList = None
    if NeighborList is not None:
        i, j, S, D, d = NeighborList(cutoff=rmax, full_list=False).compute(
            atoms.positions, atoms.cell.array, atoms.pbc, "ijSDd"
        )
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


def _ranges(starts, counts) -> np.ndarray:
    """Concatenation of arange(s, s + c) for all (s, c), vectorised."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    first = np.repeat(
        np.asarray(starts, np.int64) - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
    )
    return first + np.arange(total)


def _single_threaded_blas():
    """Context limiting BLAS to one thread (threadpoolctl, when installed).  The PAW term
    is thousands of small products (~500 x 15 x 500) for which BLAS threads are pure
    overhead, and on a busy machine spinning BLAS threads slow everything ~3x."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _local_order(atoms: Atoms, cell: float = 4.0) -> np.ndarray:
    """Atom indices sorted by a grid of ``cell``-Angstrom boxes (nearby atoms adjacent)."""
    if not len(atoms):
        return np.zeros(0, np.int64)
    pos = atoms.positions - atoms.positions.min(axis=0)
    g = np.floor(pos / cell).astype(np.int64)
    return np.lexsort((g[:, 2], g[:, 1], g[:, 0]))


def _scatter_add(data, idx, values, unique: bool):
    """``data[idx] += values``, also where ``idx`` repeats (``unique`` false)."""
    if unique:
        data[idx] += values
    else:
        np.add.at(data, idx, values)


class OverlapCalculator:
    """Sparse exact S(k) for structures made of the given species.

    >>> oc = OverlapCalculator(species)             # dict symbol -> SpeciesBasis
    >>> S = oc.overlap(atoms)                      # scipy.sparse CSR at Gamma
    >>> S_k = oc.overlap(atoms, kpts=[[0, 0, 0.25]])[0]

    ``chunk`` is the number of atom pairs whose blocks are evaluated at once (memory).
    """

    def __init__(self, species: dict, chunk: int = 20_000):
        self.species = {
            k: (v if isinstance(v, SpeciesBasis) else SpeciesBasis.from_dict(v))
            for k, v in species.items()
        }
        self.chunk = int(chunk)
        self._expansions: dict = {}

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
            tsoe = tsoc.calculate_expansions(
                [f.l for f in a], tsoc.transform(a), [f.l for f in b], tsoc.transform(b)
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

    def overlap(self, atoms: Atoms, kpts=None, parts: bool = False):
        """Sparse S at Gamma (``kpts=None``: one real CSR matrix) or a list of
        complex CSR matrices, one per scaled k-point in ``kpts`` (n, 3).

        ``parts=True`` returns ``(S, O, P, dO)`` for Gamma (diagnostics).
        """
        symbols = self._check(atoms)
        self._present = sorted(set(symbols))
        codes = (
            np.array([self._present.index(s) for s in symbols], np.int64)
            if symbols
            else np.zeros(0, np.int64)
        )
        rcut = self._transformer(self._present)
        nat = len(atoms)
        sb = [self.species[s] for s in symbols]
        nao = np.array([s.n_orbitals for s in sb], np.int64)
        npr = np.array([s.n_projectors for s in sb], np.int64)
        rc = np.array([s.rc for s in sb])
        rp = np.array([s.projector_rc for s in sb])
        kpts_arr = np.zeros((1, 3)) if kpts is None else np.asarray(kpts, float).reshape(-1, 3)

        opairs, ppairs = self._pairs(atoms, rc, rp)
        flat, off = self._projector_blocks(codes, ppairs, rcut, nao, npr)
        lay = _Layout(nao, self._pattern(nat, opairs, ppairs, npr))
        out = []
        for k in kpts_arr:
            gamma = not np.any(k)
            ph_o = None if gamma else np.exp(2j * np.pi * (opairs[2] @ k))
            ph_p = None if gamma else np.exp(2j * np.pi * (ppairs[2] @ k))
            data = np.zeros(lay.nnz, float if gamma else complex)
            self._add_two_centre(data, lay, codes, opairs, rcut, ph_o)
            if parts and kpts is None:
                O = lay.csr(data.copy())
                O.eliminate_zeros()
            with _single_threaded_blas():  # many small products: threads only cost
                self._add_paw(data, lay, ppairs, flat, off, npr, symbols, ph_p, _local_order(atoms))
            S = lay.csr(data)
            S.eliminate_zeros()
            if parts and kpts is None:
                return (
                    S,
                    O,
                    self._projector_matrix(ppairs, flat, off, nao, npr),
                    self._dO_matrix(symbols, npr),
                )
            out.append(S)
        return out[0] if kpts is None else out

    # -- helpers of overlap() ----------------------------------------------
    @staticmethod
    def _pairs(atoms, rc, rp):
        """Two-centre pairs ``(i, j, S, D, onsite)`` (on-site blocks first, then canonical
        pairs with d < rc_i + rc_j) and projector pairs ``(c, b, S, D)`` (all directed
        pairs with d < rp_c + rc_b, including (c, c, 0), sorted by c then b)."""
        nat = len(atoms)
        i, j, S, D, d = _neighbour_pairs(atoms, np.maximum(rc, rp))
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
