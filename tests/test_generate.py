"""gpaw_tools.generate: runs, resumes, isolates failures, user basis files."""

import gzip
import os
from pathlib import Path

import pytest
from ase.build import molecule
from ase.io import write

from ase_gearsh.core.data import Dataset
from ase_gearsh.core.processes import environment
from gpaw_tools import generate
from gpaw_tools.generate import main


def _inputs(tmp_path):
    good = molecule("H2")
    bad = molecule("H2")
    bad.positions[1] = bad.positions[0]  # atoms on top of each other: GPAW refuses
    path = tmp_path / "mols.extxyz"
    write(path, [good, bad])
    return path


def test_generate_resume_and_failures(tmp_path, capsys):
    src = _inputs(tmp_path)
    runs, ds = tmp_path / "runs", tmp_path / "ds"
    args = [str(src), "-o", str(runs), "--h", "0.3", "--vacuum", "3", "-q", "--extract", str(ds)]
    assert main(args) == 1
    out = capsys.readouterr()
    assert "1 run, 0 already done, 1 failed" in out.out
    assert "mols-00001" in out.err and "AtomsTooClose" in out.err
    assert (runs / "mols-00000.gpw").is_file() and (runs / "mols-00000.txt").is_file()
    assert "AtomsTooClose" in (runs / "mols-00001.error").read_text()
    assert not list(runs.glob("*.part")) and not list(runs.glob(".*"))
    assert len(Dataset(ds)) == 1
    # a re-run skips the finished structure and retries the failed one
    assert main(args) == 1
    assert "0 run, 1 already done, 1 failed" in capsys.readouterr().out


def test_user_basis_file(tmp_path):
    """A basis file in --basis-dir, selected per element (here a renamed copy of
    GPAW's H dzp basis)."""
    import gpaw_data

    data = gzip.open(Path(gpaw_data.__file__).parent / "setups" / "H.dzp.basis.gz").read()
    mine = tmp_path / "mybasis"
    mine.mkdir()
    (mine / "H.mine.dzp.basis").write_bytes(data)
    write(tmp_path / "h2.xyz", molecule("H2"))
    runs, ds = tmp_path / "runs", tmp_path / "ds"
    from gpaw import setup_paths

    before = list(setup_paths)
    assert (
        main(
            [
                str(tmp_path / "h2.xyz"),
                "-o",
                str(runs),
                "--h",
                "0.3",
                "--vacuum",
                "3",
                "-q",
                "--basis-dir",
                str(mine),
                "--element-basis",
                "H=mine.dzp",
                "--extract",
                str(ds),
            ]
        )
        == 0
    )
    s = Dataset(ds)[0]
    assert s.basis["H"]["name"] == "mine.dzp"
    assert s.basis["H"]["l"] == [0, 0, 1]  # full dzp, not the default szp(dzp)
    assert "mine.dzp" in (runs / "h2-00000.txt").read_text()
    assert setup_paths == before  # the basis folder was added for the run only


def test_bad_arguments(tmp_path, capsys):
    assert main([str(tmp_path / "none.xyz"), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "python -m gpaw_tools.generate: error:" in err and "does not exist" in err


def test_worker_environment_is_restored(monkeypatch):
    """Thread variables for parallel runs are set for the worker processes only."""
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = dict(os.environ)
    with environment(generate.WORKER_THREADS):
        assert os.environ["MKL_NUM_THREADS"] == "1"
        assert os.environ["OMP_NUM_THREADS"] == "3"  # the user's choice is kept
    assert dict(os.environ) == before


def test_extraction_in_the_worker_equals_extraction_from_the_file(tmp_path, capsys):
    """--extract extracts each run from the live calculator (no GPAW restart); the
    entry equals what extracting the .gpw gives; --discard-gpw keeps only the
    dataset and a re-run counts the structure as done."""
    from ase_gearsh.core.schema import read_structure
    from gpaw_tools.extract import extract_files

    src = tmp_path / "h2.extxyz"
    write(src, molecule("H2"))
    runs, ds, again = tmp_path / "runs", tmp_path / "ds", tmp_path / "again"
    common = ["--h", "0.3", "--vacuum", "3", "-q"]
    assert main([str(src), "-o", str(runs), "--extract", str(ds), *common]) == 0
    assert "1 extracted after their run" in capsys.readouterr().out
    live, meta_live = read_structure(ds / "h2-00000.npz")
    extract_files([runs / "h2-00000.gpw"], again, progress=False)
    restart, meta_file = read_structure(again / "h2-00000.npz")
    assert meta_live["source"]["sha256"] == meta_file["source"]["sha256"]
    for key in ("onsite_H", "pair_H", "onsite_S", "pair_S", "eigenvalues"):
        assert live[key].shape == restart[key].shape
        assert abs(live[key] - restart[key]).max() < 1e-4, key  # restart re-solves V[n]
    assert meta_live["checks"]["max_eigenvalue_error"] < 1e-3
    # without the .gpw: only the dataset entry is left, and a re-run skips it
    runs2, ds2 = tmp_path / "runs2", tmp_path / "ds2"
    args = [str(src), "-o", str(runs2), "--extract", str(ds2), "--discard-gpw", *common]
    assert main(args) == 0
    assert not list(runs2.glob("*.gpw")) and (ds2 / "h2-00000.npz").is_file()
    capsys.readouterr()
    assert main(args) == 0
    assert "0 run, 1 already done" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main([str(src), "-o", str(runs2), "--discard-gpw", *common])
    assert stop.value.code == 2
    assert "--discard-gpw needs --extract" in capsys.readouterr().err


def test_an_interrupt_seen_as_another_error_writes_no_error_file(tmp_path, monkeypatch):
    """SIGTERM raised while an extension module initialises surfaces as ImportError: a
    worker that was told to stop must not record that as a failed run."""
    import signal

    from ase_gearsh.core import processes

    bad = molecule("H2")
    bad.positions[1] = bad.positions[0]  # GPAW refuses: an ordinary failure
    settings = generate.RunSettings(h=0.3, vacuum=3.0)
    with pytest.raises(Exception, match="AtomsTooClose|too close"):
        generate.run_structure(bad, "failed", tmp_path, settings)
    assert (tmp_path / "failed.error").is_file()  # a real failure is recorded
    monkeypatch.setattr(processes, "_INTERRUPTED", processes.threading.Event())
    with pytest.raises(SystemExit):  # the worker's SIGTERM handler
        processes._exit_on_sigterm(signal.SIGTERM, None)
    assert processes.interrupted()
    with pytest.raises(Exception, match="AtomsTooClose|too close"):
        generate.run_structure(bad, "interrupted", tmp_path, settings)
    assert not (tmp_path / "interrupted.error").exists()
