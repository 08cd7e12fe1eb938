"""The e3x fused tensor product, evaluated as large matrix products.

:class:`FusedTensor` and :class:`TensorDense` compute exactly what
``e3x.nn.FusedTensor`` and ``e3x.nn.TensorDense(use_fused_tensor=True)`` compute,
with the same parameters (names, shapes, initialisation), so a checkpoint written
with either loads into the other; they differ only in how the contractions are
laid out for the compiler.

Math (e3x's fused tensor product, inputs with both parities, P = 2): with the
Clebsch-Gordan table C[l, m, n] of degree ~l = ceil(L_max / 2) coupled to the
irreps n of degree <= L_max,

    X^(p)  = sum_n C[:, :, n] (w^(p)_1[n] x^(p)[n])    ((2~l+1) x (2~l+1) matrices)
    Z^(pq) = X^(p) Y^(q)                                (matrix products)
    z[n]   = sum_pq w^(pq)_3[n] sum_lm C[l, m, n] Z^(pq)[l, m]

per feature f.  e3x evaluates the first and last steps as einsums over a
(batch, features) broadcast and the middle one as a batched 5 x 5 matrix product
per (bond, feature): on the CPU this runs at about 3 GFLOP/s.  Here the batch
and the features are one trailing axis of length B * F, so the first and last
steps are single (25 x 25) @ (25 x B F) matrix products and the middle one is an
element-wise product summed over m, which the compiler fuses into one loop: the
same arithmetic at several times the speed (``benchmarks/fused_tensor.py``).

Inputs with one parity (P = 1) fall back to e3x's own module, unchanged.
"""

from __future__ import annotations

import math

import e3x
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from e3x.nn import initializers

from .dense import Dense

__all__ = ["FusedTensor", "TensorDense"]


def _degree(n_lm: int) -> int:
    lmax = int(round(math.sqrt(n_lm))) - 1
    if (lmax + 1) ** 2 != n_lm:
        raise ValueError(f"axis -2 must have (L+1)**2 entries, got {n_lm}")
    return lmax


def _cg_tables(matrix_degree: int, max_degree: int) -> np.ndarray:
    """C[l, m, n]: (2~l+1, 2~l+1, (L_max+1)^2) in e3x's (spherical) order, float64."""
    with jax.ensure_compile_time_eval():
        cg = e3x.so3.clebsch_gordan(matrix_degree, matrix_degree, max_degree, cartesian_order=False)
    i, j = matrix_degree**2, (matrix_degree + 1) ** 2
    return np.asarray(cg, np.float64)[i:j, i:j, :]


