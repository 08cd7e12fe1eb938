"""The two-centre baseline H0: its integrals against GPAW's, its fit, its table in the
network (rotation, exact H_ji = H_ij^T) and its place in the forward path."""

import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.units import Bohr, Hartree
from scipy.spatial.transform import Rotation

from ase_gearsh.core.basis import Registry
from ase_gearsh.model.baseline import baseline_blocks
from ase_gearsh.model.engine import pair_cutoff_matrix
from ase_gearsh.model.graph import build_graph
from ase_gearsh.model.layout import Layout
from ase_gearsh.testing import canonical_rotation
from ase_gearsh.training.baseline import KINDS, TwoCentre, _apply, _slot_index, fit_baseline
from gpaw_tools.overlap import OverlapCalculator, species_from_gpaw

CUT = 7.1


@pytest.fixture(scope="module")
def setup():
    basis = species_from_gpaw(["H", "C", "O"], xc="PBE", basis="szp(dzp)")
    summary = {s: b.summary() for s, b in basis.items()}
    registry = Registry.from_basis(summary)
    layout = Layout(registry)
    pc = pair_cutoff_matrix(registry, CUT)
    return basis, registry, layout, pc, TwoCentre(basis, registry, layout)


def test_two_centre_integrals_equal_gpaw():
    """Off-site blocks of S (without the PAW term) and of the kinetic energy T equal
    GPAW's own two-centre integrals (its TCI code path, not ours)."""
    from gpaw.lcao.tci import TCIExpansions
    from gpaw.old.grid_descriptor import GridDescriptor
    from gpaw.setup import Setups
    from gpaw.utilities.timing import nulltimer
    from gpaw.xc import XC

    atoms = Atoms("OCH", positions=[[0, 0, 0], [0.3, 0.2, 1.25], [1.0, -0.4, 1.9]], cell=[12] * 3)
    setups = Setups(atoms.numbers, "paw", "szp(dzp)", XC("PBE"))
    gd = GridDescriptor([48, 48, 48], atoms.cell / Bohr, pbc_c=False)
    many = TCIExpansions.new_from_setups(setups).get_manytci_calculator(
        setups, gd, atoms.get_scaled_positions(), np.zeros((1, 3)), float, nulltimer
    )
    O_ref, T_ref = (x[0] for x in many.O_qMM_T_qMM(gd.comm, 0, setups.nao))
    oc = OverlapCalculator(species_from_gpaw(["H", "C", "O"]))
    M = np.concatenate([[0], np.cumsum([s.nao for s in setups])])
    sym = atoms.get_chemical_symbols()
    for a in range(3):
        for b in range(3):
            if a != b:
                v = (atoms.positions[b] - atoms.positions[a])[None]
                sa, sb = slice(M[a], M[a + 1]), slice(M[b], M[b + 1])
                T = oc.two_centre_blocks("T", sym[a], sym[b], v)[0] / Hartree
                O = oc.two_centre_blocks("O", sym[a], sym[b], v)[0]
                assert np.abs(T - T_ref[sa, sb]).max() < 1e-12
                assert np.abs(O - O_ref[sa, sb]).max() < 1e-12
                assert np.abs(T_ref[sa, sb]).max() > 1e-3  # a real block, not zeros
    with pytest.raises(ValueError, match="kind"):
        oc.two_centre_blocks("S", "H", "C", v)


@pytest.fixture(scope="module")
def fitted(setup):
    """Graphs with labels of the baseline's form and the fit on them."""
    _, _, _, pc, tc = setup
    graphs = _graphs(setup)
    return graphs, fit_baseline(graphs, tc, pc)


def _graphs(setup, n=6, seed=0):
    _, registry, layout, pc, tc = setup
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = molecule(["CH3OH", "CH4", "C2H6", "H2CO"][k % 4])
        a.rattle(0.08, seed=int(rng.integers(1 << 30)))
        a.center(vacuum=5.0)
        g = build_graph(a, registry.species_index(a.numbers), CUT, pc)
        # synthetic labels of exactly the baseline's form
        si, sj = g.species[g.pair_i], g.species[g.pair_j]
        x = np.linalg.norm(g.pair_vec, axis=1) / pc[si, sj]
        S, T = (tc.blocks(k, si, sj, g.pair_vec) for k in KINDS)
        env = np.exp(1.0 - 1.0 / (1.0 - np.minimum(x, 0.999) ** 2))[:, None, None]
        g.pairs = (env * ((-3.0 + 2.0 * x[:, None, None]) * S + 0.8 * T)).astype(np.float32)
        out.append(g)
    return out


