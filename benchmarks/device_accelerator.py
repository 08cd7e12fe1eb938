"""Device-scale prediction and a dense generalised eigensolve on whatever device JAX
finds (a GPU with the CUDA extra, else the CPU): the same code as on 2 CPU cores.

    python benchmarks/device_accelerator.py [--atoms 4000] [--eig-atoms 4000] [--float32]

Prints the device, then for the HfO2(Ni)/WSe2 structure of ``device_structure.py``:

* the stages of the prediction of H and the exact S (``device_scale.py``: random
  weights, the paper's hyperparameters), twice (the second call has no compilation);
* a dense generalised eigensolve H c = E S c of the predicted H and exact S of
  ``--eig-atoms`` atoms on the device: Cholesky S = L L^T, A = L^-1 H L^-T
  (triangular solves), eigenvalues of A; the time of each step and the memory the
  dense matrices need (45,289 orbitals at 4000 atoms: 16.4 GB per float64 matrix, fits
  a large GPU; on this project's 2-core, 24 GB CPU machine use ``--eig-atoms 1000``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from device_scale import paper_model, time_prediction  # noqa: E402
from device_structure import build_device  # noqa: E402


def dense_eigensolve(H, S, dtype) -> None:
    import jax
    import jax.numpy as jnp
    from jax.scipy.linalg import cholesky, solve_triangular

    n = H.shape[0]
    gb = n * n * jnp.dtype(dtype).itemsize / 1e9
    print(
        f"\ndense generalised eigensolve: {n} orbitals, {jnp.dtype(dtype).name}, {gb:.2f} GB/matrix"
    )
    t = time.perf_counter()
    Hd = jax.device_put(jnp.asarray(H.toarray(), dtype=dtype))
    Sd = jax.device_put(jnp.asarray(S.toarray(), dtype=dtype))
    Hd.block_until_ready()
    print(f"  to the device          {time.perf_counter() - t:8.2f} s")

    @jax.jit
    def reduce(Hm, Sm):
        L = cholesky(Sm, lower=True)
        X = solve_triangular(L, Hm, lower=True)
        return solve_triangular(L, X.T, lower=True).T  # L^-1 H L^-T (symmetric)

    eigvalsh = jax.jit(jnp.linalg.eigvalsh)
    for label in ("first (compiles)", "second"):
        t = time.perf_counter()
        A = reduce(Hd, Sd).block_until_ready()
        t1 = time.perf_counter()
        e = eigvalsh(A).block_until_ready()
        t2 = time.perf_counter()
        print(
            f"  [{label}] Cholesky + reduction {t1 - t:7.2f} s, eigenvalues {t2 - t1:7.2f} s, "
            f"total {t2 - t:7.2f} s; spectrum {float(e[0]):.2f} .. {float(e[-1]):.2f} eV"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=4000, help="prediction size (4000)")
    p.add_argument("--eig-atoms", type=int, default=4000, help="eigensolve size (4000)")
    p.add_argument("--float32", action="store_true", help="eigensolve in float32")
    a = p.parse_args(argv)
    if not a.float32:
        os.environ.setdefault("JAX_ENABLE_X64", "1")
    import jax
    import jax.numpy as jnp
    from compilations import compilation_counter

    compiles = compilation_counter()
    dev = jax.devices()
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}: {dev}")
    print(f"{os.cpu_count()} CPU cores visible")
    model = paper_model()
    if a.atoms:
        for k, seed in enumerate((0, 1)):
            atoms = build_device(a.atoms, seed=seed)
            label = "first call, compiles" if k == 0 else "same size bucket, no compilation"
            time_prediction(model, atoms, compiles, label)
    if a.eig_atoms:
        atoms = build_device(a.eig_atoms, seed=2)
        calc = time_prediction(model, atoms, compiles, "eigensolve structure")
        H, S = calc.get_hamiltonian(), calc.get_overlap()
        dense_eigensolve(H, S, jnp.float32 if a.float32 else jnp.float64)


if __name__ == "__main__":
    main()
