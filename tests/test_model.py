"""Symmetries and locality of the full model, measured on reconstructed blocks."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.inference import predictor_for
from ase_gearsh.testing import (
    canonical_rotation,
    check_block_equivariance,
    forward_blocks,
    random_rotation,
)

TOL = 2e-4  # eV, float32 arithmetic on blocks of up to ~20 eV


def _predict(model, atoms, **kw):
    """Canonical blocks through the training path (one padded batch)."""
    g = model.graph(atoms)
    on, pr = forward_blocks(model, g, **kw)
    return g, on, pr


def _gpaw_h(model, g, on, pr, kpt=None):
    return predictor_for(model).to_gpaw(g, on, pr).matrix(kpt, sparse=False)


def _rotate_check(model, atoms, inversion):
    rot = random_rotation(11)
    sign = -1.0 if inversion else 1.0
    g, on, pr = _predict(model, atoms)
    moved = atoms.copy()
    moved.positions = sign * atoms.positions @ rot + np.array([0.3, -1.1, 2.0])
    moved.cell = sign * atoms.cell.array @ rot
    g2, on2, pr2 = _predict(model, moved)
    assert np.array_equal(g.pair_i, g2.pair_i) and np.array_equal(g.pair_j, g2.pair_j)
    D = canonical_rotation(rot, model.layout, inversion)
    exp_on = np.einsum("ab,nbc,cd->nad", D.T, on, D)
    exp_pr = np.einsum("ab,nbc,cd->nad", D.T, pr, D)
    # not trivially zero and really changed by the rotation
    assert np.abs(pr).max() > 0.1 and np.abs(pr2 - pr).max() > 10 * TOL
    return np.abs(on2 - exp_on).max(), np.abs(pr2 - exp_pr).max()


@pytest.mark.parametrize("inversion", [False, True])
def test_rotation_and_inversion_equivariance_molecule(small_model, water_dataset, inversion):
    atoms = Dataset(water_dataset)[0].atoms
    err_on, err_pr = _rotate_check(small_model, atoms, inversion)
    assert err_on < TOL and err_pr < TOL, (err_on, err_pr)


def test_rotation_equivariance_periodic_chain(small_model, chain_dataset):
    """Pairs with lattice shifts R: the cell rotates with the atoms."""
    atoms = Dataset(chain_dataset)[0].atoms
    g = small_model.graph(atoms)
    assert (np.abs(g.pair_shift).sum(axis=1) > 0).any()
    err_on, err_pr = _rotate_check(small_model, atoms, inversion=True)
    assert err_on < TOL and err_pr < TOL, (err_on, err_pr)


def test_translation_invariance(small_model, chain_dataset):
    atoms = Dataset(chain_dataset)[0].atoms
    _, on, pr = _predict(small_model, atoms)
    moved = atoms.copy()
    moved.positions += [0.37, -0.2, 1.9]  # crosses the periodic boundary in z
    moved.wrap()
    _, on2, pr2 = _predict(small_model, moved)
    assert np.abs(on2 - on).max() < TOL
    # the pair list may be reordered by wrapping: compare assembled H(k)
    k = [0, 0, 0.21]
    Hs = []
    for a in (atoms, moved):
        g, o, p = _predict(small_model, a)
        Hs.append(_gpaw_h(small_model, g, o, p, k))
    # wrapping changes the phase convention by a diagonal unitary; eigenvalues of H agree
    e1, e2 = (np.linalg.eigvalsh(h) for h in Hs)
    assert np.abs(e1 - e2).max() < TOL


def _permutation_error(model, atoms, perm):
    """Largest difference between the blocks of ``atoms`` and those of ``atoms[perm]``
    mapped back (pairs in either storage orientation, transposed where reversed)."""
    g, on, pr = _predict(model, atoms)
    g2, on2, pr2 = _predict(model, atoms[perm])
    blocks = {}
    for p, (i, j) in enumerate(zip(g2.pair_i, g2.pair_j)):
        blocks[(perm[i], perm[j])] = pr2[p]
        blocks[(perm[j], perm[i])] = pr2[p].T
    err = max(
        np.abs(blocks[(i, j)] - pr[p]).max() for p, (i, j) in enumerate(zip(g.pair_i, g.pair_j))
    )
    return max(err, np.abs(on2 - on[perm]).max())


def test_permutation_equivariance_and_exact_hermiticity(small_model, water_dataset):
    atoms = Dataset(water_dataset)[1].atoms
    assert _permutation_error(small_model, atoms, np.array([2, 0, 1])) < 1e-5
    g, on, pr = _predict(small_model, atoms)
    # on-site blocks symmetric; the assembled H is exactly symmetric
    assert np.array_equal(on, np.swapaxes(on, 1, 2))
    H = _gpaw_h(small_model, g, on, pr)
    assert np.array_equal(H, H.T)


def test_padding_changes_nothing(small_model, water_dataset):
    atoms = Dataset(water_dataset)[2].atoms
    _, on, pr = _predict(small_model, atoms, atoms_multiple=4, nl_multiple=8)
    _, on2, pr2 = _predict(small_model, atoms, atoms_multiple=64, nl_multiple=256)
    assert np.abs(on2 - on).max() < 1e-5 and np.abs(pr2 - pr).max() < 1e-5


def test_atoms_beyond_the_cutoff_change_nothing(small_model, water_dataset):
    atoms = Dataset(water_dataset)[3].atoms
    _, on, pr = _predict(small_model, atoms)
    far = atoms + Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.13]])
    far.positions[3:] += atoms.positions.mean(axis=0) + [0, 0, 7.5]  # > both cut-offs
    g2, on2, pr2 = _predict(small_model, far)
    assert np.abs(on2[:3] - on).max() < 1e-5
    inner = [p for p, (i, j) in enumerate(zip(g2.pair_i, g2.pair_j)) if j < 3]
    assert np.abs(pr2[inner] - pr).max() < 1e-5


def test_pair_blocks_vanish_smoothly_at_the_cutoff(small_model):
    rc = small_model.pair_cutoff[small_model.registry.species_index([8])[0]][
        small_model.registry.species_index([8])[0]
    ]
    sizes = []
    for frac in (0.5, 0.9, 0.99, 0.999):
        a = Atoms("O2", positions=[[0, 0, 0], [0, 0, frac * rc]], cell=[30, 30, 30])
        _, _, pr = _predict(small_model, a)
        sizes.append(np.abs(pr).max())
    assert sizes[0] > 1e-4 and sizes[-1] < 1e-6 * sizes[0] + 1e-9
    assert sizes[1] > sizes[2] > sizes[3]


def _with_message_passing(small_model, **settings):
    """The small model's network with message-passing settings, fresh parameters."""
    from ase_gearsh.model.engine import Model

    mp = Model(
        dict(small_model.settings, mp_steps=1, **settings),
        small_model.registry,
        {k: np.asarray(v) for k, v in small_model.stats.items()},
        None,
    )
    mp.params = mp.init_params(3)
    return mp


