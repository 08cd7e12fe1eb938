"""Bad input: clear messages, non-zero exit, nothing partial left behind."""

import shutil

import numpy as np
import pytest

from ase_gearsh.core import schema
from gpaw_tools.extract import extract, extract_files, main
from gpaw_tools.gpw import GPWError, read_parameters


def _no_partial(folder):
    return not [p for p in folder.iterdir() if p.suffix in (".npz", ".part")]


def test_missing_file(tmp_path):
    with pytest.raises(GPWError, match="no such file"):
        extract(tmp_path / "nope.gpw")


def test_not_a_gpw(tmp_path):
    p = tmp_path / "notes.gpw"
    p.write_text("hello")
    with pytest.raises(GPWError, match="not a GPAW restart file"):
        read_parameters(p)


def test_plane_wave_file(pw_gpw):
    with pytest.raises(GPWError, match="mode 'pw': expected an LCAO run"):
        extract(pw_gpw)


def test_finite_difference_file(fd_gpw):
    with pytest.raises(GPWError, match="mode 'fd': expected an LCAO run"):
        extract(fd_gpw)


def test_truncated_file(h2o_gpw, tmp_path):
    p = tmp_path / "cut.gpw"
    data = h2o_gpw.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(GPWError, match="truncated"):
        extract(p)


def test_batch_isolates_failures(h2o_gpw, pw_gpw, tmp_path, capsys):
    bad = tmp_path / "bad.gpw"
    bad.write_text("junk")
    out = tmp_path / "ds"
    code = main(
        [str(bad), str(h2o_gpw), str(pw_gpw), str(tmp_path / "missing.gpw"), "-o", str(out), "-q"]
    )
    assert code == 1
    err = capsys.readouterr()
    assert "1 extracted" in err.out and "3 failed" in err.out
    assert [p.name for p in out.glob("*.npz")] == ["h2o.npz"]
    assert not list(out.glob("*.part")) and not list(out.glob(".*"))
    # a re-run skips what is done (resumable)
    code = main([str(h2o_gpw), "-o", str(out), "-q"])
    assert code == 0
    assert "1 already present" in capsys.readouterr().out


def test_unwritable_output(h2o_gpw, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(h2o_gpw), "-o", str(blocker / "ds"), "-q"]) == 2
    assert "cannot create dataset directory" in capsys.readouterr().err


def test_failed_write_leaves_nothing(h2o_gpw, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    written, _, failed = extract_files([h2o_gpw], tmp_path, progress=False)
    assert not written and "disk full" in failed[0][1]
    assert _no_partial(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [schema.MANIFEST]


def test_same_stem_different_source(h2o_gpw, classic_h2o_gpw, tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    shutil.copy(classic_h2o_gpw, d / "h2o.gpw")
    written, _, failed = extract_files([h2o_gpw, d / "h2o.gpw"], tmp_path / "ds", progress=False)
    assert not failed and len(written) == 2
    assert written[0].name == "h2o.npz" and written[1].name.startswith("h2o-")


def test_truncated_entry_is_named_and_repaired(h2o_gpw, tmp_path, capsys):
    from ase_gearsh.core.data import check_dataset

    out = tmp_path / "ds"
    assert main([str(h2o_gpw), "-o", str(out), "-q"]) == 0
    entry = out / "h2o.npz"
    entry.write_bytes(entry.read_bytes()[:1000])
    good, problems = check_dataset(out)
    assert good == 0 and problems[0][0] == "h2o.npz" and "cannot read" in problems[0][1]
    # a re-run replaces the damaged entry (so does --overwrite)
    assert main([str(h2o_gpw), "-o", str(out), "-q"]) == 0
    assert "1 extracted" in capsys.readouterr().out
    assert check_dataset(out) == (1, [])
    assert main([str(h2o_gpw), "-o", str(out), "-q", "--overwrite"]) == 0
    assert check_dataset(out) == (1, [])


def test_concurrent_writer_of_the_same_name_is_not_overwritten(
    h2o_gpw, classic_h2o_gpw, tmp_path, monkeypatch
):
    """Two extractions of different files with one stem, racing: the file the other
    process wrote between our choice of a name and our write is kept; ours gets the
    hashed name."""
    from gpaw_tools import extract as ex

    out = tmp_path / "ds"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(classic_h2o_gpw, other / "h2o.gpw")
    real_extract = ex.extract

    def racing_extract(path, **kwargs):
        result = real_extract(path, **kwargs)
        # meanwhile "another process" extracted the other h2o.gpw into h2o.npz
        arrays, meta = real_extract(other / "h2o.gpw", sha256="f" * 64)
        schema.write_structure(out / "h2o.npz", arrays, meta)
        return result

    monkeypatch.setattr(ex, "extract", racing_extract)
    written, _, failed = extract_files([h2o_gpw], out, progress=False)
    assert not failed and written[0].name.startswith("h2o-")
    _, meta = schema.read_structure(out / "h2o.npz")
    assert meta["source"]["sha256"] == "f" * 64  # the other process's entry is intact
    _, ours = schema.read_structure(written[0])
    assert ours["source"]["sha256"] != "f" * 64
