"""The eigenvalue loss: Gamma-point levels of (H, S) from canonical blocks, checked
against GPAW's own eigenvalues, and a training run that uses it; the common-shift
loss (the part of the H error along S)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.graph import attach_labels, batch_graphs
from ase_gearsh.testing import canonical_rotation, random_rotation
from ase_gearsh.training.train import _eigen_sums, _shift_sums, gamma_levels


def _batch(model, structures, slots, window=None):
    graphs = []
    for s in structures:
        g = model.graph(s.atoms)
        attach_labels(g, s, model.layout, overlap=True, window=window)
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


def test_level_shift_of_h_plus_c_s_is_c_per_structure(water_dataset, small_model):
    """H + c_k S per structure: the shift sums give exactly c_k (<S, rho_w> = 1), and
    the levels of (H + c_k S, S) are GPAW's eigenvalues moved by c_k."""
    ds = Dataset(water_dataset)
    b = _batch(small_model, [ds[0], ds[2]], slots=3, window=5.0)  # a third, empty slot
    mask = jnp.asarray(small_model.layout.orbital_mask)
    zero = np.asarray(_shift_sums(b["onsite"], b["pairs"], b, mask))
    assert zero[2] == 2 and zero[0] < 1e-12  # two real structures, no error
    c = jnp.array([0.05, -0.02, 7.0])  # the empty slot's value must not count
    on = b["onsite"] + c[b["atom_graph"].clip(0, 2)][:, None, None] * b["onsite_s"]
    pr = b["pairs"] + c[b["atom_graph"][b["pair_i"]].clip(0, 2)][:, None, None] * b["pairs_s"]
    s = np.asarray(_shift_sums(on, pr, b, mask))
    np.testing.assert_allclose(s, [0.05**2 + 0.02**2, 0.07, 2.0], rtol=1e-4)
    levels = np.asarray(gamma_levels(on, pr, b, mask, n_atoms=3))
    for k, st in enumerate([ds[0], ds[2]]):
        gpaw = st.reference_eigenvalues[0, 0]
        assert np.abs(levels[k, : len(gpaw)] - gpaw - float(c[k])).max() < 2e-3


def test_level_shift_is_the_first_order_mean_shift_of_the_window(water_dataset, small_model):
    """A small random symmetric error on every block: the shift sums equal the mean
    change of the Gamma-point levels within the window (to second order), which the
    Frobenius part along S does not (it ignores where the window's states live)."""
    ds = Dataset(water_dataset)
    b = _batch(small_model, [ds[1]], slots=1, window=5.0)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    m = np.asarray(mask)[np.asarray(b["species"])]
    rng = np.random.default_rng(5)
    d_on = rng.normal(size=b["onsite"].shape) * 1e-3
    d_on = (d_on + np.swapaxes(d_on, 1, 2)) * (m[:, :, None] & m[:, None, :])
    mp = (
        np.asarray(mask)[np.asarray(b["species"])[np.asarray(b["pair_i"])]][:, :, None]
        & (np.asarray(mask)[np.asarray(b["species"])[np.asarray(b["pair_j"])]][:, None, :])
    )
    d_pr = (
        rng.normal(size=b["pairs"].shape) * 1e-3 * mp * np.asarray(b["pair_weight"])[:, None, None]
    )
    with jax.enable_x64(True):
        bb = {
            k: jnp.asarray(np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v)
            for k, v in b.items()
        }
        ref = np.asarray(gamma_levels(bb["onsite"], bb["pairs"], bb, mask, n_atoms=3))[0]
        new = np.asarray(
            gamma_levels(bb["onsite"] + d_on, bb["pairs"] + d_pr, bb, mask, n_atoms=3)
        )[0]
        inside = np.abs(ref - float(b["fermi"][0])) <= 5.0
        mean_shift = (new - ref)[inside].mean()
        c = float(_shift_sums(bb["onsite"] + d_on, bb["pairs"] + d_pr, bb, mask)[1])
    assert abs(mean_shift) > 1e-5  # not trivially zero
    assert abs(abs(mean_shift) - c) < 2e-3 * abs(mean_shift) + 1e-7, (mean_shift, c)
    # the on-site part alone (the loss's default): the shift of an on-site-only error
    on_only = float(_shift_sums(b["onsite"] + d_on, b["pairs"] + d_pr, b, mask, pairs=False)[1])
    with jax.enable_x64(True):
        only = np.asarray(gamma_levels(bb["onsite"] + d_on, bb["pairs"], bb, mask, n_atoms=3))[0]
    assert abs(abs((only - ref)[inside].mean()) - on_only) < 2e-3 * on_only + 1e-7