def _exact(coef, setup, si, sj, vec):
    _, _, layout, pc, tc = setup
    feats = np.stack([tc.blocks(k, si, sj, vec) for k in KINDS], 1)
    x = np.linalg.norm(vec, axis=1) / pc[si, sj]
    return _apply(coef.astype(np.float64), _slot_index(layout), feats, x, si, sj)


def _jax(table, setup, si, sj, vec):
    _, _, layout, pc, _ = setup
    index, coef, _ = layout.gather_tables
    tables = {"index": jnp.asarray(index), "coef": jnp.asarray(coef, jnp.float32), "n": layout.n}
    pcs = jnp.asarray(np.where(pc > 0, pc, 1.0), jnp.float32)
    out = baseline_blocks(
        jnp.asarray(table),
        tables,
        pcs,
        jnp.asarray(si),
        jnp.asarray(sj),
        jnp.asarray(vec, jnp.float32),
    )
    return np.asarray(out, np.float64)


def test_fit_recovers_a_two_centre_hamiltonian_and_table_matches(setup, fitted):
    """Labels made of c(x) S + d(x) T are fitted to a small residual, and the network's
    table (radial functions along z times Y_LM) reproduces the fitted H0 in any
    direction."""
    _, _, layout, pc, tc = setup
    graphs, (table, coef, resid) = fitted
    labels = np.concatenate([g.pairs for g in graphs])
    res = np.concatenate(resid)
    assert np.sqrt((res**2).mean()) < 0.02 * np.sqrt((labels**2).mean())
    g = graphs[0]
    si, sj = g.species[g.pair_i], g.species[g.pair_j]
    exact = _exact(coef, setup, si, sj, g.pair_vec)
    assert np.abs(_jax(table, setup, si, sj, g.pair_vec) - exact).max() < 0.01  # eV, interpolation
    assert np.abs(exact).max() > 1.0


def test_table_is_equivariant_and_exactly_symmetric(setup, fitted):
    """H0 of a rotated bond is D^T H0 D; the reversed bond gives exactly the transpose."""
    _, _, layout, pc, tc = setup
    graphs, (table, _, _) = fitted
    g = graphs[1]
    si, sj, vec = g.species[g.pair_i], g.species[g.pair_j], g.pair_vec.astype(np.float64)
    B = _jax(table, setup, si, sj, vec)
    rev = _jax(table, setup, sj, si, -vec)
    assert np.array_equal(rev, np.swapaxes(B, -1, -2))
    rot = Rotation.random(random_state=3).as_matrix()
    D = canonical_rotation(rot, layout)
    Br = _jax(table, setup, si, sj, vec @ rot)
    assert np.abs(D.T @ B @ D - Br).max() < 2e-4 * max(1.0, np.abs(B).max())


def test_forward_path_adds_the_baseline(setup):
    """With a baseline in the statistics, the bond stage that training (Model.forward)
    and prediction (Predictor) share returns the network's blocks plus H0."""
    from conftest import SMALL_MODEL

    from ase_gearsh.model.engine import Model, precision
    from ase_gearsh.model.statistics import neutral_statistics
    from ase_gearsh.training.config import check_config, model_settings

    _, reg, layout, _, tc = setup
    pc = pair_cutoff_matrix(reg, SMALL_MODEL["bond_centered"]["cutoff"])
    table, _, _ = fit_baseline(_graphs(setup, n=2, seed=2), tc, pc)
    cfg = check_config({"data": {"train_data_path": "x"}, "model": SMALL_MODEL})
    settings = model_settings(cfg, reg.n_species, layout.lmax_out, layout.n_features)
    stats = neutral_statistics(layout, pc)
    plain = Model(settings, reg, stats, None, cfg)
    with_h0 = Model(settings, reg, dict(stats, pair_baseline=table), None, cfg)
    g = plain.graph(_molecule())
    rng = np.random.default_rng(0)
    P = len(g.pair_i)
    first, second = (
        jnp.asarray(rng.normal(size=(P,) + layout.irreps_shape), jnp.float32) for _ in range(2)
    )
    args = (
        jnp.asarray(g.species),
        jnp.asarray(g.pair_i),
        jnp.asarray(g.pair_j),
        jnp.asarray(g.pair_vec),
    )
    with precision():
        ref = np.asarray(plain.bond_blocks(first, second, plain.stats, *args))
        total = np.asarray(with_h0.bond_blocks(first, second, with_h0.stats, *args))
    si, sj = g.species[g.pair_i], g.species[g.pair_j]
    h0 = _jax(table, (None, reg, layout, pc, tc), si, sj, g.pair_vec)
    assert np.abs(h0).max() > 0.5
    assert np.abs(total - ref - h0).max() < 1e-4


