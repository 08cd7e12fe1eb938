"""The eigenvalue loss: Gamma-point levels of (H, S) from canonical blocks, checked
against GPAW's own eigenvalues, and a training run that uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.graph import attach_labels, batch_graphs
from ase_gearsh.training.train import _eigen_sums, gamma_levels


def _batch(model, structures, slots):
    graphs = []
    for s in structures:
        g = model.graph(s.atoms)
        attach_labels(g, s, model.layout, overlap=True)
        graphs.append(g)
    b = batch_graphs(graphs, 4, 8, structures=slots)
    b["pair_weight"] = np.ones(len(b["pair_i"]), np.float32)
    b["pair_weight"][sum(len(g.pair_i) for g in graphs) :] = 0
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_levels_of_the_labels_are_gpaws_eigenvalues(water_dataset, small_model):
    ds = Dataset(water_dataset)
    structures = [ds[0], ds[3]]
    b = _batch(small_model, structures, slots=3)  # a third, empty slot
    mask = jnp.asarray(small_model.layout.orbital_mask)
    levels = np.asarray(gamma_levels(b["onsite"], b["pairs"], b, mask, n_atoms=3))
    for k, s in enumerate(structures):
        gpaw = s.reference_eigenvalues[0, 0]  # spin 0, Gamma
        n = s.n_orbitals
        assert np.abs(levels[k, : len(gpaw)] - gpaw).max() < 2e-3, (levels[k, :5], gpaw[:5])
        np.testing.assert_allclose(levels[k, n:], 1000.0, rtol=1e-5)  # unused slots
        assert abs(float(b["fermi"][k]) - s.fermi_level) < 1e-5
    np.testing.assert_allclose(levels[2], 1000.0, rtol=1e-5)  # the empty slot
    # the two structures differ, so their levels are not mixed up
    assert np.abs(levels[0, :4] - levels[1, :4]).max() > 1e-3


def test_eigenvalue_errors_vanish_for_the_labels_and_have_gradients(water_dataset, small_model):
    ds = Dataset(water_dataset)
    b = _batch(small_model, [ds[1], ds[2]], slots=2)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    zero = _eigen_sums(b["onsite"], b["pairs"], b, mask, 5.0, 3)
    assert float(zero[2]) >= 4 and float(zero[0]) < 1e-8  # levels in the window, no error

    def loss(shift):
        s = _eigen_sums(
            b["onsite"] + shift * jnp.eye(b["onsite"].shape[-1]), b["pairs"], b, mask, 5.0, 3
        )
        return s[0] / s[2]

    g = jax.grad(loss)(0.05)
    assert np.isfinite(float(g)) and float(g) > 0  # a rigid shift raises the error


@pytest.mark.slow  # two more compilations of the training step: `make test-all`
def test_training_with_the_eigenvalue_loss(water_dataset, tmp_path, make_config):
    from ase_gearsh.model.checkpoint import load_checkpoint
    from ase_gearsh.training.train import train

    cfg = make_config(
        water_dataset,
        tmp_path,
        data={"n_train": 3, "n_valid": 1, "batch_size": 2, "bond_fraction": 0.5},
        loss={"loss_parameters": {"eigenvalue_weight": 1.0, "eigenvalue_start": 0.5}},
        training={"n_epochs": 2},
    )
    run = train(cfg, progress=False, log=lambda *a: None)
    hist = load_checkpoint(run / "latest.ckpt")["extra"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
