"""Forward and backward time of the equivariant dense layer on bond-sized features.

    python benchmarks/dense_backward.py [--bonds 1536] [--features 18] [--degree 4]

A training step of the WSe2 model spends most of its time in the backward pass of the
bond network (about 8x its forward).  This prints, for features of shape (bonds, 2,
(L+1)^2, F) like the bond stage's: ``e3x.nn.Dense`` (separate weights per degree and
parity, flax ``nn.Dense`` over "..." batch axes) forward and forward+backward, and one
matrix product written with "..." batch axes (``einsum``) against the same product on
the array reshaped to two dimensions, with its vector-Jacobian product alone.
"""

from __future__ import annotations

import argparse
import time


def timeit(name, f, *args, repeat: int = 7):
    import jax

    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    print(f"{name:42s} {1e3 * best:8.2f} ms   (first call {first:.1f} s)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bonds", type=int, default=1536)
    p.add_argument("--features", type=int, default=18)
    p.add_argument("--degree", type=int, default=4)
    a = p.parse_args(argv)
    import e3x
    import jax
    import jax.numpy as jnp

    B, F, L = a.bonds, a.features, a.degree
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 2, (L + 1) ** 2, F))
    W = jax.random.normal(jax.random.PRNGKey(1), (F, F))
    print(f"features {x.shape}, devices {jax.devices()}")
    dense = e3x.nn.Dense(F)
    params = dense.init(jax.random.PRNGKey(2), x)

    def loss(f):
        return lambda *args: jnp.sum(f(*args) ** 2)

    timeit("e3x.nn.Dense forward", jax.jit(dense.apply), params, x)
    timeit(
        "e3x.nn.Dense forward + backward",
        jax.jit(jax.grad(loss(dense.apply), argnums=(0, 1))),
        params,
        x,
    )
    products = {
        "einsum over '...' axes": lambda W, x: jnp.einsum("...f,fg->...g", x, W),
        "2-D reshape": lambda W, x: (x.reshape(-1, F) @ W).reshape(x.shape[:-1] + (F,)),
    }
    for name, f in products.items():
        timeit(f"{name}: forward", jax.jit(f), W, x)
        timeit(f"{name}: forward + backward", jax.jit(jax.grad(loss(f), argnums=(0, 1))), W, x)
        timeit(f"{name}: vjp alone", jax.jit(lambda W, x, g, f=f: jax.vjp(f, W, x)[1](g)), W, x, x)


if __name__ == "__main__":
    main()
