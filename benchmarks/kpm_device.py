"""KPM spectra of the device-scale structure: Cholesky of S, bounds, moments, DOS/PDOS, holes.

    python benchmarks/kpm_device.py [--atoms 3999] [--resolution 0.1] [--moments M]
                                    [--random 16] [--window 0.2] [--screen 1e-8]
                                    [--groups species|holes] [--doubling auto|on|off]
                                    [--span 116.3] [--hamiltonian huckel|model]
                                    [--total-too] [--precision auto|double|single ...]
                                    [--fermi-x X]

Structure: ``benchmarks/device_structure.py`` (amorphous HfO2:Ni under 2H-WSe2), exact S
from ``gpaw_tools.overlap`` (PBE, szp(dzp); ``--screen e``: every element within e of
the exact S, fewer non-zeros, as the calculator's ``overlap_screen``).  There is no
trained model for Hf/O/Ni/W/Se, so H is a stand-in with exactly S's sparsity pattern:
the extended-Hueckel (Wolfsberg-Helmholz) form H_ij = K S_ij (e_i + e_j) / 2, K = 1.75,
with on-site energies e per species and radial function (:data:`ONSITE`, rounded
valence ionisation energies of extended-Hueckel tables; semicore s/p deeper;
polarisation functions at 0 eV).  Only a timing stand-in: its DOS is not the device's.
``--hamiltonian model``: the H of a randomly initialised model of the paper's
hyperparameters instead (``device_scale.py``; the calculator's whole atom-pair blocks,
whose rows of one atom share their columns).

Prints each stage with its time and the peak RSS: structure and matrices, the sparse
Cholesky factorisation of S (CHOLMOD), the spectral bounds (Lanczos), the Chebyshev
moments (total and per species, or ``--groups holes``: one W+Se group, two moments
per step), E_F, and the W+Se states in [E_F, E_F + window] (the
paper's hole count).  ``--moments`` computes fewer moments than the resolution needs
and extrapolates the time of the full run.  ``--precision``: of the triangular solves
(``CholeskyFactor``; several are run in turn, each with its own factor and the same
random vectors, and the largest difference of their moments is printed).
``--fermi-x``: also the moments and the estimate for ``kpm['resolution_at'] = 'fermi'``,
with E_F at that scaled position of the interval.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_scale import paper_model  # noqa: E402
from device_structure import build_device  # noqa: E402

ONSITE = {  # eV, one value per radial function in GPAW basis order (SpeciesBasis.l)
    "O": [-32.3, -14.8, 0.0],
    "Se": [-20.5, -13.2, 0.0],
    "Ni": [-9.2, -70.0, -5.2, -13.5, 0.0],
    "Hf": [-65.0, -7.0, -33.0, -3.8, -8.1, 0.0],
    "W": [-75.0, -8.0, -38.0, -5.0, -10.4, 0.0],
}


# eV, per radial function as ONSITE: the atom-block levels of GPAW's own H for a 120-atom
# piece of the device (benchmarks/device_piece.py), rounded, relative to that cell's zero
# (E_F about +4 eV): the semicore levels, the O 2s and the O d polarisation functions where
# DFT puts them
ONSITE_ATOMIC = {
    "O": [-12.8, 1.9, 54.3],
    "Se": [-10.0, -0.1, 21.3],
    "Ni": [-1.6, -59.0, 17.5, 3.0, 18.0],
    "Hf": [-58.1, -4.2, -26.8, 5.3, 1.0, 15.5],
    "W": [-70.9, -4.5, -35.4, 1.5, -6.5, 13.0],
}


def huckel(S, symbols, species, K=1.75, onsite=None, diagonal_k=True):
    """Wolfsberg-Helmholz H with S's pattern (see the module docstring); diagonal_k=False:
    H_ii = e_i (K on the off-diagonal elements only)."""
    table = ONSITE if onsite is None else onsite
    e = np.concatenate([np.repeat(table[s], [2 * l + 1 for l in species[s].l]) for s in symbols])
    S = sp.csr_array(S)
    rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
    data = 0.5 * K * S.data * (e[rows] + e[S.indices])
    if not diagonal_k:
        data[rows == S.indices] = e[rows[rows == S.indices]] * S.data[rows == S.indices]
    return sp.csr_array((data, S.indices.copy(), S.indptr.copy()), shape=S.shape)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=3999)
    p.add_argument("--resolution", type=float, default=0.1, help="eV (Jackson kernel)")
    p.add_argument("--moments", type=int, help="compute only this many moments (timing)")
    p.add_argument("--random", type=int, default=16)
    p.add_argument("--window", type=float, default=0.2, help="hole window above E_F, eV")
    p.add_argument("--screen", type=float, default=0.0, help="S screening (0: exact)")
    p.add_argument(
        "--span",
        type=float,
        help="eV: extrapolate to the moments a spectrum this wide needs (a DFT H of this "
        "basis: the WSe2 cell's at Gamma spans -79 to +35 eV, 116.3 eV with the default "
        "1 %% margins, 125.4 eV with the earlier 5 %%); default: the stand-in H's bounds, "
        "which are not physical",
    )
    p.add_argument(
        "--fermi-x",
        type=float,
        help="E_F's scaled position in the interval (-1 .. 1; the device piece's GPAW "
        "spectrum, kpm_fermi_resolution.py: -0.48): also the moments that "
        "kpm['resolution_at'] = 'fermi' needs for --resolution within FERMI_SPAN of E_F, "
        "and that estimate",
    )
    p.add_argument(
        "--groups",
        nargs="+",
        choices=("species", "holes"),
        default=["species"],
        help="projections: every species, or one group of W and Se (the hole count alone); "
        "several: each timed in turn (E_F and the hole count from the first)",
    )
    p.add_argument(
        "--doubling",
        nargs="+",
        choices=("auto", "on", "off"),
        default=["auto"],
        help="two moments per Chebyshev step (auto: total and one group; see kpm.py); "
        "several: each timed in turn",
    )
    p.add_argument(
        "--hamiltonian",
        choices=("huckel", "atomic", "model"),
        default="huckel",
        help="the stand-in H: extended Hueckel on S's pattern (default); 'atomic': the same "
        "form with H_ii = e_i and the atom-block levels of GPAW's H for a piece of the "
        "device (ONSITE_ATOMIC: semicore and O d levels where DFT puts them, so that "
        "--deep-below finds the same deep states); or the H of a "
        "randomly initialised model of the paper's hyperparameters (device_scale.py): "
        "the calculator's own block pattern, for timing only (its spectrum is not physical)",
    )
    p.add_argument(
        "--deep-below",
        help="eV or 'auto': take the states of atomic levels below it out of the "
        "Chebyshev interval (ase_gearsh.electronic.deflation; use with --hamiltonian "
        "atomic, and --span from device_piece.py)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=("double", "single", "auto"),
        default=["auto"],
        help="precision of the triangular solves (CholeskyFactor); several: each in turn "
        "with its own factor, the same random vectors, and the moments' difference",
    )
    p.add_argument(
        "--total-too",
        action="store_true",
        help="also time the total moments alone (DOS and E_F: two moments per step)",
    )
    a = p.parse_args(argv)
    from ase_gearsh.electronic.deflation import deep_states
    from ase_gearsh.electronic.kpm import (
        EDGE,
        CholeskyFactor,
        chebyshev_moments,
        kpm_density,
        kpm_fermi_level,
        kpm_n_moments,
        kpm_resolution,
        spectral_bounds,
    )
    from ase_gearsh.electronic.spectrum import FERMI_SPAN
    from gpaw_tools.overlap import OverlapCalculator, species_from_gpaw

    t0 = t = time.perf_counter()
    atoms = build_device(a.atoms, seed=0)
    sym = atoms.get_chemical_symbols()
    species = species_from_gpaw(sorted(set(sym)), "PBE", "szp(dzp)")
    S = OverlapCalculator(species, screen=a.screen).overlap(atoms)
    if a.hamiltonian == "model":  # the calculator's H: whole atom-pair blocks
        from ase_gearsh import GearsHCalculator

        H = GearsHCalculator(paper_model(), warn_extrapolation=False).get_hamiltonian(atoms=atoms)
    elif a.hamiltonian == "atomic":
        H = huckel(S, sym, species, onsite=ONSITE_ATOMIC, diagonal_k=False)
    else:
        H = huckel(S, sym, species)
    counts = np.array([species[s].n_orbitals for s in sym])
    orb_symbol = np.repeat(np.array(sym), counts)
    n = S.shape[0]
    print(
        f"{len(atoms)} atoms, {n} orbitals, S nnz {S.nnz:,} ({100 * S.nnz / n**2:.1f} %, "
        f"screen {a.screen:g}); "
        f"structure, S and H in {time.perf_counter() - t:.1f} s, RSS {rss_gib():.2f} GiB",
        flush=True,
    )
    deep = None
    if a.deep_below is not None:
        t = time.perf_counter()
        below = a.deep_below if a.deep_below == "auto" else float(a.deep_below)
        deep = deep_states(H, S, np.repeat(np.arange(len(sym)), counts), below)
        print(
            f"deep states below {deep.below:.2f} eV: {deep.count} in "
            f"{time.perf_counter() - t:.1f} s (Ritz residual {deep.residual:.2e} eV, gap "
            f"{deep.gap:.1f} eV, S C {deep.s_basis.nnz:,} non-zeros), RSS {rss_gib():.2f} GiB",
            flush=True,
        )
    by_species = {s: np.flatnonzero(orb_symbol == s) for s in dict.fromkeys(sym)}
    holes_group = {"W+Se": np.flatnonzero(np.isin(orb_symbol, ["W", "Se"]))}
    bounds = None
    t_common = time.perf_counter() - t0  # structure, S, H, deep states
    results = {}  # precision -> the first configuration's moments
    for precision in a.precision:  # one factor at a time (the peak memory of one)
        t = time.perf_counter()
        chol = CholeskyFactor(S, precision=precision)
        t_chol = time.perf_counter() - t
        print(
            f"Cholesky of S (CHOLMOD, supernodal; solves in {chol.precision} precision): "
            f"{t_chol:.1f} s, RSS {rss_gib():.2f} GiB",
            flush=True,
        )
        t = time.perf_counter()
        b = spectral_bounds(H, S, factor=chol, deep=deep)
        t_bounds = time.perf_counter() - t
        print(f"bounds (Lanczos): {b[0]:.2f} .. {b[1]:.2f} eV in {t_bounds:.1f} s", flush=True)
        bounds = bounds or b  # every precision on the first one's interval
        interval = bounds if a.span is None else (0.0, a.span)
        need = kpm_n_moments(interval, a.resolution)
        needs = {"everywhere": need}
        if a.fermi_x is not None:  # resolution_at='fermi': at E_F only
            centre = 0.5 * (interval[0] + interval[1])
            ef = centre + a.fermi_x * 0.5 * (interval[1] - interval[0]) / (1.0 - EDGE)
            span = (ef - FERMI_SPAN, ef + FERMI_SPAN)
            needs["at E_F"] = kpm_n_moments(interval, a.resolution, energies=span)
        M = a.moments or need
        t_setup = t_common + t_chol + t_bounds  # structure, S, H, deep states, Cholesky, bounds
        for groups_name in a.groups:  # each projection and doubling in turn, one factor
            groups = by_species if groups_name == "species" else holes_group
            for mode in a.doubling:
                t = time.perf_counter()
                m = chebyshev_moments(
                    H,
                    S,
                    M,
                    a.random,
                    groups,
                    bounds=bounds,
                    seed=0,
                    block=a.random,
                    progress=True,
                    factor=chol,
                    doubling={"auto": None, "on": True, "off": False}[mode],
                    deep=deep,
                )
                t_mom = time.perf_counter() - t
                results.setdefault(chol.precision, m)
                print(
                    f"moments ({chol.precision}): {M} x {a.random} vectors, projections on "
                    f"{', '.join(groups)} (doubling {mode}), in {t_mom:.1f} s "
                    f"({1e3 * t_mom / M:.0f} ms per moment), RSS {rss_gib():.2f} GiB",
                    flush=True,
                )
                for where, n_need in needs.items():  # the setup and this rate
                    if M >= n_need:
                        continue
                    est = t_setup + t_mom * n_need / M
                    print(
                        f"  resolution {a.resolution} eV {where} needs {n_need} moments"
                        f"{'' if a.span is None else f' over {a.span:g} eV'}: about "
                        f"{est / 60:.1f} min end to end with {a.random} vectors "
                        f"(setup {t_setup:.0f} s)",
                        flush=True,
                    )
        if a.total_too:
            t = time.perf_counter()
            chebyshev_moments(
                H,
                S,
                M,
                a.random,
                None,
                bounds=bounds,
                seed=0,
                block=a.random,
                factor=chol,
                deep=deep,
            )
            t_tot = time.perf_counter() - t
            print(
                f"total moments alone ({chol.precision}, no projection): {M} x {a.random} "
                f"vectors in {t_tot:.1f} s "
                f"({1e3 * t_tot / M:.0f} ms per moment, two moments per Chebyshev step)",
                flush=True,
            )
        del chol
    if len(results) > 1:  # the same random vectors: the difference is the precision's
        (p0, m0), *rest = results.items()
        for p1, m1 in rest:
            if m1.moments.shape == m0.moments.shape:
                d = np.abs(m1.moments - m0.moments).max(axis=1) / n
                print(
                    f"moments {p1} - {p0}: max |difference| / n_orbitals per row "
                    f"({', '.join(m0.names)}): {', '.join(f'{x:.1e}' for x in d)}",
                    flush=True,
                )
    n_e = sum(float(species[s].valence) for s in sym)
    res = kpm_resolution(bounds, M)
    for precision, m in results.items():
        ef = kpm_fermi_level(m, n_e)
        e = np.linspace(ef - 5.0, ef + 5.0, 2001)
        dos = kpm_density(m, e)
        win = np.linspace(ef, ef + a.window, 401)
        rows = [dos[s] for s in ("W", "Se", "W+Se") if s in dos]
        holes = 2.0 * np.trapezoid(sum(np.interp(win, e, d) for d in rows), win)
        print(
            f"{precision}: E_F {ef:.3f} eV (resolution {res:.2f} eV); W+Se states (both "
            f"spins) in [E_F, E_F + {a.window}]: {holes:.2f}; total DOS at E_F "
            f"{np.interp(ef, e, dos['total']):.1f} states/eV"
        )
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s, peak RSS {rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
