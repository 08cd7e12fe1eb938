"""Device-scale prediction: ~4000-atom HfO2(Ni)/WSe2 with the paper's hyperparameters.

    python benchmarks/device_scale.py [--atoms 4000] [--overlap-alongside on off]
                                      [--overlap-screen 0 1e-8] [--repeat N]

A randomly initialised model with the paper's configuration (listings 2-4, 8 A
cut-offs, mp_steps 0) and the szp(dzp) basis sets of Hf, O, Ni, W and Se times
each stage of ``GearsHCalculator`` on the structure of ``device_structure.py``:
neighbour list, network (edge density, atoms, bond chunks), sparse assembly of
H, exact sparse S, with peak memory (max RSS), and at 3999 atoms each stage's
speed-up over the release before the device-scale work (142 s, 18 GiB:
``REFERENCE``).  A second structure of the same size (another seed) shows the cost
without compilation (same shape bucket).
Spectra are not timed here: a random model has no physical spectrum (see
``kpm_accuracy.py`` for KPM against dense diagonalisation with a trained model).
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

# the release before the device-scale work (docs/benchmarks.md, "Inference at device scale": the
# same structure and model, 2 cores, second structure, S after the network); each stage
# of a 3999-atom run is printed with its speed-up over these
REFERENCE_ATOMS = 3999
REFERENCE = {
    "neighbour list": 1.3,
    "network: atoms": 2.2,
    "network: bonds": 50.2,
    "GPAW order + sparse H": 5.7,
    "exact sparse S": 83.0,
    "total": 142.0,
}
REFERENCE_PEAK_GIB = 18.0


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def paper_model(
    seed: int = 0,
    readout_fused_tensor: bool = True,
    baseline: bool = False,
    descriptor: tuple[int, int] | None = None,
):
    from ase_gearsh.core.basis import Registry
    from ase_gearsh.model.engine import Model, pair_cutoff_matrix
    from ase_gearsh.model.layout import Layout
    from ase_gearsh.model.statistics import neutral_statistics
    from ase_gearsh.training.config import check_config, model_settings
    from gpaw_tools.overlap import species_from_gpaw

    basis = species_from_gpaw(ELEMENTS, xc="PBE", basis="szp(dzp)")
    reg = Registry.from_basis(
        {
            s: {"l": b.l, "rc": b.rc, "name": "szp(dzp)", "projector_rc": b.projector_rc}
            for s, b in basis.items()
        }
    )
    lay = Layout(reg)
    cfg = check_config(
        {
            "data": {"train_data_path": "unused"},  # paper defaults
            "model": {
                "mlp": {"readout_fused_tensor": readout_fused_tensor},
                "atom_centered": {"descriptor": descriptor_options(descriptor)},
            },
        }
    )
    settings = model_settings(cfg, reg.n_species, lay.lmax_out, lay.n_features)
    stats = neutral_statistics(lay, pair_cutoff_matrix(reg, settings["bond_cutoff"]))
    if baseline:  # a two-centre baseline table of the trained size (random values: cost only)
        from ase_gearsh.training.baseline import N_GRID

        rng = np.random.default_rng(seed)
        S1, L = reg.n_species + 1, lay.lmax_out
        m0 = [l * l for l in range(L + 1)]
        mask = lay.irreps_mask[:, :, :, m0, :]  # (S, S, 2, L + 1, F)
        table = rng.normal(size=(S1, S1, N_GRID) + mask.shape[2:]) * mask[:, :, None]
        stats["pair_baseline"] = table.astype(np.float32)
    model = Model(settings, reg, stats, None, cfg)
    model.params = model.init_params(seed)
    model.basis_data = {s: b.to_dict() for s, b in basis.items()}
    model.coverage = None
    return model


def descriptor_options(descriptor: tuple[int, int] | None) -> dict:
    """The descriptor keys for (features, TensorDenses); None: the paper's."""
    if descriptor is None:
        return {}
    features, tds = descriptor
    return {"num_tensordense_features": int(features), "num_tensordenses": int(tds)}


