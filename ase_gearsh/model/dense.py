"""``e3x.nn.Dense`` as one batched product.

e3x's Dense applies one matrix per (parity, degree): with pseudotensors and degree 4
that is ten slices, ten products and two concatenations, and the gradient adds as many
again.  A training step on a few small molecules is made of thousands of such tiny
kernels, and its XLA compilation time grows with their number
(``benchmarks/training_step.py --hlo``).  :class:`Dense` keeps e3x's parameters (the
same names, shapes and initial values, so checkpoints and seeds are unchanged) and, for
at most ``batched_rows`` rows, applies them as one product batched over (parity,
degree-order) with each degree's matrix repeated over its 2l+1 orders.  Above that it
computes degree by degree as e3x does: the batched product moves (parity, order) in
front of the rows, and at 512 rows per bond chunk that made the device-scale bond stage
twice as slow (``benchmarks/device_scale.py``).
"""

from __future__ import annotations

import math

import e3x
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dense"]


class _Weights(nn.Module):
    """The parameters of one of e3x's per-degree ``flax.linen.Dense`` layers."""

    features: int
    use_bias: bool
    kernel_init: object
    bias_init: object

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        bias = (
            self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        return kernel, bias


class Dense(nn.Module):
    """``e3x.nn.Dense(features, use_bias)`` with the same parameters and outputs (to
    float32 rounding); input (..., P, (L+1)^2, F) with P = 1 or 2."""

    features: int
    use_bias: bool = True
    batched_rows: int = 128
    kernel_init: object = e3x.nn.modules.default_kernel_init
    bias_init: object = jax.nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        P, LM, F = x.shape[-3:]
        L = math.isqrt(LM) - 1
        if P not in (1, 2) or (L + 1) ** 2 != LM:
            raise ValueError(
                f"Dense expects inputs (..., 1 or 2, (L+1)^2, features), got {x.shape}"
            )
        if P == 2:
            names = [[f"{l}+" for l in range(L + 1)], [f"{l}-" for l in range(L + 1)]]
        else:
            names = [[f"{l}{'+-'[l % 2]}" for l in range(L + 1)]]
        weights = [
            [
                _Weights(
                    self.features,
                    self.use_bias and p == 0 and l == 0,
                    self.kernel_init,
                    self.bias_init,
                    name=names[p][l],
                )(F)
                for l in range(L + 1)
            ]
            for p in range(P)
        ]
        bias = weights[0][0][1]
        rows = math.prod(x.shape[:-3])
        if rows > self.batched_rows:  # e3x's order: a product per (parity, degree)
            y = jnp.stack(
                [
                    jnp.concatenate(
                        [
                            x[..., p, l * l : (l + 1) ** 2, :] @ weights[p][l][0]
                            for l in range(L + 1)
                        ],
                        axis=-2,
                    )
                    for p in range(P)
                ],
                axis=-3,
            )
        else:
            degree = np.repeat(np.arange(L + 1), 2 * np.arange(L + 1) + 1)
            W = jnp.stack([jnp.stack([w for w, _ in row]) for row in weights])  # (P, L+1, F, F')
            y = jnp.einsum("...pmf,pmfg->...pmg", x, W[:, degree])
        if bias is not None:
            y = y.at[..., 0, 0, :].add(bias)
        return y
