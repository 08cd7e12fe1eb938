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
    except (RuntimeError, OSError) as err:
        raise BasisDataError(
            f"GPAW could not load setups={setups!r}, basis={basis!r}, "
            f"xc={xc!r} for {symbols}: {err}"
        ) from None
    return {s.symbol: species_from_setup(s, basis, setups, xc) for s in gsetups}


class OverlapCalculator:
    """Sparse exact S(k) for structures made of the given species.

    >>> oc = OverlapCalculator(species)             # dict symbol -> SpeciesBasis
    >>> S = oc.overlap(atoms)                      # scipy.sparse CSR at Gamma
    >>> S_k = oc.overlap(atoms, kpts=[[0, 0, 0.25]])[0]
    """

    def __init__(self, species: dict, chunk: int = 50_000):
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

    @staticmethod
    def _evaluate(tsoe, vec_bohr: np.ndarray) -> np.ndarray:
        """Blocks (P, n1, n2) for displacement vectors (P, 3) in Bohr."""
        from gpaw.sphere.gaunt import gaunt
        from gpaw.sphere.spherical_harmonics import Y

        n = len(vec_bohr)
        out = np.zeros((n,) + tsoe.shape)
        if n == 0 or tsoe.oe_jj.size == 0:
            return out
        r = np.ascontiguousarray(np.linalg.norm(vec_bohr, axis=1))
        lmax = tsoe.lmaxspline
        x, y, z = vec_bohr.T
        rlY = (
            np.stack([Y(L, x, y, z) * np.ones(n) for L in range(lmax**2)], axis=1)
            if lmax
            else np.ones((n, 1))
        )
        G = gaunt(tsoe.lmaxgaunt)
        for x_mm, oe in tsoe.slice(out):
            la, lb = oe.la, oe.lb
            for k, l in enumerate(range((la + lb) % 2, la + lb + 1, 2)):
                s = oe.spline_l[k].map(r)
                s[np.abs(s) < _SPLINE_ZERO] = 0.0  # GPAW's C evaluator skips these terms
                g = G[la * la : (la + 1) ** 2, lb * lb : (lb + 1) ** 2, l * l : (l + 1) ** 2]
                x_mm += s[:, None, None] * np.einsum("pm,abm->pab", rlY[:, l * l : (l + 1) ** 2], g)
        return out

    @staticmethod
    def _pairs(neigh, radius_i, radius_j, half):
        """Directed (i, j, S, vector) with d < radius_i[i] + radius_j[j] (Angstrom),
        selected from one neighbour list ``neigh`` = (i, j, S, D, d, n_atoms)."""
        i, j, S, D, d, n = neigh
        keep = d < radius_i[i] + radius_j[j]
        if half:
            keep &= canonical_orientation(i, j, S)
        if half:  # on-site blocks (i, i, 0) are added separately
            return i[keep], j[keep], S[keep], D[keep]
        ar = np.arange(n)
        return (
            np.concatenate([ar, i[keep]]),
            np.concatenate([ar, j[keep]]),
            np.concatenate([np.zeros((n, 3), int), S[keep]]),
            np.concatenate([np.zeros((n, 3)), D[keep]]),
        )

    def _blocks(self, kind, atoms, symbols, i, j, D, rcut):
        """Evaluate all blocks grouped by species pair; yields (index array, blocks)."""
        sym = np.array(symbols)
        for s1 in sorted(set(symbols)):
            for s2 in sorted(set(symbols)):
                sel = np.flatnonzero((sym[i] == s1) & (sym[j] == s2))
                if not len(sel):
                    continue
                tsoe = self._expansion(kind, s1, s2, rcut)
                for c in range(0, len(sel), self.chunk):
                    part = sel[c : c + self.chunk]
                    yield part, self._evaluate(tsoe, D[part] / Bohr)

    def overlap(self, atoms: Atoms, kpts=None, parts: bool = False):
        """Sparse S at Gamma (``kpts=None``: one real CSR matrix) or a list of
        complex CSR matrices, one per scaled k-point in ``kpts`` (n, 3).

        ``parts=True`` returns ``(S, O, P, dO)`` for Gamma (diagnostics).
        """
        symbols = self._check(atoms)
        present = sorted(set(symbols))
        rcut = self._transformer(present)
        nat = len(atoms)
        nao = np.array([self.species[s].n_orbitals for s in symbols], np.int64)
        npr = np.array([self.species[s].n_projectors for s in symbols], np.int64)
        M0 = np.concatenate([[0], np.cumsum(nao)])
        I0 = np.concatenate([[0], np.cumsum(npr)])
        rc = np.array([self.species[s].rc for s in symbols])
        rp = np.array([self.species[s].projector_rc for s in symbols])
        kpts_arr = np.zeros((1, 3)) if kpts is None else np.asarray(kpts, float).reshape(-1, 3)

        # one neighbour list serves both kinds of pairs
        cut = np.maximum(rc, rp)
        i, j, S, D = neighbor_list("ijSD", atoms, cutoff=cut, self_interaction=False)
        neigh = (i, j, S, D, np.linalg.norm(D, axis=1), nat)
        # two-centre <phi|phi>: canonical half + on-site
        oi, oj, oS, oD = self._pairs(neigh, rc, rc, half=True)
        o_rows, o_cols, o_vals, o_shift_blk = [], [], [], []
        ar = np.arange(nat)
        for idx, blocks in self._blocks(
            "O",
            atoms,
            symbols,
            np.concatenate([ar, oi]),
            np.concatenate([ar, oj]),
            np.concatenate([np.zeros((nat, 3)), oD]),
            rcut,
        ):
            ii = np.concatenate([ar, oi])[idx]
            jj = np.concatenate([ar, oj])[idx]
            r, c, b = block_indices(nao[ii], nao[jj], M0[ii], M0[jj])
            o_rows.append(r)
            o_cols.append(c)
            o_vals.append(blocks.reshape(-1))
            o_shift_blk.append(idx[b])
        o_rows, o_cols = np.concatenate(o_rows), np.concatenate(o_cols)
        o_vals, o_pair = np.concatenate(o_vals), np.concatenate(o_shift_blk)
        onsite = o_pair < nat
        shifts = np.concatenate([np.zeros((nat, 3)), oS])

        # projector-orbital <p_a|phi_b>, all directed pairs (a, b) incl. a == b
        pi_, pj, pS, pD = self._pairs(neigh, rp, rc, half=False)
        del neigh, i, j, S, D
        p_rows, p_cols, p_vals, p_blk = [], [], [], []
        for idx, blocks in self._blocks("P", atoms, symbols, pi_, pj, pD, rcut):
            r, c, b = block_indices(npr[pi_[idx]], nao[pj[idx]], I0[pi_[idx]], M0[pj[idx]])
            p_rows.append(r)
            p_cols.append(c)
            p_vals.append(blocks.reshape(-1))
            p_blk.append(idx[b])
        p_rows = np.concatenate(p_rows) if p_rows else np.zeros(0, int)
        p_cols = np.concatenate(p_cols) if p_cols else np.zeros(0, int)
        p_vals = np.concatenate(p_vals) if p_vals else np.zeros(0)
        p_blk = np.concatenate(p_blk) if p_blk else np.zeros(0, int)
        dO = (
            sp.block_diag(
                [self.species[s].dO for s in symbols if self.species[s].n_projectors], format="csr"
            )
            if I0[-1]
            else sp.csr_matrix((0, 0))
        )

        nM, nI = int(M0[-1]), int(I0[-1])
        out = []
        for k in kpts_arr:
            gamma = not np.any(k)
            if gamma:
                ph_o = np.ones(len(shifts))
                ph_p = np.ones(len(pS))
            else:
                ph_o = np.exp(2j * np.pi * (shifts @ k))
                ph_p = np.exp(2j * np.pi * (pS @ k))
            vo = o_vals * ph_o[o_pair]
            half = sp.coo_matrix(
                (vo[~onsite], (o_rows[~onsite], o_cols[~onsite])), shape=(nM, nM)
            ).tocsr()
            diag = sp.coo_matrix(
                (vo[onsite], (o_rows[onsite], o_cols[onsite])), shape=(nM, nM)
            ).tocsr()
            O = diag + half + half.conj().T
            P = sp.coo_matrix((p_vals * ph_p[p_blk], (p_rows, p_cols)), shape=(nI, nM)).tocsr()
            P.eliminate_zeros()  # terms GPAW's evaluator drops: fewer products below
            S = (O + P.conj().T @ (dO @ P)).tocsr()
            S.eliminate_zeros()
            if gamma:
                S = S.real.tocsr() if np.iscomplexobj(S.data) else S
            S.sum_duplicates()
            if parts and kpts is None:
                return S, O, P, dO
            out.append(S)
        return out[0] if kpts is None else out


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
