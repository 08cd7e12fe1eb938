"""Band structures: physics against GPAW (oracle blocks), files, plot, command, errors."""

import argparse
import json

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.spectrum.band_structure import BandStructure

from ase_gearsh import GearsHCalculator
from ase_gearsh.bands import (
    BandsError,
    band_gap,
    band_path,
    bands_structure,
    compare_bands,
    fermi_grid,
    model_bands,
    plot_bands,
    reference_bands,
    register,
    write_bands_csv,
)
from ase_gearsh.core.data import Dataset
from ase_gearsh.core.errors import GearsHError
from ase_gearsh.core.io import OutputPathError


class Oracle:
    """Stands in for the network: returns the dataset's GPAW blocks."""

    def __init__(self, structure):
        self.s = structure

    def __call__(self, atoms, progress=False, layout=False):  # the Predictor's call
        assert np.allclose(atoms.positions, self.s.atoms.positions)
        return self.s.blocks("H")


@pytest.fixture(scope="module")
def model(chain_dataset, make_config, tmp_path_factory):
    """A model of the chain's elements with basis functions (for the exact S) and no
    network parameters: the oracle gives H, so the costly initialisation of the
    session's ``small_model`` is not needed here."""
    from ase_gearsh.core.basis import Registry
    from ase_gearsh.model.engine import Model, pair_cutoff_matrix
    from ase_gearsh.model.graph import attach_labels, build_graph
    from ase_gearsh.model.layout import Layout
    from ase_gearsh.model.statistics import fit_statistics
    from ase_gearsh.training.config import check_config, model_settings
    from gpaw_tools.overlap import basis_for_registry

    structures = list(Dataset(chain_dataset))
    registry = Registry.from_structures(structures)
    layout = Layout(registry)
    small = make_config(chain_dataset, tmp_path_factory.mktemp("run"))["model"]
    cfg = check_config({"data": {"train_data_path": "x"}, "model": small})
    pc = pair_cutoff_matrix(registry, 7.0)
    graphs = []
    for s in structures:
        g = build_graph(s.atoms, registry.species_index(s.atoms.numbers), 5.0, pc)
        attach_labels(g, s, layout)
        graphs.append(g)
    stats = fit_statistics(graphs, layout, pc)
    settings = model_settings(cfg, registry.n_species, layout.lmax_out, layout.n_features)
    m = Model(settings, registry, stats, None, cfg)
    basis = basis_for_registry(registry, "PBE", "paw")
    m.basis_data = {k: v.to_dict() for k, v in basis.items()}
    return m


@pytest.fixture(scope="module")
def chain(chain_dataset):
    return Dataset(chain_dataset)[0]


def oracle(model, structure, **kw):
    calc = GearsHCalculator(model, warn_extrapolation=False, progress=False, **kw)
    calc._predictor = Oracle(structure)
    return calc


@pytest.fixture(scope="module")
def oracle_bands(model, chain, chain_kpts):
    """(model bands, GPAW bands) of the chain along G-X with the oracle blocks."""
    atoms = chain.atoms.copy()
    calc = oracle(model, chain)
    bs = model_bands(atoms, calc, "GX", npoints=9)
    assert calc.parameters.kpts is None  # restored
    ref = reference_bands(chain_kpts[0], bs.path, atoms=atoms)
    return bs, ref


def test_oracle_bands_equal_gpaw_fixed_density(oracle_bands, model, chain, chain_kpts):
    bs, ref = oracle_bands
    k = bs.path.kpts
    # G to X along the chain's only periodic axis (z), not ASE's 3D tetragonal X
    assert np.allclose(k[:, :2], 0) and np.allclose(k[[0, -1], 2], [0, 0.5])
    assert np.allclose(ref.path.kpts, k)
    # every band (GPAW's LCAO run asked for all 26 orbitals' bands) to 1e-5 eV
    assert bs.energies.shape == ref.energies.shape == (1, 9, 26)
    assert np.abs(bs.energies - ref.energies).max() < 1e-5
    assert np.ptp(bs.energies[0, :, 4]) > 0.5  # bands disperse: a real test of H(k), S(k)
    # the .gpw's own number of bands on request, and a list of k-points for a path
    own = reference_bands(chain_kpts[0], k[::4], nbands=None)
    assert own.energies.shape == (1, 3, 10)
    assert np.abs(own.energies[0] - bs.energies[0, ::4, :10]).max() < 1e-5
    # E_F from a k-grid: the default grid, or the one asked for
    grid = fermi_grid(chain.atoms)
    assert grid == {"size": (1, 1, 11), "gamma": True}
    grid_calc = oracle(model, chain, kpts=grid)
    assert bs.reference == pytest.approx(grid_calc.get_property("fermi_level", chain.atoms))
    atoms = chain.atoms.copy()
    bs13 = model_bands(atoms, oracle(model, chain), "GX", npoints=3, fermi_kpts=(1, 1, 13))
    assert bs13.reference == pytest.approx(
        oracle(model, chain, kpts=(1, 1, 13)).get_property("fermi_level", atoms)
    )
    # against GPAW's own SCF Fermi level (other smearing, so only roughly)
    assert abs(bs.reference - ref.reference) < 0.3
    c = compare_bands(bs, ref)
    assert c["mae_eV"] < 1e-6 and c["values_compared"] > 0


