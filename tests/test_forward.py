"""One forward path: prediction (chunked, bucketed) equals training (one padded batch),
and the shipped model still reproduces a stored Hamiltonian."""

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.engine import Model
from ase_gearsh.model.inference import Predictor
from ase_gearsh.testing import forward_blocks, predicted_blocks

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # eV: float32 sums in a different order (blocks of up to ~20 eV)


@pytest.fixture(scope="module")
def mp_model(small_model):
    """The small model with one message-passing step (all edges in one call)."""
    settings = dict(
        small_model.settings, mp_steps=1, mp_degree=2, mp_num_heads=2, mp_qkv_features=8
    )
    m = Model(
        settings,
        small_model.registry,
        {k: np.asarray(v) for k, v in small_model.stats.items()},
        None,
        small_model.config,
    )
    m.params = m.init_params(3)
    return m


def _structure(name, water_dataset, chain_dataset):
    path = water_dataset if name == "molecule" else chain_dataset
    return Dataset(path)[0].atoms


@pytest.mark.parametrize("mp", [0, 1])
@pytest.mark.parametrize("system", ["molecule", "periodic"])
def test_chunked_prediction_equals_training_path(
    small_model, mp_model, water_dataset, chain_dataset, mp, system
):
    model = mp_model if mp else small_model
    atoms = _structure(system, water_dataset, chain_dataset)
    g = model.graph(atoms)
    if system == "periodic":
        assert (np.abs(g.pair_shift).sum(axis=1) > 0).any()  # pairs across the cell
    ref_on, ref_pr = forward_blocks(model, g)
    assert np.abs(ref_pr).max() > 0.1  # not trivially zero
    pred = Predictor(model, edge_chunk=4, pair_chunk=2)
    for threads in (1, 2):  # bond chunks one after another, and two at a time
        pred.threads = threads
        on, pr, info = pred.canonical_blocks(g)
        assert info["pair_chunks"] > 1
        if not mp:  # message passing needs every edge in one call
            assert info["edge_chunks"] > 1
        assert np.abs(on - ref_on).max() < TOL
        assert np.abs(pr - ref_pr).max() < TOL
    # the same through the default chunks and the GPAW-order assembly, at a k-point
    k = [0, 0, 0.3] if system == "periodic" else None
    H_pred = Predictor(model)(atoms).matrix(k, sparse=False)
    H_train = pred.to_gpaw(g, ref_on, ref_pr).matrix(k, sparse=False)
    assert np.abs(H_pred - H_train).max() < TOL
    assert np.abs(H_pred - H_pred.conj().T).max() < 1e-12  # Hermitian


def test_helpers_agree_on_chunking(small_model, water_dataset):
    g = small_model.graph(Dataset(water_dataset)[1].atoms)
    a = predicted_blocks(small_model, g, edge_chunk=5, pair_chunk=2)
    b = predicted_blocks(small_model, g)
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) < TOL


def test_shipped_checkpoint_reproduces_stored_hamiltonian():
    """Golden test: models/molecules.ckpt on a stored rattled ethanol
    (tests/data/make_golden.py wrote the reference with the release before)."""
    ref = np.load(ROOT / "tests" / "data" / "golden_molecules_ethanol.npz")
    model = Model.from_checkpoint(ROOT / "models" / "molecules.ckpt")
    atoms = Atoms(numbers=ref["numbers"], positions=ref["positions"])
    H = Predictor(model)(atoms).matrix(sparse=False)
    assert H.shape == ref["H"].shape
    assert np.abs(ref["H"]).max() > 10
    assert np.abs(H - ref["H"]).max() < 2e-4


def test_layout_computed_while_the_network_runs(small_model, chain_dataset, water_dataset):
    """``Predictor(..., layout=True)`` (the calculator's call) builds H's CSR layout in a
    thread during the network: the same matrices at Gamma and at k; a layout of other
    blocks is refused."""
    from ase_gearsh.core.blocks import csr_layout

    atoms = Dataset(chain_dataset)[0].atoms
    plain = Predictor(small_model)(atoms)
    early = Predictor(small_model)(atoms, layout=True)
    assert hasattr(early, "_csr")  # adopted, before any matrix is asked for
    ref = csr_layout(early.orbital_counts, early.pair_i, early.pair_j)
    for x, y in zip(early._csr[:2], ref[:2]):  # indptr, indices
        np.testing.assert_array_equal(x, y)
    assert not hasattr(plain, "_csr")
    for k in (None, [0, 0, 0.3]):
        a, b = plain.matrix(k), early.matrix(k)
        assert a.nnz == b.nnz > 0
        assert (a != b).nnz == 0
    other = Predictor(small_model)(Dataset(water_dataset)[0].atoms)
    with pytest.raises(ValueError, match="does not fit"):
        plain.adopt_layout(csr_layout(other.orbital_counts, other.pair_i, other.pair_j))
