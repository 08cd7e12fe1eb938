"""Shared fixtures: small GPAW LCAO runs, each done once per test session.

The runs are written by plain GPAW scripts (not by gpaw_tools.generate), so
the extractor is tested on the files users have.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

LCAO = dict(mode="lcao", basis="szp(dzp)", xc="PBE", convergence={"density": 1e-4}, txt=None)


def pytest_configure(config):
    # keep GPAW's BLAS single-threaded next to pytest (two cores in CI)
    import os
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # models of equal shape share compiled code across tests and subprocesses
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gearsh-jax-cache-"))


def _run(atoms, path, calculator=None, **kwargs):
    if calculator is None:
        from gpaw import GPAW as calculator
    params = dict(LCAO, h=0.2)
    params.update(kwargs)
    atoms.calc = calculator(**params)
    atoms.get_potential_energy()
    atoms.calc.write(str(path))
    return path


def chain():
    """Zig-zag (CH)_n chain, periodic along z only: low symmetry, cheap k-points."""
    a = Atoms(
        "C2H2",
        positions=[[0, 0, 0], [0.7, 0.1, 1.23], [-0.95, -0.1, -0.1], [1.65, 0.25, 1.3]],
        cell=[8, 8, 2.46],
        pbc=[False, False, True],
    )
    a.center(axis=(0, 1))
    return a


def low_symmetry_molecule():
    """Methanol, rattled so that it has no symmetry at all."""
    a = molecule("CH3OH")
    a.rattle(0.05, seed=3)
    a.center(vacuum=4.0)
    return a


@pytest.fixture(scope="session")
def gpw_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpw")


@pytest.fixture(scope="session")
def h2o_gpw(gpw_dir):
    a = molecule("H2O")
    a.center(vacuum=4.0)
    return _run(a, gpw_dir / "h2o.gpw")


@pytest.fixture(scope="session")
def classic_h2o_gpw(gpw_dir):
    from gpaw.calculator import GPAW as ClassicGPAW

    a = molecule("H2O")
    a.center(vacuum=4.0)
    return _run(a, gpw_dir / "h2o_classic.gpw", calculator=ClassicGPAW)


@pytest.fixture(scope="session")
def chain_kpts(gpw_dir):
    """The chain on a 13-point Gamma-centred grid, and GPAW's eigenvalues at an
    off-grid k from a fixed-density run."""
    a = chain()
    path = _run(
        a,
        gpw_dir / "chain_k13.gpw",
        h=0.25,
        kpts={"size": (1, 1, 13), "gamma": True},
        symmetry="off",
    )
    k_off = np.array([0.0, 0.0, 0.137])
    fd = a.calc.fixed_density(kpts=[k_off], symmetry="off", txt=None)
    return path, k_off, np.asarray(fd.get_eigenvalues(kpt=0))


@pytest.fixture(scope="session")
def chain_gamma_gpw(gpw_dir):
    """The chain at the Gamma point only: its 2.46 A cell is far too small."""
    return _run(chain(), gpw_dir / "chain_gamma.gpw", h=0.25)


@pytest.fixture(scope="session")
def chain_coarse_gpw(gpw_dir):
    """The chain on a 3-point grid: too coarse for the range of H."""
    return _run(
        chain(),
        gpw_dir / "chain_k3.gpw",
        h=0.25,
        kpts={"size": (1, 1, 3), "gamma": True},
        symmetry="off",
    )


@pytest.fixture(scope="session")
def spin_gpw(gpw_dir):
    a = molecule("OH")
    a.center(vacuum=3.5)
    a.set_initial_magnetic_moments([0.5, 0.5])
    return _run(a, gpw_dir / "oh_spin.gpw", h=0.25, spinpol=True)


@pytest.fixture(scope="session")
def pw_gpw(gpw_dir):
    from gpaw import PW

    a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    a.center(vacuum=2.5)
    return _run(a, gpw_dir / "h2_pw.gpw", mode=PW(200), basis="dzp", h=None)


@pytest.fixture(scope="session")
def fd_gpw(gpw_dir):
    a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    a.center(vacuum=2.5)
    return _run(a, gpw_dir / "h2_fd.gpw", mode="fd", basis="dzp", h=0.25)


@pytest.fixture(scope="session")
def chain_time_reversal_gpw(gpw_dir):
    """The chain with time-reversal symmetry only: 7 IBZ points for 13."""
    return _run(
        chain(),
        gpw_dir / "chain_k13_tr.gpw",
        h=0.25,
        kpts={"size": (1, 1, 13), "gamma": True},
        symmetry={"point_group": False, "time_reversal": True},
    )


# -- model fixtures ------------------------------------------------------------
def rattled_water(seed):
    """H2O, rattled and randomly rotated (no symmetry)."""
    from scipy.spatial.transform import Rotation

    a = molecule("H2O")
    a.rattle(0.06, seed=seed)
    a.positions = a.positions @ Rotation.random(random_state=seed).as_matrix().T
    a.center(vacuum=3.5)
    return a


@pytest.fixture(scope="session")
def water_dataset(gpw_dir, tmp_path_factory):
    """Four rattled water molecules (Gamma point) as a dataset folder."""
    from gpaw_tools.extract import extract_files

    paths = [_run(rattled_water(s), gpw_dir / f"water{s}.gpw", h=0.25) for s in range(4)]
    out = tmp_path_factory.mktemp("water_dataset")
    written, _, failed = extract_files(paths, out, progress=False, log=lambda *a: None)
    assert not failed and len(written) == 4
    return out


@pytest.fixture(scope="session")
def chain_dataset(chain_kpts, tmp_path_factory):
    """The k-sampled (CH)n chain: pairs with lattice shifts R."""
    from gpaw_tools.extract import extract_files

    out = tmp_path_factory.mktemp("chain_dataset")
    written, _, failed = extract_files([chain_kpts[0]], out, progress=False, log=lambda *a: None)
    assert not failed
    return out


SMALL_MODEL = {
    "atom_centered": {
        "descriptor": {
            "num_tensordenses": 1,
            "max_tensordense_degree": 2,
            "num_tensordense_features": 6,
            "radial_basis": {
                "cutoff": 5.0,
                "num_radial": 8,
                "max_degree": 2,
                "num_elemental_embedding": 8,
            },
        }
    },
    "bond_centered": {
        "cutoff": 7.0,
        "max_degree": 2,
        "bond_expansion_options": {"max_degree": 2, "num": 8},
    },
    "mlp": {"mlp_layer_widths": [8, 8]},
}


def small_config(train_path, directory, **overrides):
    """A fast training config on ``train_path`` (dict; nested overrides merge)."""
    import copy

    paths = [str(p) for p in train_path] if isinstance(train_path, list) else str(train_path)
    cfg = {
        "data": {
            "train_data_path": paths,
            "directory": str(directory),
            "experiment": "run",
            "n_valid": 1,
            "atoms_pad_multiple": 8,
            "nl_pad_multiple": 32,
            "batch_size": 1,
        },
        "model": copy.deepcopy(SMALL_MODEL),
        "optimizer": {"lr": 0.01, "name": "adam", "opt_kwargs": {}, "schedule": {"name": None}},
        # the reliability reference compiles the atom stage once more: fitted only
        # where a test asks for it
        "training": {"n_epochs": 2, "seed": 0, "reliability": False},
    }

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v

    merge(cfg, overrides)
    return cfg


@pytest.fixture(scope="session")
def spin_dataset(spin_gpw, tmp_path_factory):
    """The spin-polarised OH radical as a dataset folder (nspins=2)."""
    from gpaw_tools.extract import extract_files

    out = tmp_path_factory.mktemp("spin_dataset")
    written, _, failed = extract_files([spin_gpw], out, progress=False, log=lambda *a: None)
    assert not failed and len(written) == 1
    return out


# -- helpers as fixtures (test modules do not import conftest) ------------------
@pytest.fixture(scope="session")
def make_config():
    """:func:`small_config`: ``make_config(train_path, directory, **overrides)``."""
    return small_config


@pytest.fixture(scope="session")
def gpaw_run():
    """``gpaw_run(atoms, path, calculator=None, **params)``: a GPAW LCAO run (the
    fixtures' settings, h = 0.2 A unless given) written to ``path``."""
    return _run


@pytest.fixture(scope="session")
def make_atoms():
    """Builders of fresh test structures: ``make_atoms.chain()``,
    ``make_atoms.low_symmetry_molecule()``, ``make_atoms.rattled_water(seed)``."""
    from types import SimpleNamespace

    return SimpleNamespace(
        chain=chain, low_symmetry_molecule=low_symmetry_molecule, rattled_water=rattled_water
    )


@pytest.fixture(scope="session")
def small_model(water_dataset, chain_dataset):
    """A randomly initialised small model over H, C, O with fitted statistics."""
    from ase_gearsh.core.basis import Registry
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.model.engine import Model, pair_cutoff_matrix
    from ase_gearsh.model.graph import attach_labels, build_graph
    from ase_gearsh.model.layout import Layout
    from ase_gearsh.model.statistics import fit_statistics
    from ase_gearsh.training.config import check_config, model_settings

    structures = list(Dataset(water_dataset)) + list(Dataset(chain_dataset))
    registry = Registry.from_structures(structures)
    layout = Layout(registry)
    cfg = check_config({"data": {"train_data_path": "x"}, "model": SMALL_MODEL})
    pc = pair_cutoff_matrix(registry, 7.0)
    graphs = []
    for s in structures:
        g = build_graph(s.atoms, registry.species_index(s.atoms.numbers), 5.0, pc)
        attach_labels(g, s, layout)
        graphs.append(g)
    stats = fit_statistics(graphs, layout, pc)
    settings = model_settings(cfg, registry.n_species, layout.lmax_out, layout.n_features)
    model = Model(settings, registry, stats, None, cfg)
    model.params = model.init_params(1)
    return model
