"""Export to sisl / TBtrans: round trips through files, physics against GPAW (oracle
blocks), orbital metadata, and errors that leave existing files alone."""

import argparse
import os

import numpy as np
import pytest
import sisl
from ase.io import write

from ase_gearsh import GearsHCalculator
from ase_gearsh.core.data import Dataset
from ase_gearsh.core.errors import GearsHError
from ase_gearsh.export import (
    ExportError,
    blocks_to_sisl,
    export_structure,
    register,
    supported_formats,
    to_sisl,
    write_sisl,
)

K_OFF = [0.0, 0.0, 0.137]


class Oracle:
    """Stands in for the network: returns the dataset's GPAW blocks."""

    def __init__(self, structure):
        self.s = structure

    def __call__(self, atoms, progress=False, layout=False):  # the Predictor's call
        assert np.allclose(atoms.positions, self.s.atoms.positions)
        return self.s.blocks("H")


@pytest.fixture(scope="module")
def model(small_model):
    """The small random model with the basis functions of its species (exact S)."""
    from gpaw_tools.overlap import basis_for_registry

    m = small_model
    if not getattr(m, "basis_data", None):
        m.basis_data = {
            k: v.to_dict() for k, v in basis_for_registry(m.registry, "PBE", "paw").items()
        }
    return m


@pytest.fixture(scope="module")
def chain_calc(model, make_atoms):
    atoms = make_atoms.chain()
    calc = GearsHCalculator(model, kpts=[[0, 0, 0], K_OFF], warn_extrapolation=False)
    atoms.calc = calc
    return atoms, calc


def oracle_calc(model, structure, **kw):
    calc = GearsHCalculator(model, warn_extrapolation=False, **kw)
    calc._predictor = Oracle(structure)
    atoms = structure.atoms.copy()
    atoms.calc = calc
    return atoms, calc


def dense(m):
    return m.toarray() if hasattr(m, "toarray") else np.asarray(m)


def test_round_trip_tshs_equals_calculator(model, chain_calc, tmp_path):
    """export_structure -> .TSHS -> sisl: eigenvalues, H(k) and S(k) are the calculator's."""
    atoms, calc = chain_calc
    out = tmp_path / "chain.TSHS"
    logged = []
    summary = export_structure(
        atoms, model, out, kpts=[[0, 0, 0], K_OFF], log=logged.append, progress=False
    )
    assert out.is_file() and summary["output"] == str(out) and summary["format"] == "TSHS"
    assert len(logged) == 1 and "lattice shifts" in logged[0] and str(out) in logged[0]
    assert summary["fermi_level_eV"] == pytest.approx(calc.get_fermi_level())
    assert [p.name for p in tmp_path.iterdir()] == ["chain.TSHS"]  # no temporary left
    H = sisl.get_sile(out).read_hamiltonian()
    assert not H.orthogonal
    # every lattice shift of H and S: 1 image along x, y; 2 * 4 + 1 along the 2.46 A axis
    assert list(H.geometry.nsc) == [1, 1, 9] == summary["nsc"]
    assert H.no == calc.get_number_of_bands() == summary["orbitals"]
    for q, k in enumerate([[0, 0, 0], K_OFF]):
        eps = calc.get_eigenvalues(kpt=q)
        assert np.ptp(eps) > 1.0  # a real spectrum
        assert np.abs(H.eigh(k=k) - eps).max() < 1e-6
        assert np.abs(dense(H.Sk(k=k)) - calc.get_overlap(kpt=k).toarray()).max() < 1e-10
        assert np.abs(dense(H.Hk(k=k)) - calc.get_hamiltonian(kpt=k).toarray()).max() < 1e-8
    # the sisl object itself (no file) agrees as well
    Hs = to_sisl(calc)
    assert np.abs(Hs.eigh(k=K_OFF) - calc.get_eigenvalues(kpt=1)).max() < 1e-9


def test_oracle_blocks_give_gpaw_eigenvalues(model, chain_dataset, chain_kpts, tmp_path):
    """GPAW's own H blocks with the exact S, through sisl and a file: GPAW's eigenvalues
    on its k-grid and at an off-grid k; S(R) equals GPAW's real-space S blocks."""
    s = Dataset(chain_dataset)[0]
    atoms, calc = oracle_calc(model, s)
    H = to_sisl(calc)
    path = write_sisl(H, tmp_path / "oracle.TSHS")
    Hf = sisl.get_sile(path).read_hamiltonian()
    for q, k in enumerate(s.reference_kpts):
        ref = s.reference_eigenvalues[0, q]
        assert np.abs(Hf.eigh(k=k)[: len(ref)] - ref).max() < 1e-6
    _, k_off, eps_ref = chain_kpts
    assert np.abs(Hf.eigh(k=k_off)[: len(eps_ref)] - eps_ref).max() < 1e-6
    # exact S(R) from S(k): the same matrix as GPAW's extracted real-space blocks
    ref = blocks_to_sisl(s.atoms, s.blocks("H"), s.blocks("S"), model.basis_data)
    assert list(ref.geometry.nsc) == list(H.geometry.nsc)
    for k in ([0, 0, 0], k_off, [0, 0, 0.5]):
        assert np.abs(dense(H.Sk(k=k)) - dense(ref.Sk(k=k))).max() < 1e-8
        assert np.abs(dense(H.Hk(k=k)) - dense(ref.Hk(k=k))).max() < 1e-10


