"""keep_freed_memory: glibc keeps freed memory for reuse (opt-in, process-wide), so it
is tested in fresh processes."""

import subprocess
import sys

import pytest

CODE = """
import os, sys
import numpy as np
from ase_gearsh.core.memory import KEEP_FREED_ENV, keep_freed_memory

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "keep":
    if not keep_freed_memory(children=True):
        print("unsupported")
        sys.exit(0)
    assert all(os.environ[k] == v for k, v in KEEP_FREED_ENV.items())  # for workers
a = np.ones(2**25)  # 256 MiB, above glibc's mmap threshold
before = resident()
del a
print(before - resident())
"""


def _freed(mode: str):
    """MiB the fresh process gives back after freeing 256 MiB (None: not glibc)."""
    import os

    from ase_gearsh.core.memory import KEEP_FREED_ENV

    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_ENV}  # glibc defaults
    out = subprocess.run(
        [sys.executable, "-c", CODE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()[-1]
    return None if out == "unsupported" else int(out) / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")
def test_freed_memory_is_kept_only_when_asked():
    kept = _freed("keep")
    if kept is None:
        pytest.skip("the C library is not glibc")
    default = _freed("default")
    assert default > 200  # MiB given back to the system at once by default
    assert kept < 32  # kept in the heap for the next structure


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")
def test_predict_command_with_kept_memory_gives_the_same_h(tmp_path):
    """``gearsh predict --keep-freed-memory`` (its own process) writes the H that the
    calculator gives in this one."""
    from pathlib import Path

    import scipy.sparse as sp
    from ase.build import molecule
    from ase.io import read, write

    from ase_gearsh import GearsHCalculator

    ckpt = Path(__file__).resolve().parents[1] / "models" / "molecules.ckpt"
    a = molecule("CH3CH2OH")
    a.center(vacuum=3.0)
    write(tmp_path / "ethanol.xyz", a)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ase_gearsh", "predict", str(tmp_path / "ethanol.xyz")]
    cmd += ["-m", str(ckpt), "-o", str(out), "-q", "--keep-freed-memory"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ignored" not in run.stderr
    H = sp.load_npz(out / "hamiltonian.npz")
    a = read(tmp_path / "ethanol.xyz")
    a.calc = GearsHCalculator(str(ckpt), warn_extrapolation=False)
    assert abs(H - a.calc.get_hamiltonian()).max() < 2e-5  # float32 network