class FusedTensor(e3x.nn.FusedTensor):
    """``e3x.nn.FusedTensor`` with the faster layout where both inputs have both
    parities (and ``cartesian_order=False``, ``include_pseudotensors=True``, float32
    parameters, the default kernel initialiser); e3x's own code otherwise."""

    @nn.compact
    def __call__(self, inputs1, inputs2):
        if (
            self.cartesian_order
            or not self.include_pseudotensors
            or inputs1.shape[-3] != 2
            or inputs2.shape[-3] != 2
            or self.kernel_init is not initializers.fused_tensor_normal
            or self.param_dtype != jnp.float32
        ):
            return super().__call__(inputs1, inputs2)
        L1, L2 = _degree(inputs1.shape[-2]), _degree(inputs2.shape[-2])
        L3 = max(L1, L2) if self.max_degree is None else int(self.max_degree)
        if L3 > L1 + L2:
            raise ValueError(
                f"max_degree for the tensor product of inputs with max_degree {L1} and "
                f"{L2} can be at most {L1 + L2}, received max_degree={L3}"
            )
        F = inputs1.shape[-1]
        if inputs2.shape[-1] != F:
            raise ValueError(
                "axis -1 of inputs1 and input2 must have the same size, "
                f"received shapes {inputs1.shape} and {inputs2.shape}"
            )
        Lmax = max(L1, L2, L3)
        md = math.ceil(Lmax / 2)
        nm = 2 * md + 1
        cg = _cg_tables(md, Lmax)  # (nm, nm, (Lmax+1)^2)
        var_in = 1.0 / math.sqrt(nm) * nm / min(L1 + 1, L2 + 1)
        var_out = 0.5
        init = self.kernel_init

        def param(name, var, L):
            return self.param(name, init(var, True), (L + 1, F), self.param_dtype)

        k_e1, k_o1 = param("kernel_e1", var_in, L1), param("kernel_o1", var_in, L1)
        k_e2, k_o2 = param("kernel_e2", var_in, L2), param("kernel_o2", var_in, L2)
        k_eee, k_ooe = param("kernel_eee", var_out, L3), param("kernel_ooe", var_out, L3)
        k_eoo, k_oeo = param("kernel_eoo", var_out, L3), param("kernel_oeo", var_out, L3)

        dtype = self.dtype or jnp.result_type(inputs1.dtype, inputs2.dtype, jnp.float32)
        batch = inputs1.shape[:-3]
        if inputs2.shape[:-3] != batch:
            inputs1, inputs2 = jnp.broadcast_arrays(inputs1, inputs2)
            batch = inputs1.shape[:-3]

        def per_lm(kernel, L):  # (L+1, F) -> ((L+1)^2, 1, F): the weight of each irrep
            rep = np.repeat(np.arange(L + 1), 2 * np.arange(L + 1) + 1)
            return kernel[rep][:, None, :].astype(dtype)

        def trailing(x):  # (..., 2, N, F) -> (2, N, B, F)
            x = x.reshape((-1,) + x.shape[-3:])
            return jnp.transpose(x, (1, 2, 0, 3))

        x1, x2 = trailing(inputs1), trailing(inputs2)
        B = x1.shape[2]
        to_mat1 = jnp.asarray(cg[:, :, : (L1 + 1) ** 2].reshape(nm * nm, -1), dtype)
        to_mat2 = jnp.asarray(cg[:, :, : (L2 + 1) ** 2].reshape(nm * nm, -1), dtype)
        to_vec = jnp.asarray(cg[:, :, : (L3 + 1) ** 2].reshape(nm * nm, -1).T, dtype)

        def to_matrix(x, kernel, table, L):  # (N, B, F) -> (nm, nm, B * F)
            xk = (x * per_lm(kernel, L)).reshape(x.shape[0], B * F)
            return (table @ xk).reshape(nm, nm, B * F)

        e1 = to_matrix(x1[0], k_e1, to_mat1, L1)
        o1 = to_matrix(x1[1], k_o1, to_mat1, L1)
        e2 = to_matrix(x2[0], k_e2, to_mat2, L2)
        o2 = to_matrix(x2[1], k_o2, to_mat2, L2)

        def couple(a, b):  # Z[l, n] = sum_m a[l, m] b[m, n], per trailing column
            # unrolled over l and m: XLA fuses the (2~l+1)^2 vector products into one
            # loop; a broadcast-and-sum is about 20x slower on the CPU
            return jnp.stack([sum(a[l, m][None, :] * b[m] for m in range(nm)) for l in range(nm)])

        def to_vector(z, kernel):  # (nm, nm, B F) -> ((L3+1)^2, B, F), weighted
            v = (to_vec @ z.reshape(nm * nm, B * F)).reshape(-1, B, F)
            return v * per_lm(kernel, L3)

        even = to_vector(couple(e1, e2), k_eee) + to_vector(couple(o1, o2), k_ooe)
        odd = to_vector(couple(e1, o2), k_eoo) + to_vector(couple(o1, e2), k_oeo)
        out = jnp.stack([even, odd])  # (2, N3, B, F)
        return jnp.transpose(out, (2, 0, 1, 3)).reshape(batch + out.shape[:2] + (F,))


class TensorDense(nn.Module):
    """Drop-in for ``e3x.nn.TensorDense(use_fused_tensor=True)``: a dense layer to
    2 x features, split in two, and their :class:`FusedTensor` product."""

    features: int | None = None
    max_degree: int | None = None
    use_bias: bool = True
    cartesian_order: bool = False

    @nn.compact
    def __call__(self, inputs):
        F = inputs.shape[-1] if self.features is None else self.features
        y = Dense(2 * F, use_bias=self.use_bias, name="dense")(inputs)
        x1, x2 = jnp.split(y, 2, axis=-1)
        return FusedTensor(
            max_degree=self.max_degree, cartesian_order=self.cartesian_order, name="fused_tensor"
        )(x1, x2)
