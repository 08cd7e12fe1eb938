"""Committees (``gearsh committee``): the mean of the members' blocks, through the one
forward path, equivariant and exactly symmetric, with the members' spread."""

import json

import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ase_gearsh.cli import main
from ase_gearsh.core.data import Dataset
from ase_gearsh.model.checkpoint import CheckpointError, save_checkpoint
from ase_gearsh.model.committee import build_committee
from ase_gearsh.model.engine import Model
from ase_gearsh.model.inference import Predictor
from ase_gearsh.testing import check_block_equivariance, forward_blocks, predicted_blocks

TOL = 1e-4  # eV, as in test_forward: float32 sums in a different order


def _save(model, params, path, seed, settings=None, basis=None):
    save_checkpoint(
        path,
        config=dict(model.config, training={"seed": seed}),
        settings=settings or model.settings,
        registry=model.registry.to_dict(),
        stats={k: np.asarray(v) for k, v in model.stats.items()},
        params=jax.device_get(params),
        extra={"train_names": ["a", "b"]},
        basis=basis,
    )
    return path


@pytest.fixture(scope="module")
def files(small_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("committee")
    a = _save(small_model, small_model.init_params(11), d / "a.ckpt", 11)
    b = _save(small_model, small_model.init_params(12), d / "b.ckpt", 12)
    ab = build_committee([a, b], d / "ab.ckpt")
    return d, a, b, ab


def _load(path):
    return Model.from_checkpoint(path)


@pytest.mark.parametrize("system", ["molecule", "periodic"])
def test_committee_predicts_the_members_mean(files, water_dataset, chain_dataset, system):
    _, a, b, ab = files
    atoms = Dataset(water_dataset if system == "molecule" else chain_dataset)[0].atoms
    ma, mb, mab = _load(a), _load(b), _load(ab)
    assert len(mab.members) == 2 and len(ma.members) == 1
    Ha, Hb, Hab = (Predictor(m, pair_chunk=2)(atoms) for m in (ma, mb, mab))
    assert np.abs(Ha.pairs - Hb.pairs).max() > 0.01  # the members differ
    assert np.abs(Hab.onsite - (Ha.onsite + Hb.onsite) / 2).max() < TOL
    assert np.abs(Hab.pairs - (Ha.pairs + Hb.pairs) / 2).max() < TOL
    # the spread over the stored elements (GPAW order: no padding slots)
    dev = np.concatenate([Ha.onsite - Hb.onsite, Ha.pairs - Hb.pairs])
    assert Hab.committee_spread == pytest.approx(np.abs(dev).mean() / 2, rel=1e-4)
    assert Ha.committee_spread is None
    # the training path (one padded batch per member) gives the same mean
    g = mab.graph(atoms)
    ref_on, ref_pr = forward_blocks(mab, g)
    on, pr = predicted_blocks(mab, g, edge_chunk=4, pair_chunk=2)
    assert np.abs(on - ref_on).max() < TOL and np.abs(pr - ref_pr).max() < TOL
    k = [0, 0, 0.3] if system == "periodic" else None
    H = Hab.matrix(k, sparse=False)
    assert np.abs(H - H.conj().T).max() < 1e-12  # Hermitian: H_ji = H_ij^T exactly


def test_committee_is_equivariant(files, water_dataset):
    mab = _load(files[3])
    atoms = Dataset(water_dataset)[0].atoms
    rot = Rotation.random(random_state=5).as_matrix()
    for inversion in (False, True):
        d_on, d_pr = check_block_equivariance(mab, atoms, rot, inversion=inversion)
        assert d_on < 2e-4 and d_pr < 2e-4


def test_nested_committee_flattens_and_keeps_the_first_file(files, water_dataset):
    d, a, b, ab = files
    aba = build_committee([ab, a], d / "aba.ckpt")
    m = _load(aba)
    assert len(m.members) == 3
    assert [s["seed"] for s in m.extra["committee"]] == [11, 12, 11]
    assert m.extra["train_names"] == ["a", "b"]  # the first file's record is kept
    atoms = Dataset(water_dataset)[1].atoms
    Ha, Hb, H = (Predictor(x)(atoms) for x in (_load(a), _load(b), m))
    assert np.abs(H.pairs - (2 * Ha.pairs + Hb.pairs) / 3).max() < TOL


def test_committee_refuses_other_networks_and_bad_arguments(files, small_model, tmp_path):
    d, a, b, _ = files
    other = dict(small_model.settings, num_tensordense_features=4)
    c = _save(small_model, small_model.init_params(1), tmp_path / "c.ckpt", 1, other)
    with pytest.raises(CheckpointError, match="settings differ.*num_tensordense_features"):
        build_committee([a, c], tmp_path / "ac.ckpt")
    assert not (tmp_path / "ac.ckpt").exists()  # nothing written
    with pytest.raises(CheckpointError, match="two or more"):
        build_committee([a], tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="directory"):
        build_committee([a, b], tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        build_committee([a, tmp_path / "junk.ckpt"], tmp_path / "y.ckpt")


def test_committee_command(files, tmp_path, capsys):
    _, a, b, _ = files
    out = tmp_path / "cli.ckpt"
    assert main(["committee", str(a), str(b), "-o", str(out)]) == 0
    assert "2 members" in capsys.readouterr().out
    assert len(_load(out).members) == 2
    assert main(["committee", str(a), str(tmp_path / "missing.ckpt"), "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_calculator_and_eval_report_the_spread(files, water_dataset):
    from ase_gearsh.calculator import GearsHCalculator
    from ase_gearsh.training.evaluate import evaluate

    _, a, b, ab = files
    atoms = Dataset(water_dataset)[2].atoms
    H = {}
    for path in (a, b, ab):
        calc = GearsHCalculator(str(path), warn_extrapolation=False)
        H[path] = calc.get_property("hamiltonian", atoms).toarray()
        spread = calc.get_property("committee_spread", atoms)
        assert (spread is None) == (path != ab)
    assert np.abs(H[ab] - (H[a] + H[b]) / 2).max() < TOL
    assert spread > 1e-3  # eV: the random members disagree
    s = evaluate(ab, water_dataset, limit=4, progress=False)
    assert s["committee_members"] == 2
    per = [r["committee_spread_meV"] for r in s["per_structure"]]
    assert (
        len(per) == 4 and min(per) > 1 and s["committee_spread_meV"] == pytest.approx(np.mean(per))
    )
    assert -1 <= s["committee_spread_spearman"] <= 1
    assert "committee_spread_meV" not in evaluate(a, water_dataset, limit=2, progress=False)


def test_predict_command_reports_the_spread(small_model, water_dataset, tmp_path, capsys):
    from ase.io import write

    from gpaw_tools.overlap import basis_for_registry

    basis = {k: v.to_dict() for k, v in basis_for_registry(small_model.registry, "PBE").items()}
    a = _save(small_model, small_model.init_params(21), tmp_path / "a.ckpt", 21, basis=basis)
    b = _save(small_model, small_model.init_params(22), tmp_path / "b.ckpt", 22, basis=basis)
    ab = build_committee([a, b], tmp_path / "ab.ckpt")
    write(tmp_path / "w.xyz", Dataset(water_dataset)[0].atoms)
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "w.xyz"), "-m", str(ab), "-o", str(out), "-q"]
    assert main(args) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["committee_spread_meV"] > 1.0
    assert "committee of 2 models" in capsys.readouterr().out
