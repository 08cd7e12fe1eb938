"""Block <-> irreps mapping: exact round trip and the rotation rule, l up to f."""

import numpy as np
import pytest

from ase_gearsh.core.basis import Registry, RegistryError
from ase_gearsh.model.layout import Layout
from ase_gearsh.testing import canonical_rotation

BASIS = {
    "H": {"l": [0, 1], "rc": 3.4, "name": "szp(dzp)"},
    "C": {"l": [0, 1, 2], "rc": 3.5, "name": "szp(dzp)"},
    "W": {"l": [0, 0, 1, 2, 3, 1], "rc": 6.8, "name": "test"},
}


@pytest.fixture(scope="module")
def layout():
    return Layout(Registry.from_basis(BASIS))


def test_every_l1_l2_pair_up_to_f_round_trips(layout):
    pairs = {(sb[2], sb[3]) for sb in layout.subblocks}
    assert pairs == {(l1, l2) for l1 in range(4) for l2 in range(4)}
    rng = np.random.default_rng(0)
    B = rng.normal(size=(7, layout.n, layout.n))
    irreps = layout.blocks_to_irreps(B)
    assert irreps.shape == (7, 2, 49, layout.n_features)
    assert np.abs(layout.irreps_to_blocks(irreps) - B).max() < 1e-12
    # the irreps of a sub-block sit at parity (-1)^(l1+l2), L = |l1-l2|..l1+l2
    a, b, l1, l2, p, f = next(sb for sb in layout.subblocks if sb[2:4] == (1, 2))
    only = np.zeros((layout.n, layout.n))
    sa, sb_ = layout.slot_start[a], layout.slot_start[b]
    only[sa : sa + 3, sb_ : sb_ + 5] = rng.normal(size=(3, 5))
    c = layout.blocks_to_irreps(only)
    nz = np.argwhere(np.abs(c) > 1e-12)
    assert set(nz[:, 0]) == {1} and set(nz[:, 2]) == {f}
    assert nz[:, 1].min() >= 1 and nz[:, 1].max() < 16  # L = 1, 2, 3


def test_irreps_rotate_with_wigner_d(layout):
    import e3x
    import jax
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(random_state=5).as_matrix()
    D = canonical_rotation(rot, layout)
    with jax.enable_x64(True):
        Dout = np.asarray(e3x.so3.wigner_d(rot, layout.lmax_out, cartesian_order=False))
    B = np.random.default_rng(1).normal(size=(layout.n, layout.n))
    lhs = layout.blocks_to_irreps(D.T @ B @ D)
    rhs = np.einsum("plf,lm->pmf", layout.blocks_to_irreps(B), Dout)
    assert np.abs(lhs - rhs).max() < 1e-10


def test_species_permutation_to_canonical_and_back(layout):
    reg = layout.registry
    s = reg.species_index([1])[0]  # H: s and p slots only
    n = reg.n_orbitals[s]
    blk = np.random.default_rng(2).normal(size=(n, n))
    can = layout.to_canonical(blk, s, s, dtype=np.float64)
    assert np.array_equal(layout.from_canonical(can, s, s), blk)
    assert np.abs(can[~layout.block_mask(s, s)]).max() == 0


def test_unknown_element_and_mismatched_basis_are_named(layout):
    with pytest.raises(RegistryError, match="element N is not known.*H, C, W"):
        layout.registry.species_index([1, 7])
    with pytest.raises(RegistryError, match="C uses basis 'dzp'"):
        layout.registry.check_basis({"C": {"l": [0, 0, 1, 1, 2], "name": "dzp", "rc": 3}})
    with pytest.raises(RegistryError, match="l <= 3"):
        Registry.from_basis({"X": {"l": [4], "rc": 1.0}})


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpaw_blocks_are_the_blocks_in_gpaw_order(layout, compiled, dtype, monkeypatch):
    """Canonical blocks of mixed species pairs -> flat GPAW-order blocks, one after the
    other: each equals ``from_canonical`` of its block, with the compiled gather
    (numba) and the numpy one."""
    from ase_gearsh.model import layout as layout_module

    if compiled:
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(layout_module, "compiled", lambda fn: None)
    rng = np.random.default_rng(3)
    P = 40
    sa, sb = rng.integers(1, 4, P), rng.integers(1, 4, P)
    blocks = rng.normal(size=(P, layout.n, layout.n)).astype(dtype)
    flat = layout.gpaw_blocks(sa, sb, blocks)
    assert flat.dtype == np.float64
    counts = layout.registry.n_orbitals
    o = 0
    for p in range(P):
        ref = layout.from_canonical(blocks[p], sa[p], sb[p])
        assert ref.shape == (counts[sa[p]], counts[sb[p]])
        np.testing.assert_array_equal(flat[o : o + ref.size], ref.ravel())
        o += ref.size
    assert o == flat.size
    assert layout.gpaw_blocks(sa[:0], sb[:0], blocks[:0]).shape == (0,)
