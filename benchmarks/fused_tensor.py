"""e3x's fused tensor product against ``ase_gearsh.model.fused`` (same parameters and
outputs), back to back in one process, on the bond stage's shapes.

    python benchmarks/fused_tensor.py [--batch 256] [--features 24] [--repeat 20]

Printed per module: microseconds per row (bond) of the forward pass and of the
forward + backward pass (gradients of the parameters and both inputs), and the
largest difference of the outputs.  JAX on whatever device it finds.
"""

from __future__ import annotations

import argparse
import time

import e3x
import jax
import jax.numpy as jnp

from ase_gearsh.model.fused import FusedTensor, TensorDense


def _time(f, args, repeat):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(repeat):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t) / repeat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--features", type=int, default=24)
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args(argv)
    B, F, L = a.batch, a.features, a.degree
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (B, 2, (L + 1) ** 2, F))
    y = jax.random.normal(k[1], (B, 2, (L + 1) ** 2, F))
    print(f"JAX {jax.__version__} on {jax.devices()}; batch {B}, features {F}, degree {L}")
    cases = [
        (
            "FusedTensor",
            e3x.nn.FusedTensor(max_degree=L, cartesian_order=False),
            FusedTensor(max_degree=L, cartesian_order=False),
            (x, y),
        ),
        (
            "TensorDense (fused)",
            e3x.nn.TensorDense(18, max_degree=L, use_fused_tensor=True, cartesian_order=False),
            TensorDense(18, max_degree=L),
            (x,),
        ),
    ]
    for name, ref, new, inputs in cases:
        params = ref.init(k[2], *inputs)
        out = {}
        for label, mod in (("e3x", ref), ("ase_gearsh", new)):

            def loss(p, *xs, mod=mod):
                return jnp.sum(jnp.tanh(mod.apply(p, *xs)))

            fwd = jax.jit(mod.apply)
            both = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs) + 1))))
            t_f = _time(fwd, (params, *inputs), a.repeat)
            t_b = _time(both, (params, *inputs), a.repeat)
            out[label] = (fwd(params, *inputs), t_f, t_b)
            print(
                f"{name:20s} {label:11s} forward {t_f / B * 1e6:7.1f} us/row, "
                f"forward+backward {t_b / B * 1e6:7.1f} us/row"
            )
        (r, tf0, tb0), (n, tf1, tb1) = out["e3x"], out["ase_gearsh"]
        print(
            f"{name:20s} speed-up: forward {tf0 / tf1:.1f}x, forward+backward {tb0 / tb1:.1f}x; "
            f"max |difference| {float(jnp.abs(r - n).max()):.2e} (max |out| "
            f"{float(jnp.abs(r).max()):.2f})"
        )


if __name__ == "__main__":
    main()
