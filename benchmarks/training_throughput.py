"""Training throughput, compilations and the parameter count of the paper's configuration.

    python benchmarks/training_throughput.py [DATASET] [--config benchmarks/molecules.yaml]
                                             [--epochs 3]

Prints: parameters of the paper's WSe2-like model (listings 2-4 with the W and Se
szp(dzp) basis sets; the paper reports 82,909), then for a short training run on
DATASET the number of XLA compilations and their total time, the time of the
first epoch (compilation included) and the steady-state structures per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent


def paper_parameter_count(evaluation: str = "both_orientations") -> int:
    from ase_gearsh.core.basis import Registry
    from ase_gearsh.model.engine import Model
    from ase_gearsh.model.layout import Layout
    from ase_gearsh.model.network import count_parameters
    from ase_gearsh.training.config import check_config, model_settings

    # l of the szp(dzp) radial functions in GPAW's basis order
    reg = Registry.from_basis(
        {
            "W": {"l": [0, 0, 1, 1, 2, 1], "rc": 6.84, "name": "szp(dzp)"},
            "Se": {"l": [0, 1, 2], "rc": 3.84, "name": "szp(dzp)"},
        }
    )
    lay = Layout(reg)
    cfg = check_config(
        {
            "data": {"train_data_path": "unused"},
            "model": {"bond_centered": {"evaluation": evaluation}},
        }
    )
    model = Model(
        model_settings(cfg, reg.n_species, lay.lmax_out, lay.n_features), reg, {}, None, cfg
    )
    return count_parameters(model.init_params(0)), lay


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", nargs="?", default="/work/bench/molecules/dataset")
    p.add_argument("--config", default=str(HERE / "molecules.yaml"))
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)

    n, lay = paper_parameter_count()
    n_once, _ = paper_parameter_count("once")
    print(
        f"paper WSe2-like configuration: {n:,} parameters (paper: 82,909), {n_once:,} with one "
        f"evaluation per bond; output irreps {lay.irreps_shape}, {lay.n} canonical orbitals "
        f"per atom"
    )

    import jax
    from compilations import compilation_counter

    compiles = compilation_counter()

    from ase_gearsh.model.checkpoint import load_checkpoint
    from ase_gearsh.training.train import train

    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["data"]["train_data_path"] = args.dataset
    cfg["training"] = dict(cfg.get("training", {}), n_epochs=args.epochs, max_minutes=None)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = train(cfg, output=tmp, progress=False, log=lambda *a: None)
        wall = time.perf_counter() - t0
        ck = load_checkpoint(Path(run) / "latest.ckpt")
    hist = ck["extra"]["history"]
    n_train = ck["extra"]["n_train"]
    steady = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
    print(
        f"training set: {n_train} structures, batch {cfg['data']['batch_size']}, "
        f"bond_fraction {cfg['data'].get('bond_fraction', 1.0)}"
    )
    print(f"XLA compilations: {compiles['n']} ({compiles['seconds']:.1f} s in total)")
    print(
        f"epoch 1 (with compilation): {hist[0]['seconds']:.1f} s; later epochs: "
        f"{sum(steady) / len(steady):.1f} s each"
    )
    per_epoch = sum(steady) / len(steady)
    n_steps = max(1, n_train // cfg["data"]["batch_size"])
    print(
        f"throughput: {n_train / per_epoch:.1f} structures/s, {n_steps / per_epoch:.1f} "
        f"optimiser steps/s (epoch time, validation included); whole run {wall:.1f} s for "
        f"{len(hist)} epochs"
    )
    val = [h["val_mae_all_meV"] for h in hist]
    print(f"validation H MAE per epoch (meV): {', '.join(f'{v:.1f}' for v in val)}")
    print(f"devices: {jax.devices()}")


if __name__ == "__main__":
    main()