def _molecule():
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=5)
    a.center(vacuum=5.0)
    return a


def test_checkpoint_stores_the_table_compactly_and_exactly(setup, fitted):
    from ase_gearsh.model.checkpoint import _pack_stats, _unpack_stats

    _, _, layout, pc, tc = setup
    _, (table, _, _) = fitted
    packed = _pack_stats({"pair_baseline": table, "pair_cutoff": pc})
    assert "pair_baseline" not in packed
    assert packed["pair_baseline_values"].nbytes < 0.6 * table.nbytes  # zeros not stored
    back = _unpack_stats(packed)
    assert np.array_equal(back["pair_baseline"], table)
    assert np.array_equal(back["pair_cutoff"], pc)


def test_onsite_baseline_fit_equivariance_and_chunks(setup):
    """On-site H0: fitted to labels of its own form, the same in numpy and in the network
    (summed over edge chunks as the predictor does), symmetric, D^T H0 D under rotation."""
    from ase_gearsh.model.baseline import onsite_baseline_blocks
    from ase_gearsh.training.baseline import _onsite_features, _onsite_h0, fit_onsite_baseline

    _, reg, layout, pc, tc = setup
    graphs = _graphs(setup, n=4, seed=6)
    for g in graphs:  # labels: sum over neighbours of env(x) (2 S S^T - T T^T / 10)
        f = _onsite_features(g, tc, pc, 1)
        g.onsite = (2.0 * f[:, :, 0, 0] - 0.1 * f[:, :, 2, 0]).sum(1).astype(np.float32)
    stats, resid = fit_onsite_baseline(graphs, tc, pc)
    labels = np.concatenate([g.onsite for g in graphs])
    assert np.sqrt((np.concatenate(resid) ** 2).mean()) < 0.02 * np.sqrt((labels**2).mean())
    index, coef, _ = layout.gather_tables
    tables = {"index": jnp.asarray(index), "coef": jnp.asarray(coef, jnp.float32), "n": layout.n}
    st = {k: jnp.asarray(v) for k, v in stats.items()}
    st["pair_cutoff"] = jnp.asarray(np.where(pc > 0, pc, 1.0), jnp.float32)
    g = graphs[0]
    sp = jnp.asarray(g.species)

    def h0(ei, ej, ev):
        out = onsite_baseline_blocks(
            st, tables, sp, jnp.asarray(ei), jnp.asarray(ej), jnp.asarray(ev, jnp.float32)
        )
        return np.asarray(out, np.float64)

    full = h0(g.edge_i, g.edge_j, g.edge_vec)
    half = len(g.edge_i) // 2
    chunks = h0(g.edge_i[:half], g.edge_j[:half], g.edge_vec[:half]) + h0(
        g.edge_i[half:], g.edge_j[half:], g.edge_vec[half:]
    )
    assert np.abs(chunks - full).max() < 1e-4
    ref = _onsite_h0(
        _onsite_features(g, tc, pc, 4), stats["onsite_baseline_coef"].astype(float), g.species
    )
    assert np.abs(full - ref).max() < 0.01 and np.abs(ref).max() > 0.5
    assert np.array_equal(full, np.swapaxes(full, -1, -2))
    rot = Rotation.random(random_state=8).as_matrix()
    D = canonical_rotation(rot, layout)
    rotated = h0(g.edge_i, g.edge_j, g.edge_vec @ rot)
    assert np.abs(D.T @ full @ D - rotated).max() < 2e-4 * max(1.0, np.abs(full).max())