def _assert_reach_beyond_cut_off(small_model, mp):
    """Atom 0's on-site block ignores a move of atom 2 beyond its cut-off, unless the
    model passes messages (atom 1 sees both)."""
    cut = small_model.cutoff
    base = Atoms(
        "OCO", positions=[[0, 0, 0], [0, 0, 0.6 * cut], [0, 0, 1.2 * cut]], cell=[40, 40, 40]
    )
    moved = base.copy()
    moved.positions[2, 2] += 0.3  # still beyond the cut-off of atom 0
    for model, should_change in ((small_model, False), (mp, True)):
        on0 = _predict(model, base)[1][0]
        on1 = _predict(model, moved)[1][0]
        changed = np.abs(on1 - on0).max()
        assert (changed > 1e-4) if should_change else (changed < 1e-6), changed


@pytest.mark.slow  # 1.5-2 min on 2 cores (two message-passing compilations): `make test-all`
def test_message_passing_really_changes_outputs(small_model):
    """With mp_steps=1 an atom sees its neighbours' neighbours; without, it does not."""
    mp = _with_message_passing(small_model, mp_degree=2, mp_qkv_features=8, mp_num_heads=2)
    _assert_reach_beyond_cut_off(small_model, mp)
    # and message passing keeps the model equivariant
    err_on, err_pr = _rotate_check(mp, molecule("H2O", cell=[9, 9, 9]), inversion=True)
    assert err_on < TOL and err_pr < TOL


