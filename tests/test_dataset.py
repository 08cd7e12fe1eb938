"""Dataset schema and reader: validation, no code execution, deterministic order."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ase_gearsh.core.data import Dataset, assemble
from ase_gearsh.core.schema import SchemaError, ensure_manifest, read_structure, write_structure
from gpaw_tools.extract import extract


@pytest.fixture(scope="module")
def h2o_record(h2o_gpw):
    return extract(h2o_gpw)


def test_round_trip_and_order(h2o_record, tmp_path):
    arrays, meta = h2o_record
    ensure_manifest(tmp_path)
    for name in ("b", "a", "c"):
        write_structure(tmp_path / f"{name}.npz", arrays, meta)
    ds = Dataset(tmp_path)
    assert ds.names == ["a", "b", "c"]
    a2, m2 = read_structure(tmp_path / "a.npz")
    for k in arrays:
        np.testing.assert_array_equal(a2[k], arrays[k])
    assert m2["fermi_level"] == meta["fermi_level"]
    assert m2["units"]["energy"] == "eV"
    with pytest.raises(IndexError, match="out of range: the dataset has 3"):
        ds[3]


def test_schema_version_is_checked(h2o_record, tmp_path):
    arrays, meta = h2o_record
    ensure_manifest(tmp_path)
    write_structure(tmp_path / "x.npz", arrays, meta)
    with np.load(tmp_path / "x.npz") as f:
        payload = {k: f[k] for k in f.files}
    m = json.loads(str(payload["meta"]))
    m["schema_version"] = 99
    payload["meta"] = np.array(json.dumps(m))
    np.savez(tmp_path / "x.npz", **payload)
    with pytest.raises(SchemaError, match="schema version 99 is not supported"):
        Dataset(tmp_path)[0]


def test_pickled_content_is_refused(tmp_path):
    ensure_manifest(tmp_path)
    np.savez(tmp_path / "evil.npz", meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SchemaError, match="cannot read dataset file"):
        Dataset(tmp_path)[0]


def test_bad_shapes_are_named(h2o_record, tmp_path):
    arrays, meta = h2o_record
    bad = dict(arrays, pair_S=arrays["pair_S"][:-1])
    with pytest.raises(SchemaError, match="'pair_S' has shape"):
        write_structure(tmp_path / "x.npz", bad, meta)
    assert not (tmp_path / "x.npz").exists()


def test_not_a_dataset(tmp_path):
    with pytest.raises(SchemaError, match="dataset.json is missing"):
        Dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Dataset(tmp_path / "nowhere")


def test_assemble_is_hermitian_with_phases():
    rng = np.random.default_rng(0)
    counts = np.array([2, 3])
    onsite = np.concatenate(
        [(lambda m: (m + m.T).ravel())(rng.normal(size=(n, n))) for n in counts]
    )
    ij = np.array([[0, 1], [0, 0], [0, 1]])
    shift = np.array([[0, 0, 0], [0, 0, 1], [0, 0, -1]])
    blocks = rng.normal(size=6 + 4 + 6)
    Hk = assemble(counts, onsite, ij, shift, blocks, kpt=[0, 0, 0.3])
    np.testing.assert_allclose(Hk, Hk.conj().T, atol=1e-14)
    H0 = assemble(counts, onsite, ij, shift, blocks)
    assert H0.dtype == np.float64
    np.testing.assert_allclose(H0, H0.T)
    # Gamma equals the sum over images
    np.testing.assert_allclose(
        assemble(counts, onsite, ij, shift, blocks, kpt=[0, 0, 1]), H0, atol=1e-12
    )
    with pytest.raises(ValueError, match="pair-block values"):
        assemble(counts, onsite, ij, shift, blocks[:-1])


def test_reader_imports_no_jax_or_gpaw():
    code = (
        "import sys, ase_gearsh, ase_gearsh.core.data, gpaw_tools.interactions;"
        "print('jax' in sys.modules, 'gpaw' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]
