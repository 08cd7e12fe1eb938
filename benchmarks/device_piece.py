"""The device's spectrum from DFT: a 120-atom piece, and what deep-state deflation does to it.

    python benchmarks/device_piece.py OUT_DIR [--atoms 120] [--below auto] [--tol 0.1]
                                      [--screens 1e-8 1e-6]

There is no DFT H of the 3999-atom device (``device_structure.py``), so the width of
its spectrum, which sets the KPM moments a resolution needs, comes from a small piece of
the same kind: ``build_device(--atoms)`` (amorphous HfO2 with Ni under WSe2), one GPAW
LCAO run at Gamma (szp(dzp), PBE, h = 0.25 A; written to ``OUT_DIR/piece.gpw``, reused
when present), and GPAW's own H and S at Gamma.

Printed: the spectrum, each species' atom-block levels (the diagonal blocks of H and S
diagonalised), and for ``ase_gearsh.electronic.deflation.deep_states`` with ``--below``
(default 'auto') and with the atomic levels alone (tol = inf): the deep states found, the
Ritz errors against the dense spectrum, the errors of the other levels of H' (the deep
states parked 0.6 eV below the others, as KPM parks them: within 5 eV of E_F and all),
the spectrum's width with and without the deep states and the moments a 0.1 eV Jackson
resolution needs for each (with the default 1 % margins); and for each of ``--screens``,
how far the levels move when the elements of S below it are left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_structure import build_device  # noqa: E402


def gamma_matrices(out: Path, n_atoms: int):
    """(H, S, orbital counts, symbols, valence electrons) of the piece at Gamma (eV)."""
    from gpaw.lcao.tools import get_lcao_hamiltonian

    from gpaw_tools.generate import RunSettings, run_structure
    from gpaw_tools.gpw import open_calculator

    out.mkdir(parents=True, exist_ok=True)
    gpw = out / "piece.gpw"
    if not gpw.exists():
        t = time.perf_counter()
        run_structure(build_device(n_atoms, seed=0), "piece", out, RunSettings(h=0.25))
        print(f"GPAW run: {time.perf_counter() - t:.0f} s", flush=True)
    calc = open_calculator(gpw)
    Hk, Sk = get_lcao_hamiltonian(calc)
    H, S = np.asarray(Hk)[0, 0], np.asarray(Sk)[0]
    if np.abs(H.imag).max() > 1e-10 or np.abs(S.imag).max() > 1e-10:
        raise SystemExit("Gamma-point H and S should be real")
    H, S = H.real, S.real
    atoms = calc.get_atoms()
    counts = [calc.wfs.setups[a].nao for a in range(len(atoms))]
    return (
        0.5 * (H + H.T),
        0.5 * (S + S.T),
        np.array(counts),
        atoms.get_chemical_symbols(),
        calc.wfs.nvalence,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--atoms", type=int, default=120)
    p.add_argument("--below", default="auto", help="eV or 'auto'")
    p.add_argument("--tol", type=float, default=0.1, help="cluster coupling, eV")
    p.add_argument("--resolution", type=float, default=0.1)
    p.add_argument(
        "--screens",
        type=float,
        nargs="*",
        default=[1e-8, 1e-6],
        help="also the levels' errors with the elements of S below each of these left out "
        "(the calculator's overlap_screen)",
    )
    a = p.parse_args(argv)
    from ase_gearsh.electronic.deflation import deep_states
    from ase_gearsh.electronic.kpm import BOUNDS_MARGIN, kpm_n_moments

    Hd, Sd, counts, sym, nel = gamma_matrices(a.out, a.atoms)
    atom_of = np.repeat(np.arange(len(counts)), counts)
    E = la.eigh(Hd, Sd, eigvals_only=True)
    n_occ = int(round(nel / 2))
    ef = 0.5 * (E[n_occ - 1] + E[n_occ])
    formula = "".join(f"{x}{sym.count(x)}" for x in dict.fromkeys(sym))
    print(
        f"{formula}: {len(sym)} atoms, {len(E)} orbitals; spectrum {E[0]:.2f} .. {E[-1]:.2f} "
        f"eV, highest occupied {E[n_occ - 1]:.3f}, lowest empty {E[n_occ]:.3f} eV"
    )
    ptr = np.concatenate([[0], np.cumsum(counts)])
    for x in dict.fromkeys(sym):
        i = sym.index(x)
        b = slice(ptr[i], ptr[i + 1])
        lv = la.eigh(Hd[b, b], Sd[b, b], eigvals_only=True)
        print(f"  {x} atom-block levels (eV): {' '.join(f'{v:.1f}' for v in lv)}")
    H, S = sp.csr_array(Hd), sp.csr_array(Sd)

    def moments(width):
        return kpm_n_moments((0.0, width * (1 + 2 * BOUNDS_MARGIN)), a.resolution)

    full = E[-1] - E[0]
    print(f"width {full:.2f} eV: {moments(full)} moments for {a.resolution} eV")
    below = a.below if a.below == "auto" else float(a.below)
    for tol in (a.tol, np.inf):
        t = time.perf_counter()
        d = deep_states(H, S, atom_of, below, tol=tol)
        dt = time.perf_counter() - t
        m = d.count
        park = E[m] - 0.6
        Z = d.s_basis.toarray() @ d.vectors
        Ep = np.sort(la.eigh(Hd + (Z * (park - d.energies)) @ Z.T, Sd, eigvals_only=True))
        err = np.abs(Ep[m:] - E[m:])
        near = np.abs(E[m:] - ef) < 5.0
        rest = E[-1] - E[m]
        print(
            f"deep states below {d.below:.2f} eV, tol {tol}: {m} (exact: "
            f"{int((E < d.below).sum())}) in {dt:.2f} s; Ritz errors max "
            f"{np.abs(d.energies - E[:m]).max():.2e} eV, residual {d.residual:.2e} eV; the "
            f"other levels with the deep ones parked: max error {err.max():.2e} eV, within "
            f"5 eV of E_F max {err[near].max():.2e}, mean {err[near].mean():.2e} eV; width "
            f"{rest:.2f} eV ({E[m]:.2f} .. {E[-1]:.2f}): {moments(rest)} moments"
        )
    for screen in a.screens:
        Ss = np.where(np.abs(Sd) < screen, 0.0, Sd)
        err = np.abs(la.eigh(Hd, Ss, eigvals_only=True) - E)
        print(
            f"S screened at {screen:g} ({np.mean(Ss != 0):.3f} of its elements kept, "
            f"{np.mean(Sd != 0):.3f} non-zero): levels within 5 eV of E_F off by at most "
            f"{err[np.abs(E - ef) < 5.0].max():.2e} eV, all levels {err.max():.2e} eV"
        )
    top = E > E[-1] - 20.0
    print(
        f"states in the top 20 eV: {int(top.sum())} ({E[top].min():.1f} .. {E[-1]:.1f} eV; "
        f"O has {sym.count('O')} atoms)"
    )


if __name__ == "__main__":
    main()
