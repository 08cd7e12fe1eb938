"""ase_gearsh.model.dense.Dense: e3x's Dense as one batched product."""

import e3x
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ase_gearsh.model.dense import Dense


def _x(rows, P, L, F, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (rows, P, (L + 1) ** 2, F))


@pytest.mark.parametrize("rows", [7, 40])  # batched product, and e3x's per-degree order
@pytest.mark.parametrize(
    "P,L,F,G,bias", [(2, 4, 6, 5, True), (1, 2, 4, 3, False), (2, 1, 3, 7, True)]
)
def test_same_parameters_outputs_and_gradients_as_e3x(rows, P, L, F, G, bias):
    x = _x(rows, P, L, F)
    ref, new = e3x.nn.Dense(G, use_bias=bias), Dense(G, use_bias=bias, batched_rows=16)
    p_ref, p_new = ref.init(jax.random.PRNGKey(3), x), new.init(jax.random.PRNGKey(3), x)
    # the same names, shapes and initial values: checkpoints and seeds are unchanged
    assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_new)
    for a, b in zip(jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(p_new)):
        np.testing.assert_array_equal(a, b)
    # trained-like parameters (a non-zero bias)
    params = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(9), a.shape), p_ref
    )
    np.testing.assert_allclose(new.apply(params, x), ref.apply(params, x), atol=2e-6, rtol=0)

    def loss(module):
        return lambda p, x: (jnp.sin(module.apply(p, x)) ** 2).sum()

    g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    g_new = jax.grad(loss(new), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_new)):
        np.testing.assert_allclose(b, a, atol=1e-5 * float(np.abs(a).max()) + 1e-7, rtol=0)


@pytest.mark.parametrize("rows", [5, 40])
def test_rotation_and_inversion_equivariance(rows):
    L, F = 3, 4
    x = _x(rows, 2, L, F, seed=4)
    d = Dense(6, batched_rows=16)
    p = d.init(jax.random.PRNGKey(0), x)
    p = jax.tree_util.tree_map(lambda a: a + 0.2, p)  # a bias on the even scalars
    rot = e3x.so3.random_rotation(jax.random.PRNGKey(5))
    D = e3x.so3.wigner_d(rot, max_degree=L, cartesian_order=False)  # ((L+1)^2, (L+1)^2)
    x_rot = jnp.einsum("npmf,mk->npkf", x, D)
    np.testing.assert_allclose(
        d.apply(p, x_rot), jnp.einsum("npmf,mk->npkf", d.apply(p, x), D), atol=2e-5, rtol=0
    )
    # inversion: channel (parity p, degree l) changes sign as (-1)^(l + p)
    degree = np.repeat(np.arange(L + 1), 2 * np.arange(L + 1) + 1)
    sign = jnp.asarray((-1.0) ** (degree[None, :] + np.arange(2)[:, None]))[..., None]
    np.testing.assert_allclose(d.apply(p, x * sign), d.apply(p, x) * sign, atol=2e-6, rtol=0)


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 1 or 2, \(L\+1\)\^2"):
        Dense(3).init(jax.random.PRNGKey(0), jnp.ones((4, 2, 5, 3)))
