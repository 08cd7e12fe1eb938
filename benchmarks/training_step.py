"""Time of one compiled training step on one structure of a config's training data.

    python benchmarks/training_step.py CONFIG [--set KEY=VALUE ...] [--steps 6] [--before]
                                      [--batch N] [--tree] [--hlo]

Builds the config's data and model as ``gearsh train`` does, then runs ``--steps``
optimiser steps on one bond subsample of the first training structure (``--batch N``:
of the first N, in one batch) and prints each step's time (the first includes the
compilation) and the loss.  ``--before`` also runs
the same steps with the loss evaluated under ``jax.vmap`` over the single shard, as
every step was before (the batch's leading device axis of size 1), in the same process:
the two losses agree to rounding and the times compare directly.  ``--tree`` also runs
the steps with the parameters, their moving average and the optimiser's moments kept as
the parameter tree (a few hundred arrays), as before they became one flat vector each
(``StepFunctions.init_state``).  The first step's time is split into tracing and XLA
compilation; ``--hlo`` also prints what the compiled step is made of (the top-level
operations of its optimised HLO: each fusion is one compiled kernel, and on the CPU the
XLA compilation time grows with their number).  Pin it to one core
with ``taskset`` and ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` for the training
runs' setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def kernels(compiled) -> str:
    """The top-level operations of a compiled computation's optimised HLO, by kind."""
    import collections
    import re

    text = compiled.as_text()
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    kinds = collections.Counter(
        m.group(1) for m in re.finditer(r"= [^ ]+(?: [^ ]+)*? ([a-z][a-z0-9_-]*)\(", entry)
    )
    n_fusions = len(re.findall(r" fusion\(", text))  # in every computation (loops too)
    top = ", ".join(f"{k} {v}" for k, v in kinds.most_common(6))
    return (
        f"{sum(kinds.values())} top-level operations ({top}); {n_fusions} fusions (kernels) in all"
    )


def run(cfg, steps_n: int, vmapped: bool, n_batch: int = 1, tree: bool = False, hlo=False):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from compilations import compilation_counter

    from ase_gearsh.model.engine import precision
    from ase_gearsh.training import train as T

    compiles = compilation_counter()

    data = T.prepare_data(cfg, Path("."), lambda *a: None, False)
    model, params = T.build_model(cfg, data)
    original = T._batch_sums
    if vmapped:  # the loss as before: jax.vmap over the leading shard axis, even of size 1

        def _batch_sums(model, orbital_mask, params, stats, batch, *a, **k):
            def one(b):
                return original(
                    model,
                    orbital_mask,
                    params,
                    stats,
                    jax.tree_util.tree_map(lambda x: x[None], b),
                    *a,
                    **k,
                )

            return jax.vmap(one)(batch).sum(axis=0)

        T._batch_sums = _batch_sums
    try:
        steps = T.StepFunctions(cfg, model, data, lambda *a: None)
        if tree:
            steps.elementwise = False
        state = steps.init_state(params)
        rng = np.random.default_rng(0)
        gs = [T._subsample(x, steps.bond_fraction, 0.0, rng) for x in data.train[:n_batch]]
        batch = steps.batch(gs)
        times, first, setup = [], {}, dict(compiles)  # setup: the initialiser's and helpers'

        def args(i):
            s = state
            return (s.params, s.opt_state, s.ema, steps.stats, batch, jnp.float32(1), jnp.int32(i))

        for i in range(steps_n):
            t = time.perf_counter()
            with precision():
                state.params, state.opt_state, state.ema, loss = steps._step(*args(i))
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t)
            if i == 0:
                first = {k: compiles[k] - setup.get(k, 0) for k in ("n", "seconds")}
                first["setup"] = setup
        if hlo:
            with precision():
                first["hlo"] = kernels(steps._step.lower(*args(0)).compile())
    finally:
        T._batch_sums = original
    return (
        times,
        float(loss),
        sum(len(g.pair_i) for g in gs),
        sum(len(g.edge_i) for g in gs),
        sum(x.n_atoms for x in data.train[:n_batch]),
        first,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--before", action="store_true", help="also time the vmapped loss")
    p.add_argument("--batch", type=int, default=1, help="structures per step (default: 1)")
    p.add_argument("--tree", action="store_true", help="also time the parameter-tree step")
    p.add_argument("--hlo", action="store_true", help="print the compiled step's operations")
    a = p.parse_args(argv)
    import jax

    from ase_gearsh.training.config import load_config

    cfg = load_config(a.config, a.set)
    if a.batch < 1:
        p.error(f"--batch must be at least 1, got {a.batch}")
    cfg["data"]["batch_size"] = a.batch
    print(f"{a.config}: devices {jax.devices()}")
    modes = [("now (one shard, no vmap, flat parameters)", False, False)]
    if a.tree:
        modes.append(("parameter tree (one shard, no vmap)", False, True))
    if a.before:
        modes.append(("before (vmap over the shard axis)", True, False))
    for name, vm, tree in modes:
        times, loss, P, E, N, first = run(cfg, a.steps, vm, a.batch, tree, a.hlo)
        steady = sorted(times[1:])
        print(
            f"{name}: {a.batch} structure(s), {N} atoms, {E} edges, {P} bonds; "
            f"first step {times[0]:.1f} s "
            f"({first['n']} XLA compilations: {first['seconds']:.1f} s, the rest tracing; "
            f"before it {first['setup'].get('n', 0)} compilations of the initialiser and "
            f"helpers: {first['setup'].get('seconds', 0.0):.1f} s; 0 when the on-disk cache "
            f"had them), then median {1e3 * steady[len(steady) // 2]:.1f} ms per step "
            f"(min {1e3 * steady[0]:.1f} ms); loss after {len(times)} steps {loss:.6f}",
            flush=True,
        )
        if "hlo" in first:
            print(f"  compiled step: {first['hlo']}", flush=True)


if __name__ == "__main__":
    main()