def _evaluation(model) -> str:
    mode = model.config["model"]["bond_centered"].get("evaluation", "both_orientations")
    return "once per bond" if mode == "once" else "in both orientations"


def time_prediction(model, atoms, compiles, label, alongside=None, screen=None):
    from ase_gearsh import GearsHCalculator

    extra = {} if screen is None else {"overlap_screen": screen}
    calc = GearsHCalculator(
        model, warn_extrapolation=False, progress=True, overlap_alongside=alongside, **extra
    )
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
    print(
        f"\n[{label}] {len(atoms)} atoms ({atoms.get_chemical_formula()}), "
        f"{pb.n_orbitals} orbitals, {tm['n_edges']} edges, {tm['n_bonds']} bonds "
        f"(evaluated {_evaluation(model)}), atoms padded to {tm['atoms_padded']}, chunks: edges "
        f"{tm['edge_chunk']}, bonds {tm['pair_chunk']}"
    )
    if alongside is not None and len(atoms) >= alongside:
        print(
            f"  network with exact S alongside (worker thread): {t1 - t0:.2f} s wall; "
            f"the network's stages:"
        )
    print(f"  neighbour list      {tm['neighbour_list']:7.2f} s")
    print(f"  network: atoms      {tm['atoms']:7.2f} s   (edge density + descriptors + on-site)")
    print(f"  network: bonds      {tm['bonds']:7.2f} s")
    print(f"  to GPAW order       {tm['to_gpaw_order']:7.2f} s")
    print(f"  sparse H assembly   {t2 - t1:7.2f} s   (nnz {H.nnz:,})")
    print(
        f"  exact sparse S      {t3 - t2:7.2f} s   (nnz {S.nnz:,}, "
        f"overlap_screen {calc.parameters.overlap_screen:g})"
        + ("   (done alongside the network)" if alongside and len(atoms) >= alongside else "")
    )
    print(
        f"  total               {t3 - t0:7.2f} s   of which XLA compilation "
        f"{compiles['seconds'] - c0:.2f} s in {compiles['n'] - n0} compilations"
    )
    print(f"  peak memory (max RSS so far) {rss_gib():.2f} GiB")
    if len(atoms) == REFERENCE_ATOMS and compiles["n"] == n0:  # without compilation
        now = {
            "neighbour list": tm["neighbour_list"],
            "network: atoms": tm["atoms"],
            "network: bonds": tm["bonds"],
            "GPAW order + sparse H": tm["to_gpaw_order"] + (t2 - t1),
            "exact sparse S": t3 - t2,
            "total": t3 - t0,
        }
        parts = [
            f"{k} {REFERENCE[k] / v:.1f}x" if v > 0.05 else f"{k} (alongside)"
            for k, v in now.items()
        ]
        print(
            f"  speed-up over the reference release ({REFERENCE['total']:.0f} s, "
            f"{REFERENCE_PEAK_GIB} GiB; docs/benchmarks.md): "
            + ", ".join(parts)
            + f"; peak memory {rss_gib() / REFERENCE_PEAK_GIB:.2f}x"
        )
    calc.total_seconds = t3 - t0
    return calc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=4000)
    p.add_argument(
        "--unfused-readout",
        action="store_true",
        help="model.mlp.readout_fused_tensor: false (the slower readouts)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="with a two-centre baseline table in the statistics (its cost in the bond stage)",
    )
    p.add_argument(
        "--bond-threads",
        type=int,
        nargs="+",
        default=[None],
        help="bond chunks evaluated at a time (default: the usable cores); several values "
        "time the second structure once per value, back to back",
    )
    p.add_argument(
        "--pair-chunks",
        type=int,
        nargs="+",
        default=[None],
        help="bonds per network call (default: the calculator's); with several values each "
        "is compiled on a first structure and timed on the second, back to back",
    )
    p.add_argument(
        "--overlap-alongside",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="exact S in a worker thread while the network runs (the calculator's default) "
        "or after it; several values time the second structure once per value, back to back",
    )
    p.add_argument(
        "--descriptor",
        type=int,
        nargs=2,
        metavar=("FEATURES", "TENSORDENSES"),
        help="atom descriptor size instead of the paper's 12 features and 1 TensorDense "
        "(benchmarks/molecules_fast.yaml uses 24 2)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time the second structure this many times per configuration (interleaved), "
        "then print each configuration's totals and median: this machine's noise",
    )
    p.add_argument(
        "--overlap-screen",
        type=float,
        nargs="+",
        default=[None],
        help="the calculator's overlap_screen (default: its default, 1e-8; 0: exact S); "
        "several values time the second structure once per value, back to back",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="ase_gearsh.core.memory.keep_freed_memory() first: glibc keeps freed memory for "
        "the next structure (resident memory stays at its peak)",
    )
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        from ase_gearsh.core.memory import keep_freed_memory

        print(f"keep_freed_memory(): {keep_freed_memory()}")
    import jax
    from compilations import compilation_counter

    compiles = compilation_counter()
    print(f"JAX {jax.__version__} on {jax.devices()}; {__import__('os').cpu_count()} CPU cores")
    t = time.perf_counter()
    model = paper_model(
        readout_fused_tensor=not args.unfused_readout,
        baseline=args.baseline,
        descriptor=tuple(args.descriptor) if args.descriptor else None,
    )
    from ase_gearsh.model.network import count_parameters

    print(
        (
            "paper configuration"
            if not args.descriptor
            else f"paper configuration but a descriptor of {args.descriptor[0]} features and "
            f"{args.descriptor[1]} TensorDenses"
        )
        + f", random weights: {count_parameters(model.params):,} parameters, "
        f"{model.layout.n} canonical orbitals/atom, built in {time.perf_counter() - t:.1f} s"
    )
    from ase_gearsh.model.inference import predictor_for

    predictor = predictor_for(model)  # the calculator's (default chunks)
    from ase_gearsh.calculator import GearsHCalculator

    along = {"on": GearsHCalculator.default_parameters["overlap_alongside"], "off": None}
    modes = [along[m] for m in args.overlap_alongside]
    sc = args.overlap_screen
    runs = [(0, args.bond_threads[0], None, modes[0], sc[0])]
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    runs += [
        (1, n, None, m, e)
        for _ in range(args.repeat)
        for n in args.bond_threads
        for m in modes
        for e in sc
    ]
    totals: dict = {}
    if args.pair_chunks != [None]:  # a compiling structure, then the timed one, per value
        runs = [(seed, None, c, modes[0], sc[0]) for c in args.pair_chunks for seed in (0, 1)]
    for seed, threads, chunk, alongside, screen in runs:
        if threads is not None:
            predictor.threads = threads
        if chunk is not None:
            predictor.pair_chunk = chunk
        t = time.perf_counter()
        atoms = build_device(args.atoms, seed=seed)
        print(
            f"\nstructure (seed {seed}) built in {time.perf_counter() - t:.2f} s; "
            f"bond chunks {predictor.threads} at a time, {predictor.pair_chunk} bonds per chunk"
        )
        calc = time_prediction(
            model,
            atoms,
            compiles,
            "first call, compiles" if seed == 0 else "same size bucket, no compilation",
            alongside,
            screen,
        )
        if seed == 1:
            really = alongside is not None and len(atoms) >= alongside
            key = (predictor.threads, predictor.pair_chunk, really, screen)
            totals.setdefault(key, []).append(calc.total_seconds)
        del calc, atoms
    if args.repeat > 1:
        print("\ntotals of the second structure, interleaved runs:")
        for (threads, chunk, really, screen), ts in totals.items():
            mode = "S alongside" if really else "S after the network"
            print(
                f"  {mode}, screen {screen if screen is not None else 'default'}, bond chunks "
                f"{threads} at a time of {chunk}: median {np.median(ts):.2f} s, "
                f"min {min(ts):.2f}, max {max(ts):.2f} ({len(ts)} runs: "
                + ", ".join(f"{t:.2f}" for t in ts)
                + ")"
            )


if __name__ == "__main__":
    main()
