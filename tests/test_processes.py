"""Processes and writes that cannot lose or mix data: Ctrl-C, SIGTERM and kill -9 of
``generate --jobs 2`` leave no worker running and no partial file; an output folder
is written as a unit; a second writer of the same output is refused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.io import write

from ase_gearsh.core.io import OutputBusyError, OutputLock, OutputPathError, output_folder


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_generate_jobs_interrupted_leaves_no_workers_and_no_partial_files(tmp_path, sig):
    images = []
    for seed in range(6):
        a = molecule("H2O")
        a.rattle(0.05, seed=seed)
        images.append(a)
    src = tmp_path / "water.extxyz"
    write(src, images)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "gpaw_tools.generate", str(src), "-o", str(runs)]
    cmd += ["--jobs", "2", "--h", "0.2", "--vacuum", "4", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the workers have started GPAW when its first log file appears
        _wait(lambda: list(runs.glob("*.txt")) or proc.poll() is not None, 300, "a GPAW run")
        assert proc.poll() is None, proc.communicate()
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # two pool workers (and the resource tracker)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait(lambda: not any(_alive(p) for p in workers), 60, f"workers {workers} to exit")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, err
        assert "interrupted" in err and "Traceback" not in err, err
    # nothing partial: no temporary files, no error files for interrupted runs
    assert not list(runs.glob(".*.part")), list(runs.iterdir())
    assert not list(runs.glob("*.error")), list(runs.iterdir())
    assert not list(tmp_path.glob(".*.lock")) or sig == signal.SIGKILL
    from gpaw_tools.gpw import read_parameters

    for gpw in runs.glob("*.gpw"):  # every finished run is complete
        assert read_parameters(gpw)


# -- output folders written as a unit -----------------------------------------------
def test_output_folder_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary, no lock
    with output_folder(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folder_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="already exists.*--overwrite"):
        with output_folder(out):
            pass
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old folder
        with output_folder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with output_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_folder_on_or_under_a_file(tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    out = blocker if where == "file" else blocker / "sub" / "out"
    with pytest.raises(OutputPathError, match="a file; expected a folder"):
        with output_folder(out):
            pass
    assert blocker.read_text() == "keep"


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; from ase_gearsh.core.io import OutputLock; "
        f"lock = OutputLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            OutputBusyError, match=f"being written by another process \\(pid {holder.pid}"
        ):
            with output_folder(out):
                pass
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with the process: a stale lock file does not block
    with OutputLock(out):
        pass
    with output_folder(out) as tmp:
        (tmp / "x").write_text("x")
    assert (out / "x").exists()


def test_lock_is_released_and_its_file_removed(tmp_path):
    lock = OutputLock(tmp_path / "out")
    with lock:
        assert lock.path.exists()
        assert lock.path.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusyError):  # even within one process (another file handle)
            OutputLock(tmp_path / "out").acquire()
    assert not lock.path.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_extract_jobs_killed_then_resumed(water_dataset, gpw_dir, tmp_path):
    """kill -9 of `extract --jobs 2` mid-way: the workers exit, every entry written is
    complete, and the same command finishes the rest; the result equals a
    one-process extraction."""
    import shutil

    from ase_gearsh.core.data import check_dataset
    from ase_gearsh.core.schema import read_structure
    from gpaw_tools.extract import main as extract_main

    src = tmp_path / "in"
    src.mkdir()
    files = []
    for copy in range(3):  # 12 distinct file names (copies of the 4 water runs)
        for f in sorted(gpw_dir.glob("water*.gpw")):
            files.append(src / f"{f.stem}_{copy}.gpw")
            shutil.copy(f, files[-1])
    ds = tmp_path / "ds"
    args = [*map(str, files), "-o", str(ds), "--jobs", "2", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpaw_tools.extract", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait(lambda: list(ds.glob("*.npz")) or proc.poll() is not None, 300, "an entry")
        workers = _children(proc.pid)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait(lambda: not any(_alive(p) for p in workers), 60, f"workers {workers} to exit")
    first = sorted(p.name for p in ds.glob("*.npz"))
    assert 1 <= len(first) < len(files), first  # killed mid-way
    assert not list(ds.glob(".*.part"))
    assert extract_main(args) == 0  # resume
    good, problems = check_dataset(ds)
    assert good + len(problems) == len(files)
    assert all("duplicate" in what for _, what in problems), problems  # copies share a hash
    serial = tmp_path / "serial"
    assert extract_main([str(files[5]), "-o", str(serial), "-q"]) == 0
    a, _ = read_structure(ds / files[5].with_suffix(".npz").name)
    b, _ = read_structure(serial / files[5].with_suffix(".npz").name)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    from ase_gearsh.core.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with output_folder(tmp_path / "out") as tmp:
            (tmp / "b.txt").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def _submit_in_child():
    from ase_gearsh.core.processes import worker_thread

    return worker_thread("gearsh-test").submit(lambda: 2).result(timeout=10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_worker_thread_runs_in_a_forked_child():
    """The calculator's worker threads (S alongside the network, H's layout) also work
    in a child forked after the parent used them; an executor inherited from the parent
    would wait for a thread that does not exist there."""
    import multiprocessing

    from ase_gearsh.core.processes import worker_thread

    assert worker_thread("gearsh-test").submit(lambda: 1).result() == 1  # thread started
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_submit_in_child).get(timeout=30) == 2
