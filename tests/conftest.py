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
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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
    a = Atoms("C2H2", positions=[[0, 0, 0], [0.7, 0.1, 1.23], [-0.95, -0.1, -0.1],
                                 [1.65, 0.25, 1.3]],
              cell=[8, 8, 2.46], pbc=[False, False, True])
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
    path = _run(a, gpw_dir / "chain_k13.gpw", h=0.25,
                kpts={"size": (1, 1, 13), "gamma": True}, symmetry="off")
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
    return _run(chain(), gpw_dir / "chain_k3.gpw", h=0.25,
                kpts={"size": (1, 1, 3), "gamma": True}, symmetry="off")


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
    return _run(chain(), gpw_dir / "chain_k13_tr.gpw", h=0.25,
                kpts={"size": (1, 1, 13), "gamma": True},
                symmetry={"point_group": False, "time_reversal": True})