def test_density_message_passing_sees_two_cut_offs_and_stays_equivariant(small_model):
    """mp_type "density": a second neighbour density gated by the neighbours' invariants.
    Atom 0 then sees atom 2 beyond its cut-off through atom 1; rotations and inversion
    still act on the blocks as Wigner matrices; only new parameters are added."""
    mp = _with_message_passing(small_model, mp_type="density")
    plain = set(mp.params["params"]["atom_descriptor"])
    base_names = set(small_model.params["params"]["atom_descriptor"])
    assert base_names < plain
    assert {n for n in plain - base_names} == {
        "mp_gate_0",
        *(f"mp1_nonlinear_{b}" for b in range(small_model.settings["num_tensordenses"] + 1)),
        *(f"mp1_tensordense_{k}" for k in range(small_model.settings["num_tensordenses"])),
    }
    _assert_reach_beyond_cut_off(small_model, mp)
    for inversion in (False, True):
        err_on, err_pr = _rotate_check(mp, molecule("H2O", cell=[9, 9, 9]), inversion)
        assert err_on < TOL and err_pr < TOL, (inversion, err_on, err_pr)


def test_unknown_message_passing_type_is_refused():
    from ase_gearsh.training.config import ConfigError, check_config

    with pytest.raises(ConfigError, match="mp_type.*'attention' or 'density'.*'graph'"):
        check_config(
            {
                "data": {"train_data_path": "data"},
                "model": {"atom_centered": {"descriptor": {"mp_type": "graph"}}},
            }
        )


@pytest.mark.slow  # about a minute or two on 2 cores: `make test-all`
def test_parameter_count_of_paper_configuration():
    """The paper's WSe2-like configuration (listings 2-4): about 83k parameters."""
    from ase_gearsh.core.basis import Registry
    from ase_gearsh.model.engine import Model
    from ase_gearsh.model.layout import Layout
    from ase_gearsh.training.config import check_config, model_settings

    reg = Registry.from_basis(
        {
            "W": {"l": [0, 1, 2, 1], "rc": 4.0, "name": "szp"},
            "Se": {"l": [0, 1, 2], "rc": 4.0, "name": "szp"},
        }
    )
    lay = Layout(reg)
    cfg = check_config({"data": {"train_data_path": "x"}})
    model = Model(
        model_settings(cfg, reg.n_species, lay.lmax_out, lay.n_features), reg, {}, None, cfg
    )
    from ase_gearsh.model.network import count_parameters

    n = count_parameters(model.init_params(0))
    assert 40_000 < n < 200_000, n


@pytest.mark.parametrize("inversion", [False, True])
def test_shipped_equivariance_helper_on_the_prediction_path(small_model, chain_dataset, inversion):
    """ase_gearsh.testing.check_block_equivariance (chunked prediction path)."""
    atoms = Dataset(chain_dataset)[0].atoms
    err_on, err_pr = check_block_equivariance(
        small_model, atoms, random_rotation(5), inversion=inversion
    )
    assert err_on < TOL and err_pr < TOL, (err_on, err_pr)


@pytest.fixture(
    scope="module",
    params=[
        "once",
        # the paper's evaluation: another model to compile (about a minute): `make test-all`
        pytest.param("both_orientations", marks=pytest.mark.slow),
    ],
)
def model_variant(request, small_model):
    """The small model with each way of making H_ji = H_ij^T exact (``once`` is the
    session's small model itself: no further compilation)."""
    from ase_gearsh.model.engine import Model

    if request.param == small_model.settings["bond_evaluation"]:
        return small_model
    settings = dict(small_model.settings, bond_evaluation=request.param)
    model = Model(settings, small_model.registry, small_model.stats, None, small_model.config)
    model.params = model.init_params(3)
    return model


