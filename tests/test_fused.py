"""The fast fused tensor product equals e3x's: parameters, values, gradients, and
it is rotation and parity equivariant."""

import e3x
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ase_gearsh.model.fused import FusedTensor, TensorDense


def _inputs(L1, L2, F, B=3, P=2, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.normal(k1, (B, P, (L1 + 1) ** 2, F)),
        jax.random.normal(k2, (B, P, (L2 + 1) ** 2, F)),
    )


def _same_tree(p, q):
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("L1,L2,L3", [(4, 4, 4), (2, 4, 3), (0, 2, 2)])
def test_equals_e3x_fused_tensor(L1, L2, L3):
    x, y = _inputs(L1, L2, F=5)
    ref = e3x.nn.FusedTensor(max_degree=L3, cartesian_order=False)
    new = FusedTensor(max_degree=L3, cartesian_order=False)
    key = jax.random.PRNGKey(1)
    p = ref.init(key, x, y)
    _same_tree(p, new.init(key, x, y))  # same names, shapes and initial values
    a, b = ref.apply(p, x, y), new.apply(p, x, y)
    assert a.shape == b.shape == (3, 2, (L3 + 1) ** 2, 5)
    assert float(jnp.abs(a).max()) > 0.1
    np.testing.assert_allclose(b, a, atol=2e-6 * float(jnp.abs(a).max()))

    def loss(mod, p, x, y):
        return jnp.sum(jnp.sin(mod.apply(p, x, y)))

    ga = jax.grad(loss, argnums=(1, 2, 3))(ref, p, x, y)
    gb = jax.grad(loss, argnums=(1, 2, 3))(new, p, x, y)
    for u, v in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(v, u, atol=1e-5 * (1 + float(jnp.abs(u).max())))


def test_one_parity_falls_back_to_e3x():
    x, y = _inputs(2, 2, F=4, P=1)
    ref = e3x.nn.FusedTensor(cartesian_order=False)
    p = ref.init(jax.random.PRNGKey(0), x, y)
    assert np.array_equal(ref.apply(p, x, y), FusedTensor(cartesian_order=False).apply(p, x, y))


def test_tensor_dense_equals_e3x():
    u = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 25, 7))
    ref = e3x.nn.TensorDense(6, max_degree=4, use_fused_tensor=True, cartesian_order=False)
    new = TensorDense(6, max_degree=4)
    p = ref.init(jax.random.PRNGKey(4), u)
    _same_tree(p, new.init(jax.random.PRNGKey(4), u))
    a, b = ref.apply(p, u), new.apply(p, u)
    np.testing.assert_allclose(b, a, atol=2e-6 * float(jnp.abs(a).max()))


def _rotate(x, D):
    return jnp.einsum("...pmf,mn->...pnf", x, D)


@pytest.mark.parametrize("inversion", [False, True])
def test_equivariance(inversion):
    """T(g x, g y) = g T(x, y) for a random rotation g, with and without inversion
    (e3x's parity channels: 0 even, 1 odd under inversion, at every degree)."""
    L = 4
    x, y = _inputs(L, L, F=3, B=2, seed=5)
    R = e3x.so3.random_rotation(jax.random.PRNGKey(6))
    D = e3x.so3.wigner_d(R, max_degree=L, cartesian_order=False)
    mod = FusedTensor(max_degree=L, cartesian_order=False)
    p = mod.init(jax.random.PRNGKey(7), x, y)

    def act(z):
        z = _rotate(z, D)
        if inversion:  # parity channel 0 is even under inversion, channel 1 odd
            z = z * np.array([1.0, -1.0])[:, None, None]
        return z

    out = mod.apply(p, act(x), act(y))
    np.testing.assert_allclose(out, act(mod.apply(p, x, y)), atol=2e-5)