def test_command_writes_csv_json_png(oracle_bands, model, chain, chain_kpts, tmp_path):
    out = tmp_path / "bands"
    logged = []
    summary = bands_structure(
        chain.atoms,
        oracle(model, chain),
        out,
        path="GX",
        npoints=9,
        reference=chain_kpts[0],
        log=logged.append,
    )
    assert sorted(p.name for p in out.iterdir()) == ["bands.csv", "bands.json", "bands.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands"]  # no lock or temp left
    data = json.loads((out / "bands.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert data["path"] == "GX" and data["n_kpts"] == 9 and data["n_bands"] == 26
    assert set(data["special_points"]) == {"G", "X"}
    bs, ref = oracle_bands
    assert data["fermi_level_eV"] == pytest.approx(bs.reference)
    r = data["reference"]
    assert r["mae_eV"] < 1e-6 and r["max_abs_error_eV"] < 1e-5
    assert r["fermi_level_eV"] == pytest.approx(ref.reference)
    assert r["band_gap"] == json.loads(json.dumps(band_gap(ref)))
    assert data["band_gap"]["gap_eV"] is None or data["band_gap"]["gap_eV"] >= 0
    rows = (out / "bands.csv").read_text().splitlines()
    assert rows[0] == "k,x,kx,ky,kz,band,energy_eV,gpaw_energy_eV"
    assert len(rows) == 1 + 9 * 26
    table = [row.split(",") for row in rows[1:]]
    for row in table:
        q, n = int(row[0]), int(row[5])
        assert float(row[6]) == pytest.approx(bs.energies[0, q, n], abs=1e-7)
        assert float(row[7]) == pytest.approx(ref.energies[0, q, n], abs=1e-7)
    assert float(table[-1][4]) == pytest.approx(0.5)  # kz at X
    assert float(table[-1][1]) == pytest.approx(np.pi / chain.atoms.cell[2, 2])  # x: 1/A
    assert (out / "bands.png").stat().st_size > 10_000
    # a reference with fewer bands leaves the GPAW column empty above them
    fewer = BandStructure(ref.path, ref.energies[:, :, :10], reference=ref.reference)
    write_bands_csv(tmp_path / "fewer.csv", bs, fewer)
    rows = [r.split(",") for r in (tmp_path / "fewer.csv").read_text().splitlines()[1:]]
    assert all((r[7] == "") == (int(r[5]) >= 10) for r in rows)
    (tmp_path / "fewer.csv").unlink()
    assert any("path GX, 9 k-points" in line for line in logged)
    assert any("against GPAW" in line and "MAE" in line for line in logged)
    assert logged[-1] == f"wrote {out}/: bands.csv bands.json bands.png"
    # an existing folder is kept without overwrite, replaced with it
    before = (out / "bands.json").read_bytes()
    with pytest.raises(OutputPathError, match="already exists.*--overwrite"):
        bands_structure(chain.atoms, oracle(model, chain), out, path="GX", npoints=9, log=None)
    assert (out / "bands.json").read_bytes() == before
    bands_structure(
        chain.atoms, oracle(model, chain), out, path="GX", npoints=5, overwrite=True, log=print
    )
    assert json.loads((out / "bands.json").read_text())["reference"] is None
    assert "gpaw_energy_eV" not in (out / "bands.csv").read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands"]


def test_errors_are_clear_and_nothing_is_written(model, chain, chain_kpts, make_atoms, tmp_path):
    out = tmp_path / "out"

    def fails(error, match, structure=chain.atoms, **kw):
        kw = {"path": "GX", "npoints": 9, "log": None, **kw}
        with pytest.raises(error, match=match) as info:
            bands_structure(structure, oracle(model, chain), out, **kw)
        assert isinstance(info.value, GearsHError)
        assert "\n" not in str(info.value)
        assert list(tmp_path.iterdir()) == []  # no folder, no temporary folder, no lock
        return str(info.value)

    water = molecule("H2O")
    water.center(vacuum=3.0)
    fails(BandsError, r"at least one periodic direction.*pbc=\[False, False, False\]", water)
    msg = fails(BandsError, r"unknown special point\(s\) \['M'\] in path 'GXMG'", path="GXMG")
    assert "has ['G', 'X']" in msg  # the chain (periodic along z only) has G and X
    fails(BandsError, r"unknown special point\(s\) \['Q'\]", path="GQ")
    fails(BandsError, "every piece of a path between breaks", path="GX,G")
    fails(BandsError, r"npoints must be an integer >= 2.*got 1", npoints=1)
    fails(BandsError, r"npoints=2 is too few for the path 'GX'.*at least 3", npoints=2)
    fails(BandsError, "emin < emax", emin=2.0, emax=-2.0)
    fails(BandsError, "fermi_kpts must be three positive integers", fermi_kpts=(4, 1, 13))
    moved = make_atoms.chain()
    moved.positions[1] += [0.0, 0.05, 0.0]
    fails(
        BandsError,
        r"reference .*chain_k13.gpw holds another structure: atom 1 \(C\) is 0.05 A away",
        moved,
        reference=chain_kpts[0],
    )
    longer = make_atoms.chain().repeat((1, 1, 2))
    fails(BandsError, "holds another structure: expected C4H4", longer, reference=chain_kpts[0])
    fails(BandsError, "not found; expected a GPAW .gpw", reference=tmp_path / "nope.gpw")
    fails(GearsHError, "not found", structure=tmp_path / "nope.xyz")
    small = oracle(model, chain, dense_limit=10)
    with pytest.raises(BandsError, match="26 orbitals exceed dense_limit=10"):
        bands_structure(chain.atoms, small, out, path="GX", log=None)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputPathError, match="already exists; choose another or pass --over"):
        bands_structure(chain.atoms, oracle(model, chain), out, path="GX", log=None)
    assert [p.name for p in out.iterdir()] == ["keep"]
    # the library function checks the structure too; a wrapped periodic image is the same
    with pytest.raises(BandsError, match="holds another structure"):
        reference_bands(chain_kpts[0], [[0, 0, 0]], atoms=moved)
    shifted = make_atoms.chain()
    shifted.positions[2] += shifted.cell[2]
    from ase_gearsh.bands import check_reference

    check_reference(chain_kpts[0], shifted)
    with pytest.raises(BandsError, match="needs at least one periodic|must be a BandPath"):
        reference_bands(chain_kpts[0], np.zeros((2, 2)))


def test_paths_gaps_and_plot(tmp_path):
    si = bulk("Si")
    bp = band_path(si, "GXWK,UL", npoints=40)
    assert bp.path == "GXWK,UL" and band_path(si, bp) is bp
    assert band_path(si, "ΓX", npoints=5).path == "GX"
    assert band_path(si, None, npoints=100).path  # ASE's standard path
    with pytest.raises(BandsError, match=r"this cell .* has \['G', 'K', 'L', 'U', 'W', 'X'\]"):
        band_path(si, "GZ")
    with pytest.raises(BandsError, match="belongs to the cell"):
        band_path(si.repeat((2, 1, 1)), bp)
    sheet = bulk("Cu", "sc", a=2.5) * (1, 1, 1)
    sheet.pbc = [True, True, False]
    sheet.cell[2, 2] = 10.0
    k = band_path(sheet, "GXMG", npoints=20).kpts
    assert np.allclose(k[:, 2], 0) and np.abs(k).max() == pytest.approx(0.5)
    assert fermi_grid(sheet) == {"size": (11, 11, 1), "gamma": True}
    assert fermi_grid(si)["size"] == (9, 9, 9) and fermi_grid(bulk("C"))["size"] == (10, 10, 10)
    assert fermi_grid(si, density=8.0, max_kpts=64)["size"] == (4, 4, 4)
    # gaps: an insulator (indirect) and a metal, from a hand-made band structure
    x = np.linspace(0, 1, len(bp.kpts))
    e = np.stack([-3 + np.cos(3 * x), 1 - 0.5 * np.sin(3 * x)], axis=1)[None]
    bs = BandStructure(bp, e, reference=0.0)
    gap = band_gap(bs)
    assert gap["gap_eV"] == pytest.approx(e[0, :, 1].min() - e[0, :, 0].max())
    assert not gap["metallic"] and gap["direct"] is False
    assert band_gap(BandStructure(bp, e, reference=0.8)) == {"gap_eV": 0.0, "metallic": True}
    assert band_gap(BandStructure(bp, e, reference=9.0))["gap_eV"] is None
    ref = BandStructure(bp, e[:, :, :1] + 0.01, reference=0.0)
    c = compare_bands(bs, ref)
    assert c["mae_eV"] == pytest.approx(0.01) and c["bands_compared"] == 1
    # a path with a break is drawn in pieces, labelled K|U
    png = tmp_path / "si.png"
    plot_bands(png, bs, reference=ref, emin=-6, emax=4, title="test")
    assert png.stat().st_size > 10_000
    from ase_gearsh.bands import _segments, _tick_labels

    assert len(_segments(bs)[1]) == 2
    assert _tick_labels(bs)[1] == ["Γ", "X", "W", "K|U", "L"]
    with pytest.raises(BandsError, match="emin < emax"):
        plot_bands(png, bs, emin=1, emax=1)


def test_register_adds_the_bands_command():
    p = argparse.ArgumentParser(prog="gearsh")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(["bands", "c.traj", "-m", "m.ckpt", "-o", "out", "--path", "GX"])
    assert args.path == "GX" and args.npoints == 100 and args.reference is None
    assert (args.emin, args.emax, args.overwrite, args.quiet) == (-5.0, 5.0, False, False)
    assert callable(args.func)
    args = p.parse_args("bands c.traj -m m.ckpt -o out --npoints 1 --fermi-kpts 1,1,9 -q".split())
    with pytest.raises(BandsError, match="npoints must be an integer >= 2"):
        args.func(args)
    args.npoints, args.fermi_kpts = 10, "1,1"
    with pytest.raises(BandsError, match="--fermi-kpts expects three positive integers"):
        args.func(args)