def test_level_shift_is_rotation_invariant_and_has_gradients(water_dataset, small_model):
    ds = Dataset(water_dataset)
    b = _batch(small_model, [ds[1]], slots=1, window=5.0)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    rng = np.random.default_rng(3)
    on = b["onsite"] + 0.02 * rng.normal(size=b["onsite"].shape)
    pr = b["pairs"] + 0.02 * rng.normal(size=b["pairs"].shape)
    before = np.asarray(_shift_sums(on, pr, b, mask))
    D = jnp.asarray(canonical_rotation(random_rotation(4), small_model.layout))
    rot = lambda x: jnp.einsum("ab,nbc,cd->nad", D.T, x, D)  # noqa: E731
    moved = dict(b, onsite=rot(b["onsite"]), pairs=rot(b["pairs"]))
    moved.update(onsite_w=rot(b["onsite_w"]), pairs_w=rot(b["pairs_w"]))
    after = np.asarray(_shift_sums(rot(on), rot(pr), moved, mask))
    assert before[1] > 1e-4  # not trivially zero
    np.testing.assert_allclose(after, before, rtol=1e-3)  # float32 blocks
    g = jax.grad(lambda x: _shift_sums(b["onsite"] + x * b["onsite_s"], b["pairs"], b, mask)[0])
    assert float(g(0.05)) > 0  # a shift raises the loss, and the gradient says so


def test_level_shift_labels_need_gamma_only_data_and_subsampling_scales_pairs(
    chain_dataset, water_dataset, small_model
):
    from ase_gearsh.model.graph import LabelError
    from ase_gearsh.training.train import _subsample

    s = Dataset(chain_dataset)[0]
    g = small_model.graph(s.atoms)
    with pytest.raises(LabelError, match="Gamma-only"):
        attach_labels(g, s, small_model.layout, overlap=True, window=5.0)
    w = Dataset(water_dataset)[0]
    g = small_model.graph(w.atoms)
    attach_labels(g, w, small_model.layout, overlap=True, window=5.0)
    h = _subsample(g, 0.5, 0.0, np.random.default_rng(0))
    assert len(h.pair_i) < len(g.pair_i) and h.pair_scale == len(g.pair_i) / len(h.pair_i)
    assert h.pairs_w.shape == h.pairs.shape


@pytest.mark.slow  # two more compilations of the training step: `make test-all`
def test_training_with_the_eigenvalue_loss(water_dataset, tmp_path, make_config):
    from ase_gearsh.model.checkpoint import load_checkpoint
    from ase_gearsh.training.train import train

    cfg = make_config(
        water_dataset,
        tmp_path,
        data={"n_train": 3, "n_valid": 1, "batch_size": 2, "bond_fraction": 0.5},
        loss={
            "loss_parameters": {
                "eigenvalue_weight": 1.0,
                "eigenvalue_start": 0.5,
                "shift_weight": 1.0,
                "shift_pairs": True,
            }
        },
        training={"n_epochs": 2},
    )
    run = train(cfg, progress=False, log=lambda *a: None)
    hist = load_checkpoint(run / "latest.ckpt")["extra"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)


def test_training_with_the_shift_loss(water_dataset, tmp_path, make_config):
    from ase_gearsh.model.checkpoint import load_checkpoint
    from ase_gearsh.training.train import train

    cfg = make_config(
        water_dataset,
        tmp_path,
        data={"n_train": 3, "n_valid": 1, "batch_size": 2, "bond_fraction": 0.5},
        loss={"loss_parameters": {"shift_weight": 1.0}},
        training={"n_epochs": 2},
    )
    run = train(cfg, progress=False, log=lambda *a: None)
    ck = load_checkpoint(run / "latest.ckpt")
    hist = ck["extra"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
    assert ck["config"]["loss"]["loss_parameters"]["shift_weight"] == 1.0
