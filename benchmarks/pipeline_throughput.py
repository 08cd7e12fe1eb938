"""Data pipeline throughput and disk use: structures per minute from structure file to
dataset, the old way against the new, on molecules and on k-sampled h-BN.

    python benchmarks/pipeline_throughput.py WORK_DIR [--molecules 8] [--hbn 4] [--jobs 2]

For each case, three pipelines on the same structures (fresh folders each):

* ``sequential``: ``generate --jobs 1``, then ``extract`` of every .gpw (one process:
  the pipeline before ``extract --jobs`` and extraction in the worker);
* ``parallel extract``: ``generate --jobs N``, then ``extract --jobs N`` (GPAW restart
  from each .gpw);
* ``in-worker``: ``generate --jobs N --extract DS --discard-gpw`` (each run extracted
  from its live calculator; the .gpw removed once its entry is written).

Prints structures/min of each and the disk use per structure (.gpw, dataset entry).
Molecules: rattled snapshots of ``ase_gearsh.samples`` (szp(dzp), PBE, h = 0.2 A,
Gamma); h-BN: the 2x2 cells of ``make_hbn.py`` on a 5x5x1 grid.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ase.io import write

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_hbn import cells  # noqa: E402

from ase_gearsh.samples import molecule_snapshots  # noqa: E402


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *cmd, "-q"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def size_per(folder: Path, pattern: str) -> float:
    files = list(folder.glob(pattern))
    return sum(f.stat().st_size for f in files) / max(len(files), 1) / 1e6


def case(name: str, xyz: Path, n: int, work: Path, jobs: int, extra: list[str]) -> None:
    root = work / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    gen = ["gpaw_tools.generate", str(xyz), *extra]
    rows = []
    # 1. sequential: runs, then extraction by restart from each .gpw
    t = run([*gen, "-o", str(root / "seq_runs"), "--jobs", "1"])
    gpws = sorted(map(str, (root / "seq_runs").glob("*.gpw")))
    t += run(["gpaw_tools.extract", *gpws, "-o", str(root / "seq_ds"), "--jobs", "1"])
    rows.append(("sequential (generate, then extract)", t))
    gpw_mb = size_per(root / "seq_runs", "*.gpw")
    npz_mb = size_per(root / "seq_ds", "*.npz")
    # 2. parallel runs and parallel extraction
    t = run([*gen, "-o", str(root / "par_runs"), "--jobs", str(jobs)])
    gpws = sorted(map(str, (root / "par_runs").glob("*.gpw")))
    t += run(["gpaw_tools.extract", *gpws, "-o", str(root / "par_ds"), "--jobs", str(jobs)])
    rows.append((f"generate --jobs {jobs}, then extract --jobs {jobs}", t))
    # 3. extraction in the worker, .gpw discarded
    t = run(
        [*gen, "-o", str(root / "inw_runs"), "--jobs", str(jobs)]
        + ["--extract", str(root / "inw_ds"), "--discard-gpw"]
    )
    rows.append((f"generate --jobs {jobs} --extract --discard-gpw", t))
    left = sum(f.stat().st_size for f in (root / "inw_runs").glob("*")) / n / 1e6
    print(f"\n{name}: {n} structures")
    for label, seconds in rows:
        print(f"  {label:48s} {seconds:7.1f} s  {60 * n / seconds:6.1f} structures/min")
    print(
        f"  disk per structure: .gpw {gpw_mb:.2f} MB, dataset entry {npz_mb:.3f} MB; "
        f"with --discard-gpw {left:.3f} MB of logs left in the runs folder"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--molecules", type=int, default=8, help="molecule snapshots (8)")
    p.add_argument("--hbn", type=int, default=4, help="h-BN cells (4)")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.molecules:
        per = max(1, a.molecules // 10 + 1)
        mols = molecule_snapshots(per, 0.05, 0)[: a.molecules]
        write(a.work / "molecules.extxyz", mols)
        case("molecules", a.work / "molecules.extxyz", len(mols), a.work, a.jobs, [])
    if a.hbn:
        write(a.work / "hbn.extxyz", cells(a.hbn, seed=0))
        case(
            "h-BN 2x2, 5x5x1 k",
            a.work / "hbn.extxyz",
            a.hbn,
            a.work,
            a.jobs,
            ["--kpts", "5", "5", "1"],
        )


if __name__ == "__main__":
    main()
