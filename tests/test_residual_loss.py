"""The residual loss: ||(H_pred - e_n S) c_n|| in the S^-1 norm over the reference's
Gamma-point window states, checked against closed forms (H + cS), against an
independent dense computation in GPAW's orbital order, against the eigenvalue bound it
stands for, under rotations, and in a training run; the same for the loss on the rows
of H along S's near-null directions (null_weight)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import eigh

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.graph import (
    LabelError,
    attach_labels,
    attach_residual,
    batch_graphs,
    pad_residual,
)
from ase_gearsh.testing import canonical_rotation, random_rotation
from ase_gearsh.training.train import _residual_sums, gamma_levels

WINDOW = 5.0


def _batch(model, structures, slots, n_atoms, null_cutoff=None):
    graphs = []
    for s in structures:
        g = model.graph(s.atoms)
        attach_labels(g, s, model.layout, overlap=True)
        attach_residual(g, s, model.layout, WINDOW, null_cutoff)
        graphs.append(g)
    pad_residual(graphs)
    b = batch_graphs(graphs, n_atoms + 1, 8, structures=slots)
    assert np.all(b["pair_scale"][: sum(len(g.pair_i) for g in graphs)] == 1.0)
    b["pair_weight"] = np.ones(len(b["pair_i"]), np.float32)
    b["pair_weight"][sum(len(g.pair_i) for g in graphs) :] = 0
    return {k: jnp.asarray(v) for k, v in b.items()}, graphs


def _first_onsite_error(b, layout, seed):
    """A random symmetric error (0.05 eV scale) on the first atom's on-site block: the
    block in GPAW's order and the batch's canonical on-site errors."""
    sp0 = int(np.asarray(b["species"])[0])  # the first atom's model species
    n0 = len(layout.perm[sp0])
    d = np.random.default_rng(seed).normal(size=(n0, n0)) * 0.05
    d = d + d.T
    d_on = np.zeros(b["onsite"].shape, np.float32)
    d_on[0] = layout.to_canonical(d, sp0, sp0)
    return d, d_on


def _window_count(s):
    e = eigh(s.hamiltonian(), s.overlap(), eigvals_only=True)
    return int((np.abs(e - s.fermi_level) <= WINDOW).sum())


def test_h_plus_c_s_gives_residual_c_for_every_window_state(water_dataset, small_model):
    """(H + cS - e_n S) c_n = c S c_n, whose S^-1 norm is |c| (c_n^T S c_n = 1):
    the sums are N_w c^2 and N_w |c| per structure; the labels give zero."""
    ds = Dataset(water_dataset)
    structures = [ds[0], ds[2]]
    b, graphs = _batch(small_model, structures, slots=3, n_atoms=3)  # an empty slot
    mask = jnp.asarray(small_model.layout.orbital_mask)
    counts = [_window_count(s) for s in structures]
    assert [g.res_count for g in graphs] == counts and min(counts) >= 2
    zero = np.asarray(_residual_sums(b["onsite"], b["pairs"], b, mask, (3, ("win",))))
    assert zero[2] == sum(counts) and zero[0] < 1e-10
    c = jnp.array([0.05, -0.02, 7.0])  # the empty slot's value must not count
    on = b["onsite"] + c[b["atom_graph"].clip(0, 2)][:, None, None] * b["onsite_s"]
    pr = b["pairs"] + c[b["atom_graph"][b["pair_i"]].clip(0, 2)][:, None, None] * b["pairs_s"]
    s = np.asarray(_residual_sums(on, pr, b, mask, (3, ("win",))))
    want = [counts[0] * 0.05**2 + counts[1] * 0.02**2, counts[0] * 0.05 + counts[1] * 0.02]
    np.testing.assert_allclose(s, [*want, sum(counts)], rtol=2e-3)


def test_periodic_cell_uses_its_gamma_point_with_every_image(chain_dataset, small_model):
    """k-sampled data: the residual labels are the cell's Gamma point (sum over R), so
    H + cS again gives |c| per window state; a structure without levels in the
    window is refused with the Fermi level in the message."""
    s = Dataset(chain_dataset)[0]
    n = len(s.atoms)
    b, graphs = _batch(small_model, [s], slots=1, n_atoms=n, null_cutoff=NULL)
    assert graphs[0].res_null_count == _null_directions(s).shape[1] >= 1
    assert np.any(np.asarray(graphs[0].pair_shift) != 0)  # images are among the bonds
    mask = jnp.asarray(small_model.layout.orbital_mask)
    zero = np.asarray(_residual_sums(b["onsite"], b["pairs"], b, mask, (n, ("win",))))
    assert zero[0] < 1e-9 * zero[2]
    on, pr = b["onsite"] + 0.03 * b["onsite_s"], b["pairs"] + 0.03 * b["pairs_s"]
    got = np.asarray(_residual_sums(on, pr, b, mask, (n, ("win", "null"))))
    np.testing.assert_allclose(got[:2], [got[2] * 0.03**2, got[2] * 0.03], rtol=2e-3)
    np.testing.assert_allclose(got[3:5], [got[5] * 0.03**2, got[5] * 0.03], rtol=2e-3)
    g = small_model.graph(s.atoms)
    with pytest.raises(LabelError, match="no Gamma-point level within 1e-09 eV"):
        attach_residual(g, s, small_model.layout, 1e-9)


def test_residuals_match_a_dense_computation_and_bound_the_level_errors(water_dataset, small_model):
    """An error on one atom's on-site block: the sums equal sum_n ||C^T dH c_n||^2 from
    scipy's generalised eigenvectors in GPAW's order, and every window level of the
    perturbed problem lies within ||r_n|| of the reference level (the bound the loss
    stands for)."""
    s = Dataset(water_dataset)[1]
    b, _ = _batch(small_model, [s], slots=1, n_atoms=3)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    d, d_on = _first_onsite_error(b, small_model.layout, seed=7)
    got = np.asarray(_residual_sums(b["onsite"] + d_on, b["pairs"], b, mask, (3, ("win",))))
    H, S = s.hamiltonian(), s.overlap()
    e, C = eigh(H, S)
    inside = np.abs(e - s.fermi_level) <= WINDOW
    dH = np.zeros_like(H)
    sl = s.orbital_slices()[0]
    dH[sl, sl] = d
    norms = np.linalg.norm(C.T @ dH @ C[:, inside], axis=0)
    np.testing.assert_allclose(got, [(norms**2).sum(), norms.sum(), inside.sum()], rtol=2e-3)
    new = eigh(H + dH, S, eigvals_only=True)
    nearest = np.abs(new[None, :] - e[inside][:, None]).min(axis=1)
    assert norms.max() > 1e-2  # not trivially small
    assert np.all(nearest <= norms * (1 + 1e-9) + 1e-12)
    levels = np.asarray(gamma_levels(b["onsite"] + d_on, b["pairs"], b, mask, 3))[0]
    np.testing.assert_allclose(levels[: len(new)], new, atol=3e-3)  # the same problem


def test_residual_sums_are_rotation_invariant_and_have_gradients(water_dataset, small_model):
    ds = Dataset(water_dataset)
    b, _ = _batch(small_model, [ds[3]], slots=1, n_atoms=3)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    rng = np.random.default_rng(3)
    on = b["onsite"] + 0.02 * rng.normal(size=b["onsite"].shape)
    pr = b["pairs"] + 0.02 * rng.normal(size=b["pairs"].shape)
    on = 0.5 * (on + jnp.swapaxes(on, 1, 2))
    before = np.asarray(_residual_sums(on, pr, b, mask, (3, ("win",))))
    D = jnp.asarray(canonical_rotation(random_rotation(4), small_model.layout))
    rot = lambda x: jnp.einsum("ab,nbc,cd->nad", D.T, x, D)  # noqa: E731
    moved = dict(b, onsite=rot(b["onsite"]), pairs=rot(b["pairs"]))
    moved.update(res_all=jnp.einsum("ab,nbk->nak", D.T, b["res_all"]))
    moved.update(res_win=jnp.einsum("ab,nbk->nak", D.T, b["res_win"]))
    after = np.asarray(_residual_sums(rot(on), rot(pr), moved, mask, (3, ("win",))))
    assert before[0] > 1e-4  # not trivially zero
    np.testing.assert_allclose(after, before, rtol=2e-3)  # float32 blocks
    g = jax.grad(
        lambda x: _residual_sums(
            b["onsite"] + x * b["onsite_s"], b["pairs"], b, mask, (3, ("win",))
        )[0]
    )
    assert float(g(0.05)) > 0 and float(g(-0.05)) < 0  # the loss's minimum is the labels
    assert np.isfinite(float(g(0.0)))  # finite at the minimum (padding columns are zero)


def test_training_with_the_residual_and_null_losses(water_dataset, tmp_path, make_config):
    """Both terms in one run (window states and S's near-null directions)."""
    from ase_gearsh.model.checkpoint import load_checkpoint
    from ase_gearsh.training.train import train

    cfg = make_config(
        water_dataset,
        tmp_path,
        data={"n_train": 3, "n_valid": 1, "batch_size": 2, "bond_fraction": 0.5},
        loss={"loss_parameters": {"residual_weight": 1.0, "null_weight": 1.0, "null_cutoff": 0.5}},
        training={"n_epochs": 2},
    )
    run = train(cfg, progress=False, log=lambda *a: None)
    ck = load_checkpoint(run / "latest.ckpt")
    hist = ck["extra"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
    assert ck["config"]["loss"]["loss_parameters"]["residual_weight"] == 1.0
    assert ck["config"]["loss"]["loss_parameters"]["null_weight"] == 1.0


def test_subsampled_bonds_are_scaled_to_the_full_graph(water_dataset, small_model):
    """A step's subsample keeps the eigenvectors, and its kept pairs carry the scale
    P / k into the batch (the residual loss scales their errors to the full graph);
    padding bonds carry zero."""
    from ase_gearsh.training.train import _subsample

    s = Dataset(water_dataset)[2]
    g = small_model.graph(s.atoms)
    attach_labels(g, s, small_model.layout, overlap=True)
    attach_residual(g, s, small_model.layout, WINDOW)
    h = _subsample(g, 0.5, 0.0, np.random.default_rng(0))
    P, k = len(g.pair_i), len(h.pair_i)
    assert k < P and h.res_all is g.res_all and h.res_count == g.res_count
    b = batch_graphs([h], 4, 8, structures=1)
    np.testing.assert_allclose(b["pair_scale"][:k], P / k)
    assert np.all(b["pair_scale"][k:] == 0)


NULL = 0.5  # water's S has a few eigenvalues below this (its smallest is about 0.1)


def _null_directions(s):
    w, U = np.linalg.eigh(s.overlap())
    keep = w < NULL
    return U[:, keep] / np.sqrt(w[keep])


def test_null_directions_give_c_for_h_plus_c_s_and_match_a_dense_computation(
    water_dataset, small_model
):
    """The near-null set: x_p = u_p / sqrt(s_p) are S-normalised, so H + cS gives
    ||C^T (cS) x_p|| = |c| for each of them (labels: zero), and an on-site error d
    gives sum_p ||C^T dH x_p||^2 as computed densely in GPAW's orbital order, which
    is the squared error of dH's rows along those directions in S's canonical basis."""
    ds = Dataset(water_dataset)
    structures = [ds[0], ds[2]]
    b, graphs = _batch(small_model, structures, slots=2, n_atoms=3, null_cutoff=NULL)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    counts = [_null_directions(s).shape[1] for s in structures]
    assert [g.res_null_count for g in graphs] == counts and min(counts) >= 1
    both = (3, ("win", "null"))
    zero = np.asarray(_residual_sums(b["onsite"], b["pairs"], b, mask, both))
    assert zero.shape == (6,) and zero[5] == sum(counts) and zero[3] < 1e-10
    on, pr = b["onsite"] + 0.04 * b["onsite_s"], b["pairs"] + 0.04 * b["pairs_s"]
    got = np.asarray(_residual_sums(on, pr, b, mask, (3, ("null",))))
    n = sum(counts)
    np.testing.assert_allclose(got, [n * 0.04**2, n * 0.04, n], rtol=2e-3)

    s = structures[0]
    b, _ = _batch(small_model, [s], slots=1, n_atoms=3, null_cutoff=NULL)
    d, d_on = _first_onsite_error(b, small_model.layout, seed=5)
    got = np.asarray(_residual_sums(b["onsite"] + d_on, b["pairs"], b, mask, (3, ("null",))))
    H, S = s.hamiltonian(), s.overlap()
    _, C = eigh(H, S)
    dH = np.zeros_like(H)
    sl = s.orbital_slices()[0]
    dH[sl, sl] = d
    X = _null_directions(s)
    norms = np.linalg.norm(C.T @ dH @ X, axis=0)
    np.testing.assert_allclose(got, [(norms**2).sum(), norms.sum(), X.shape[1]], rtol=2e-3)
    w, U = np.linalg.eigh(S)  # the same rows in S's canonical basis U w^-1/2
    canon = (U / np.sqrt(w)).T @ dH @ (U / np.sqrt(w))
    np.testing.assert_allclose((norms**2).sum(), (canon[w < NULL] ** 2).sum(), rtol=1e-8)


def test_null_sums_are_rotation_invariant(water_dataset, small_model):
    ds = Dataset(water_dataset)
    b, _ = _batch(small_model, [ds[3]], slots=1, n_atoms=3, null_cutoff=NULL)
    mask = jnp.asarray(small_model.layout.orbital_mask)
    rng = np.random.default_rng(4)
    on = b["onsite"] + 0.02 * rng.normal(size=b["onsite"].shape)
    pr = b["pairs"] + 0.02 * rng.normal(size=b["pairs"].shape)
    on = 0.5 * (on + jnp.swapaxes(on, 1, 2))
    sets = (3, ("null",))
    before = np.asarray(_residual_sums(on, pr, b, mask, sets))
    D = jnp.asarray(canonical_rotation(random_rotation(6), small_model.layout))
    rot = lambda x: jnp.einsum("ab,nbc,cd->nad", D.T, x, D)  # noqa: E731
    moved = dict(b, onsite=rot(b["onsite"]), pairs=rot(b["pairs"]))
    for key in ("res_all", "res_win", "res_null"):
        moved[key] = jnp.einsum("ab,nbk->nak", D.T, b[key])
    after = np.asarray(_residual_sums(rot(on), rot(pr), moved, mask, sets))
    assert before[0] > 1e-4
    np.testing.assert_allclose(after, before, rtol=2e-3)
