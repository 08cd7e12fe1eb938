"""Transmission through a predicted Hamiltonian: a two-terminal hydrogen chain.

    python tutorials/transport.py [--model models/molecules.ckpt] [-o tutorial-output]

Steps (see tutorials/04_transport.md):

1. predicts H (and the exact S) of a periodic chain of hydrogen atoms, the leads, and
   turns it into a sisl Hamiltonian with every lattice shift (``to_sisl``);
2. principal layers: the chain cell tiled until only neighbouring layers couple
   (sisl ``tile``), giving h00, h01, s00, s01;
3. T(E) of the perfect chain with ``ase.transport.TransportCalculator`` (non-orthogonal:
   h and s of the scattering region, h1 and s1 of two lead layers), checked against
   the number of bands crossing E;
4. T(E) of a chain with one stretched bond: the scattering region is predicted as a
   periodic supercell and its couplings across the cell boundary are dropped;
5. the perfect chain's T(E) from GPAW's own H of the lead (``--no-dft`` skips it);
6. writes the figure and the TBtrans inputs ``lead.TSHS`` and ``device.TSHS``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms


def chain(n_atoms: int, spacing: float, stretch: float = 0.0, vacuum: float = 8.0) -> Atoms:
    """A straight chain of H atoms along z, periodic along z; the bond in the middle is
    longer by ``stretch`` A."""
    z = spacing * np.arange(n_atoms)
    z[n_atoms // 2 :] += stretch
    atoms = Atoms(
        f"H{n_atoms}",
        positions=[[0.0, 0.0, x] for x in z],
        cell=[vacuum, vacuum, n_atoms * spacing + stretch],
        pbc=[False, False, True],
    )
    atoms.center(axis=(0, 1))
    return atoms


def layer_blocks(H):
    """h00, h01, s00, s01 of a sisl Hamiltonian whose cell is one principal layer along
    the third axis (nsc 1 x 1 x 3): layer n with itself and with layer n + 1."""
    if list(H.geometry.nsc) != [1, 1, 3]:
        raise ValueError(f"expected nsc [1, 1, 3], got {H.geometry.nsc.tolist()}")
    no = H.no
    i0, i1 = (H.lattice.sc_index([0, 0, r]) for r in (0, 1))
    h, s = H.tocsr(0), H.tocsr(H.S_idx)  # (no, no * 3): column isc * no + j
    h00, h01, s00, s01 = (m[:, i * no : (i + 1) * no].toarray() for m in (h, s) for i in (i0, i1))
    return h00, h01, s00, s01


def principal_layer(H):
    """The cell of ``H`` tiled along z until only neighbouring layers couple."""
    reach = (int(H.geometry.nsc[2]) - 1) // 2
    return H.tile(reach, 2) if reach > 1 else H


def transmission(energies, h, s, h00, h01, s00, s01):
    """T(E) of a scattering region (h, s) between two identical semi-infinite leads whose
    principal layers are (h00, s00), coupled by (h01, s01) to the next layer."""
    from ase.transport.calculators import TransportCalculator
    from threadpoolctl import threadpool_limits

    h1 = np.block([[h00, h01], [h01.T, h00]])
    s1 = np.block([[s00, s01], [s01.T, s00]])
    tc = TransportCalculator(h=h, s=s, h1=h1, s1=s1, energies=energies, logfile=None)
    with threadpool_limits(1, "blas"):  # small matrices: BLAS threads only cost time
        return tc.get_transmission()


def perfect_region(h00, h01, n_layers: int = 3) -> np.ndarray:
    """Block-tridiagonal matrix of ``n_layers`` identical principal layers."""
    n = len(h00)
    m = np.zeros((n_layers * n, n_layers * n))
    for i in range(n_layers):
        m[i * n : (i + 1) * n, i * n : (i + 1) * n] = h00
        if i + 1 < n_layers:
            m[i * n : (i + 1) * n, (i + 1) * n : (i + 2) * n] = h01
            m[(i + 1) * n : (i + 2) * n, i * n : (i + 1) * n] = h01.T
    return m


def band_channels(H, energies, nk: int = 2001) -> np.ndarray:
    """Number of bands crossing each energy (right-moving channels of a 1D lead)."""
    eps = np.array([H.eigh(k=[0, 0, k]) for k in np.linspace(0, 0.5, nk)])  # (nk, nb)
    below = eps[:, None, :] < energies[None, :, None]
    return np.abs(np.diff(below, axis=0)).sum(axis=(0, 2))


def dft_lead(spacing: float, basis_data: dict):
    """GPAW's own H (and S) of the lead cell as a sisl Hamiltonian (k-sampled LCAO run,
    real-space blocks from gpaw_tools.extract)."""
    from gpaw import GPAW

    from ase_gearsh.core.blocks import BlockMatrices
    from ase_gearsh.export import blocks_to_sisl
    from gpaw_tools.extract import extract_calculator

    atoms = chain(1, spacing)
    atoms.calc = GPAW(
        mode="lcao",
        basis="szp(dzp)",
        xc="PBE",
        h=0.2,
        kpts={"size": (1, 1, 12), "gamma": True},
        symmetry="off",
        txt=None,
    )
    atoms.get_potential_energy()
    a, _ = extract_calculator(atoms.calc)  # real-space blocks, checked against GPAW
    counts, ij, shift = a["orbital_counts"], a["pair_ij"], a["pair_shift"]
    H = BlockMatrices.from_arrays(counts, a["onsite_H"][0], ij, shift, a["pair_H"][0])
    S = BlockMatrices.from_arrays(counts, a["onsite_S"], ij, shift, a["pair_S"])
    return blocks_to_sisl(atoms, H, S, basis_data), atoms.calc.get_fermi_level()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/molecules.ckpt")
    p.add_argument("--spacing", type=float, default=2.0, help="H-H distance, A")
    p.add_argument("--stretch", type=float, default=0.3, help="extra length of one bond, A")
    p.add_argument("--layers", type=int, default=6, help="principal layers in the device")
    p.add_argument("--emin", type=float, default=-18.0)
    p.add_argument("--emax", type=float, default=20.0)
    p.add_argument("--npts", type=int, default=761)
    p.add_argument(
        "--dft",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also T(E) of the perfect chain from GPAW's own H (a 2 s LCAO run)",
    )
    p.add_argument("--figure", default="tutorials/figures/transport_transmission.png")
    p.add_argument("-o", "--output", default="tutorial-output")
    a = p.parse_args(argv)

    from ase_gearsh import GearsHCalculator
    from ase_gearsh.core.io import new_figure, save_figure
    from ase_gearsh.export import to_sisl, write_sisl
    from ase_gearsh.model.coverage import ExtrapolationWarning

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    energies = np.linspace(a.emin, a.emax, a.npts)
    # the model never saw a chain (see the tutorial): no warning for every prediction
    warnings.simplefilter("ignore", ExtrapolationWarning)
    t0 = time.perf_counter()

    # 1. the lead: one H atom per cell, predicted H, exact S, every lattice shift
    lead = chain(1, a.spacing)
    lead.calc = GearsHCalculator(a.model, kpts={"size": (1, 1, 48), "gamma": True})
    fermi = lead.calc.get_fermi_level()
    H_lead = to_sisl(lead.calc)
    print(
        f"lead: H{len(lead)} cell of {a.spacing} A, {H_lead.no} orbitals, nsc "
        f"{H_lead.geometry.nsc.tolist()}, E_F = {fermi:.3f} eV "
        f"({time.perf_counter() - t0:.1f} s, most of it compiling the network)"
    )

    # 2. principal layers: tiled until only neighbouring layers couple
    pl = principal_layer(H_lead)
    h00, h01, s00, s01 = layer_blocks(pl)
    n_pl = len(pl.geometry)
    print(f"principal layer: {n_pl} cells ({pl.no} orbitals), nsc {pl.geometry.nsc.tolist()}")

    # 3. the perfect chain: three identical layers between the leads
    h, s = perfect_region(h00, h01), perfect_region(s00, s01)
    T_perfect = transmission(energies, h, s, h00, h01, s00, s01)
    channels = band_channels(H_lead, energies)
    same = np.abs(T_perfect - channels) < 0.01
    print(
        f"perfect chain: T(E) equals the number of bands crossing E to 0.01 at "
        f"{same.sum()} of {len(energies)} energies (largest |T - n| there "
        f"{np.abs(T_perfect - channels)[same].max():.1e})"
    )

    # 4. one stretched bond in the middle of a device of a.layers principal layers
    t1 = time.perf_counter()
    device = chain(a.layers * n_pl, a.spacing, a.stretch)
    device.calc = GearsHCalculator(a.model)
    H_dev = to_sisl(device.calc)
    H_dev.set_nsc(c=1)  # the scattering region: no coupling across the cell boundary
    h, s = H_dev.Hk().toarray().real, H_dev.Sk().toarray().real
    n = len(h00)
    print(
        f"device: H{len(device)}, {H_dev.no} orbitals; its end layers differ from the "
        f"lead's by {max(np.abs(h[:n, :n] - h00).max(), np.abs(h[-n:, -n:] - h00).max()):.1e}"
        f" eV (H), {max(np.abs(s[:n, :n] - s00).max(), np.abs(s[-n:, -n:] - s00).max()):.1e}"
        f" (S); {time.perf_counter() - t1:.1f} s"
    )
    T_defect = transmission(energies, h, s, h00, h01, s00, s01)

    # 5. the same perfect chain with GPAW's Hamiltonian
    T_dft = None
    if a.dft:
        H_gpaw, fermi_gpaw = dft_lead(a.spacing, lead.calc.model.basis_data)
        g00, g01, gs00, gs01 = layer_blocks(principal_layer(H_gpaw))
        g, gs = perfect_region(g00, g01), perfect_region(gs00, gs01)
        T_dft = transmission(energies, g, gs, g00, g01, gs00, gs01)
        print(
            f"GPAW lead: E_F = {fermi_gpaw:.3f} eV, bands at Gamma {H_gpaw.eigh().round(2)}, "
            f"at k = 1/2 {H_gpaw.eigh(k=[0, 0, 0.5]).round(2)}"
        )
    print(
        f"predicted bands at Gamma {H_lead.eigh().round(2)}, at k = 1/2 "
        f"{H_lead.eigh(k=[0, 0, 0.5]).round(2)}"
    )

    # 6. figure and TBtrans inputs
    fig, ax = new_figure(figsize=(7, 4))
    ax.plot(energies, channels, color="grey", ls="--", lw=1.0, label="bands crossing E")
    ax.plot(energies, T_perfect, color="k", lw=1.4, label="perfect chain")
    ax.plot(energies, T_defect, color="C3", lw=1.2, label=f"one bond +{a.stretch:g} A")
    if T_dft is not None:
        ax.plot(energies, T_dft, color="C0", lw=1.0, label="perfect chain, GPAW's H")
    ax.axvline(fermi, color="grey", ls=":", lw=0.8)
    ax.text(fermi, ax.get_ylim()[1] * 0.97, " E_F", color="grey", fontsize=8, va="top")
    ax.set_xlabel("E (eV)")
    ax.set_ylabel("transmission T(E)")
    ax.set_title(f"H chain ({a.spacing:g} A), predicted H and exact S")
    ax.legend(frameon=False, fontsize=8, loc="upper center")
    fig.tight_layout()
    figure = Path(a.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, figure)
    write_sisl(pl, out / "lead.TSHS", overwrite=True)
    write_sisl(H_dev, out / "device.TSHS", overwrite=True)
    seconds = time.perf_counter() - t0
    summary = {
        "spacing_A": a.spacing,
        "stretch_A": a.stretch,
        "fermi_level_eV": fermi,
        "principal_layer_cells": n_pl,
        "device_atoms": len(device),
        "seconds": seconds,
    }
    (out / "transport.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {figure}, {out}/lead.TSHS, {out}/device.TSHS in {seconds:.1f} s")


if __name__ == "__main__":
    main()
