"""Device-scale prediction: ~4000-atom HfO2(Ni)/WSe2 with the paper's hyperparameters.

    python benchmarks/device_scale.py [--atoms 4000] [--kpm-atoms 1000] [--skip-kpm]

A randomly initialised model with the paper's configuration (listings 2-4, 8 A
cut-offs, mp_steps 0) and the szp(dzp) basis sets of Hf, O, Ni, W and Se times
each stage of ``GearsHCalculator`` on the structure of ``device_structure.py``:
neighbour list, network (edge density, atoms, bond chunks), sparse assembly of
H, exact sparse S, with peak memory (max RSS).  A second structure of the same
size (another seed) shows the cost without compilation (same shape bucket).
Then, on a ~1000-atom structure, the kernel polynomial DOS and W+Se projected
DOS are compared with dense diagonalisation.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from device_structure import build_device  # noqa: E402

ELEMENTS = ["O", "Ni", "Se", "Hf", "W"]


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def paper_model(seed: int = 0):
    from ase_gearsh.config import check_config, model_settings
    from ase_gearsh.engine import Model, pair_cutoff_matrix
    from ase_gearsh.layout import Layout, Registry
    from ase_gearsh.statistics import neutral_statistics
    from gpaw_tools.overlap import species_from_gpaw
    basis = species_from_gpaw(ELEMENTS, xc="PBE", basis="szp(dzp)")
    reg = Registry.from_basis({s: {"l": b.l, "rc": b.rc, "name": "szp(dzp)",
                                   "projector_rc": b.projector_rc} for s, b in basis.items()})
    lay = Layout(reg)
    cfg = check_config({"data": {"train_data_path": "unused"}})  # paper defaults
    settings = model_settings(cfg, reg.n_species, lay.lmax_out, lay.n_features)
    stats = neutral_statistics(lay, pair_cutoff_matrix(reg, settings["bond_cutoff"]))
    model = Model(settings, reg, stats, None, cfg)
    model.params = model.init_params(seed)
    model.basis_data = {s: b.to_dict() for s, b in basis.items()}
    model.coverage = None
    return model


def time_prediction(model, atoms, compiles, label):
    from ase_gearsh import GearsHCalculator
    calc = GearsHCalculator(model, warn_extrapolation=False, progress=True)
    atoms.calc = calc
    n0, c0 = compiles["n"], compiles["seconds"]
    t0 = time.perf_counter()
    pb = calc.blocks()
    t1 = time.perf_counter()
    H = calc.get_hamiltonian()
    t2 = time.perf_counter()
    S = calc.get_overlap()
    t3 = time.perf_counter()
    tm = pb.timings
    print(f"\n[{label}] {len(atoms)} atoms ({atoms.get_chemical_formula()}), "
          f"{pb.n_orbitals} orbitals, {tm['n_edges']} edges, {tm['n_bonds']} bonds "
          f"(x2 orientations), atoms padded to {tm['atoms_padded']}, chunks: edges "
          f"{tm['edge_chunk']}, bonds {tm['pair_chunk']}")
    print(f"  neighbour list      {tm['neighbour_list']:7.2f} s")
    print(f"  network: atoms      {tm['atoms']:7.2f} s   (edge density + descriptors + on-site)")
    print(f"  network: bonds      {tm['bonds']:7.2f} s")
    print(f"  to GPAW order       {tm['to_gpaw_order']:7.2f} s")
    print(f"  sparse H assembly   {t2 - t1:7.2f} s   (nnz {H.nnz:,})")
    print(f"  exact sparse S      {t3 - t2:7.2f} s   (nnz {S.nnz:,})")
    print(f"  total               {t3 - t0:7.2f} s   of which XLA compilation "
          f"{compiles['seconds'] - c0:.2f} s in {compiles['n'] - n0} compilations")
    print(f"  peak memory (max RSS so far) {rss_gib():.2f} GiB")
    return calc


def kpm_check(model, n_atoms, seed):
    from ase_gearsh import GearsHCalculator
    atoms = build_device(n_atoms, seed=seed)
    calc = GearsHCalculator(model, warn_extrapolation=False,
                            kpm={"n_moments": None, "n_random": 32, "seed": 0})
    atoms.calc = calc
    H, S = calc.get_hamiltonian(), calc.get_overlap()
    n = H.shape[0]
    print(f"\n[KPM vs dense] {len(atoms)} atoms, {n} orbitals")
    t0 = time.perf_counter()
    e_d, dos_d = calc.get_dos(width=0.2, npts=2001, method="dense")
    t1 = time.perf_counter()
    _, pd = calc.get_pdos(width=0.2, npts=2001, method="dense")
    t2 = time.perf_counter()
    lo, hi = e_d[0], e_d[-1]
    _, dos_k = calc.get_dos(width=0.2, npts=2001, emin=lo, emax=hi, method="kpm")
    _, pk = calc.get_pdos(width=0.2, npts=2001, emin=lo, emax=hi, method="kpm")
    t3 = time.perf_counter()
    de = e_d[1] - e_d[0]
    ws_d, ws_k = pd["W"] + pd["Se"], pk["W"] + pk["Se"]
    nws = np.trapezoid(ws_d, e_d)
    ef = calc.get_fermi_level()
    mom = calc._cache[("kpm", 0.2, None)]["moments"]
    print(f"  dense eigenvalues {t1 - t0:.1f} s, dense PDOS (eigenvectors) {t2 - t1:.1f} s; "
          f"KPM DOS+PDOS {t3 - t2:.1f} s ({mom.moments.shape[1]} moments, "
          f"{mom.n_random} random vectors, spectrum {lo:.1f}..{hi:.1f} eV)")
    print(f"  total DOS: integrated-DOS max error {np.abs(np.cumsum(dos_k - dos_d) * de).max():.2f}"
          f" states of {n} ({100 * np.abs(np.cumsum(dos_k - dos_d) * de).max() / n:.2f} %), "
          f"L1 {np.abs(dos_k - dos_d).sum() * de / n * 100:.2f} %")
    print(f"  W+Se PDOS: integrated max error "
          f"{np.abs(np.cumsum(ws_k - ws_d) * de).max():.2f} of {nws:.1f} states, "
          f"L1 {np.abs(ws_k - ws_d).sum() * de / nws * 100:.2f} %")
    win = (e_d >= ef) & (e_d <= ef + 0.2)
    print(f"  E_F dense {ef:.3f} eV; W+Se states in [E_F, E_F+0.2 eV]: dense "
          f"{np.trapezoid(ws_d[win], e_d[win]):.3f}, KPM {np.trapezoid(ws_k[win], e_d[win]):.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=4000)
    p.add_argument("--kpm-atoms", type=int, default=1000)
    p.add_argument("--skip-kpm", action="store_true")
    args = p.parse_args(argv)
    import collections

    import jax
    compiles = collections.Counter()

    def listener(event, duration, **kw):
        if "backend_compile" in event:
            compiles["n"] += 1
            compiles["seconds"] += duration
    jax.monitoring.register_event_duration_secs_listener(listener)
    print(f"JAX {jax.__version__} on {jax.devices()}; {__import__('os').cpu_count()} CPU cores")
    t = time.perf_counter()
    model = paper_model()
    from ase_gearsh.model import count_parameters
    print(f"paper configuration, random weights: {count_parameters(model.params):,} parameters, "
          f"{model.layout.n} canonical orbitals/atom, built in {time.perf_counter() - t:.1f} s")
    for k, seed in enumerate((0, 1)):
        t = time.perf_counter()
        atoms = build_device(args.atoms, seed=seed)
        print(f"\nstructure (seed {seed}) built in {time.perf_counter() - t:.2f} s")
        calc = time_prediction(model, atoms, compiles, "first call, compiles" if k == 0 else
                               "same size bucket, no compilation")
        del calc, atoms
    if not args.skip_kpm:
        kpm_check(model, args.kpm_atoms, seed=2)


if __name__ == "__main__":
    main()
