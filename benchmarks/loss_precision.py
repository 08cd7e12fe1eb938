"""Does float64 accumulation of the training loss matter?  (accuracy issue, item 3d)

    python benchmarks/loss_precision.py MODEL.ckpt DATASET [--validation-only] [--limit N]

Training keeps labels, predictions, errors and the loss sums in float32
(``ase_gearsh.training.train._sums``).  For every structure this script takes the
model's predicted blocks (the prediction path users run) and the dataset's float64
labels, and computes the on-site and pair sums of squared errors twice:

* float32 as in training: labels rounded to float32, errors and sums in float32
  (``jnp.sum``, the reduction the training step uses);
* float64: the same predictions, float64 labels, errors and sums in float64.

It prints the rounding of the labels, the relative change of the MSE terms (the
loss) and of the error vector itself (the gradient of an MSE with respect to the
predictions is proportional to the error, so this is the relative change of that
gradient), per structure at the worst and over all structures.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from ase_gearsh.core.data import Dataset
from ase_gearsh.model.engine import enable_compilation_cache, load_model
from ase_gearsh.model.inference import predictor_for
from ase_gearsh.training.evaluate import predict_structure_blocks


def _sums32(pred, ref):
    e = jnp.asarray(pred, jnp.float32) - jnp.asarray(ref, jnp.float32)
    return float((e * e).sum()), np.asarray(e, np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("--validation-only", action="store_true")
    p.add_argument("--limit", type=int, help="only the first N structures")
    args = p.parse_args(argv)
    enable_compilation_cache()
    model = load_model(args.model)
    predictor = predictor_for(model)
    names = set(model.extra.get("valid_names") or []) if args.validation_only else None
    rel_loss, rel_err, rounding, mae = [], [], [], []
    for s in Dataset(args.dataset):
        if names is not None and s.meta["source"]["name"] not in names:
            continue
        if args.limit is not None and len(mae) >= args.limit:
            break
        on, pr = predict_structure_blocks(predictor, s)
        on = on.astype(np.float32).astype(np.float64)  # the network's float32 output
        pr = pr.astype(np.float32).astype(np.float64)
        a = s.arrays
        for pred, ref in ((on, a["onsite_H"][0]), (pr, a["pair_H"][0])):
            if not ref.size:
                continue
            sq32, e32 = _sums32(pred, ref)
            e64 = pred - ref
            sq64 = float(e64 @ e64)
            rel_loss.append(abs(sq32 - sq64) / sq64)
            rel_err.append(np.linalg.norm(e32 - e64) / np.linalg.norm(e64))
            rounding.append(np.abs(ref.astype(np.float32).astype(np.float64) - ref).max())
            mae.append(np.abs(e64).mean())
    if not mae:
        print("no structures selected", file=sys.stderr)
        return 2
    rel_loss, rel_err = np.array(rel_loss), np.array(rel_err)
    print(f"{args.model} on {args.dataset}: {len(mae) // 2} structures (on-site and pair terms)")
    print(f"  H MAE of the model (mean over terms)          {1e3 * np.mean(mae):10.3f} meV")
    print(f"  largest rounding of a label to float32        {1e3 * max(rounding):10.3e} meV")
    print(
        f"  relative change of a sum of squared errors    median {np.median(rel_loss):.2e}, "
        f"largest {rel_loss.max():.2e}"
    )
    print(
        f"  relative change of the error vector (grad)    median {np.median(rel_err):.2e}, "
        f"largest {rel_err.max():.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