def test_orbital_metadata(model, water_dataset, tmp_path):
    s = Dataset(water_dataset)[0]
    atoms, calc = oracle_calc(model, s)
    H = to_sisl(calc)
    g = H.geometry
    symbols = atoms.get_chemical_symbols()
    assert [a.tag for a in g.atoms] == symbols
    assert [a.Z for a in g.atoms] == list(atoms.numbers)
    counts = calc.blocks().orbital_counts.tolist()
    assert [a.no for a in g.atoms] == counts
    assert list(g.nsc) == [1, 1, 1]  # a molecule: no lattice shifts
    assert np.abs(H.eigh() - calc.get_eigenvalues()).max() < 1e-9
    for a, sym in zip(g.atoms, symbols):
        ls = [e["l"] for e in model.registry.species if e["symbol"] == sym][0]
        expect_l = [l for l in ls for _ in range(2 * l + 1)]
        expect_m = [m for l in ls for m in range(-l, l + 1)]
        assert [o.l for o in a.orbitals] == expect_l
        assert [o.m for o in a.orbitals] == expect_m
        rc = [e["rc"] for e in model.registry.species if e["symbol"] == sym][0]
        assert max(o.R for o in a.orbitals) == pytest.approx(rc)
    o_atom = g.atoms[symbols.index("O")]
    assert [o.name() for o in o_atom.orbitals][:2] == ["2sZ1", "2pyZ1"]
    assert o_atom.orbitals[-1].P and o_atom.orbitals[-1].n == 3  # d polarisation
    # HSX keeps species and l; TSHS keeps orbital counts (species come from a geometry)
    hsx = sisl.get_sile(write_sisl(H, tmp_path / "water.HSX")).read_hamiltonian()
    assert [a.symbol for a in hsx.geometry.atoms] == symbols
    assert [[o.l for o in a.orbitals] for a in hsx.geometry.atoms] == [
        [o.l for o in a.orbitals] for a in g.atoms
    ]
    tshs = sisl.get_sile(write_sisl(H, tmp_path / "water.TSHS"))
    assert [a.no for a in tshs.read_hamiltonian().geometry.atoms] == counts
    again = tshs.read_hamiltonian(geometry=g)
    assert [a.tag for a in again.geometry.atoms] == symbols
    assert np.abs(again.eigh() - calc.get_eigenvalues()).max() < 1e-6


def test_errors_leave_existing_files_alone(model, make_atoms, tmp_path):
    atoms = make_atoms.chain()
    out = tmp_path / "chain.TSHS"
    out.write_bytes(b"precious")
    with pytest.raises(GearsHError, match=r"already exists.*overwrite") as err:
        export_structure(atoms, model, out, log=lambda *a: None)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    assert out.read_bytes() == b"precious"
    # unknown formats, from the suffix or given, name the supported ones
    for kw in ({"output": tmp_path / "chain.xyz"}, {"output": out, "fmt": "cube"}):
        with pytest.raises(ExportError, match=r"unknown export format.*TSHS.*HSX") as err:
            export_structure(atoms, model, overwrite=True, log=lambda *a: None, **kw)
        assert "\n" not in str(err.value)
    assert out.read_bytes() == b"precious"
    assert not (tmp_path / "chain.xyz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.TSHS"]
    assert "TSHS" in supported_formats()
    # an existing file is replaced with overwrite, in the format asked for
    export_structure(atoms, model, out, fmt="hsx", overwrite=True, log=lambda *a: None)
    H = sisl.get_sile(f"{out}{{HSX}}").read_hamiltonian()
    assert H.no == 26  # C2H2: 2 x 9 + 2 x 4 orbitals
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.TSHS"]


def test_register_subcommand(model, make_atoms, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="gearsh")
    register(parser.add_subparsers(dest="command", required=True))
    structure = tmp_path / "chain.extxyz"
    write(structure, make_atoms.chain())
    out = tmp_path / "chain.TSHS"
    args = parser.parse_args(["export", str(structure), "-m", "unused", "-o", str(out), "-q"])
    assert args.func is not None and args.format is None and not args.overwrite
    args.model = model  # a loaded model instead of a checkpoint path (no recompilation)
    assert args.func(args) is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("chain.extxyz: 4 atoms, 26 orbitals, 9 lattice shifts (nsc 1x1x9)")
    assert line.endswith(f"wrote {out} (TSHS)")
    assert oct(os.stat(out).st_mode & 0o777) == "0o644"
    before = out.read_bytes()
    with pytest.raises(GearsHError, match="already exists"):
        args.func(args)
    assert out.read_bytes() == before
    args = parser.parse_args(
        ["export", str(structure), "-m", "x", "-o", str(out), "--format", "cube"]
    )
    with pytest.raises(GearsHError, match="unknown export format 'cube'"):
        args.func(args)