def test_a_bond_reversed_gives_the_transposed_block(model_variant):
    """Like species (H-H: s and p orbitals) and unlike species (O-H), both storage
    orientations: exactly the transpose, and the like-species block is not symmetric
    (the part odd in r is there)."""
    for symbols in ("H2", "OH"):
        a = Atoms(symbols, positions=[[0, 0, 0], [0.3, 0.5, 0.7]], cell=[20, 20, 20])
        _, _, p1 = _predict(model_variant, a)
        _, _, p2 = _predict(model_variant, a[[1, 0]])
        assert np.abs(p1).max() > 1e-3
        assert np.abs(p2[0] - p1[0].T).max() < 1e-6, symbols
        if symbols == "H2":  # s-p entries of ~1e-5 eV at random init: far above rounding
            assert np.abs(p1[0] - p1[0].T).max() > 1e-6


def test_rotation_and_permutation_equivariance_of_both_evaluations(model_variant, water_dataset):
    atoms = Dataset(water_dataset)[1].atoms
    err_on, err_pr = _rotate_check(model_variant, atoms, inversion=True)
    assert err_on < TOL and err_pr < TOL, (err_on, err_pr)
    assert _permutation_error(model_variant, atoms, np.array([1, 2, 0])) < 1e-5


def test_projected_basis_is_the_dense_layer_on_the_basis():
    """``ProjectedBasis`` (the neighbour density's and the bond expansion's radial
    projection) equals ``e3x.nn.Dense(use_bias=False)`` on the radial x angular basis:
    the same parameters and initial values (checkpoints load unchanged), the same
    values and gradients, a zero and a beyond-cut-off vector included, and it rotates
    with Wigner D (r -> r R: y -> y D)."""
    import e3x
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ase_gearsh.model.network import ProjectedBasis, _basis

    opts = dict(max_degree=3, num=8, cutoff=6.0, radial_fn="basic_fourier")
    opts["cutoff_fn"] = "smooth_cutoff"

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, v):
            return e3x.nn.Dense(5, use_bias=False, name="p")(_basis(v, **opts))

    class New(nn.Module):
        @nn.compact
        def __call__(self, v):
            return ProjectedBasis(5, **opts, name="p")(v)

    rng = np.random.default_rng(4)
    v = rng.normal(size=(40, 3)) * 2.5
    v[0] = 0.0  # zero vector (padding)
    v[1] = [100.0, 0.0, 0.0]  # beyond the cut-off
    v = jnp.asarray(v, jnp.float32)
    key = jax.random.PRNGKey(7)
    p_ref, p_new = Reference().init(key, v), New().init(key, v)
    same = jax.tree_util.tree_map(
        lambda a, b: a.shape == b.shape and bool((a == b).all()), p_ref, p_new
    )
    assert all(jax.tree_util.tree_leaves(same)) and len(jax.tree_util.tree_leaves(same)) == 4
    y_ref, y_new = Reference().apply(p_ref, v), New().apply(p_ref, v)
    assert y_new.shape == y_ref.shape == (40, 1, 16, 5)
    assert float(jnp.abs(y_ref).max()) > 0.1
    np.testing.assert_allclose(y_new, y_ref, atol=1e-6)
    assert float(jnp.abs(y_new[1]).max()) == 0.0  # outside the cut-off

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    g_ref = jax.grad(loss(Reference()), argnums=(0, 1))(p_ref, v)
    g_new = jax.grad(loss(New()), argnums=(0, 1))(p_ref, v)
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_new)):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_allclose(b, a, atol=2e-5)
    R = e3x.so3.random_rotation(jax.random.PRNGKey(3))
    D = e3x.so3.wigner_d(R, max_degree=3, cartesian_order=False)
    y_rot = New().apply(p_ref, v @ R)
    np.testing.assert_allclose(y_rot, jnp.einsum("npmf,mk->npkf", y_new, D), atol=2e-5)
