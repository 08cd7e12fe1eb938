"""Configuration, training, checkpoints, resume, multi-device and evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ase_gearsh.model.checkpoint import CheckpointError, load_checkpoint
from ase_gearsh.testing import forward_blocks
from ase_gearsh.training.config import ConfigError, check_config, load_config

HERE = Path(__file__).parent


def test_paper_listings_parse_as_written():
    cfg = load_config(HERE / "data" / "paper_listings.yaml")
    assert cfg["data"]["bond_fraction"] == 0.3
    assert cfg["optimizer"]["name"] == "adan"
    assert cfg["model"]["mlp"]["mlp_layer_widths"] == [32, 16, 32]
    assert cfg["loss"]["loss_parameters"]["off_diagonal_weight"] == 4.0


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"data": {"train_data_path": "x", "n_trian": 3}}, r"unknown key 'data.n_trian'"),
        (
            {"data": {"train_data_path": "x"}, "model": {"bond_centered": {"cutof": 8}}},
            r"unknown key 'model.bond_centered.cutof'.*cutoff",
        ),
        (
            {"data": {"train_data_path": "x", "batch_size": "two"}},
            r"'data.batch_size' must be int, got 'two'",
        ),
        (
            {"data": {"train_data_path": "x"}, "optimizer": {"lr": "fast"}},
            r"'optimizer.lr' must be int or float",
        ),
        (
            {"data": {"train_data_path": "x"}, "loss": {"name": "mae"}},
            r"'loss.name' must be one of",
        ),
        ({"data": {"train_data_path": "x", "energy_unit": "Ha"}}, r"'data.energy_unit'"),
        ({"data": {}}, r"'data.train_data_path' is required"),
        ({"data": {"train_data_path": "x", "bond_fraction": 1.5}}, r"bond_fraction"),
    ],
)
def test_config_errors_name_the_key(patch, message):
    with pytest.raises(ConfigError, match=message):
        check_config(patch)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_set_dotted_keys_and_are_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train_data_path: x\ntraining:\n  seed: 0\n")
    got = load_config(
        cfg,
        [
            "training.seed=3",
            "data.valid_structures=[a, b]",
            "optimizer.schedule.name=reduce_on_plateau",
        ],
    )
    assert got["training"]["seed"] == 3
    assert got["data"]["valid_structures"] == ["a", "b"]
    assert got["optimizer"]["schedule"]["name"] == "reduce_on_plateau"
    assert load_config(cfg)["training"]["seed"] == 0  # the file itself is unchanged
    with pytest.raises(ConfigError, match=r"unknown key 'training.sead'"):
        load_config(cfg, ["training.sead=1"])
    with pytest.raises(ConfigError, match=r"must look like 'section.key=value'.*'seed'"):
        load_config(cfg, ["seed"])
    with pytest.raises(ConfigError, match=r"'training.seed' is a value \(0\), not a section"):
        load_config(cfg, ["training.seed.x=1"])
    with pytest.raises(ConfigError, match=r"'training.seed' must be int, got 'one'"):
        load_config(cfg, ["training.seed=one"])
    # numbers in exponent notation are floats (PyYAML alone reads '1e-5' as a string)
    sci = tmp_path / "sci.yaml"
    sci.write_text("data:\n  train_data_path: x\noptimizer:\n  lr: 5e-3\n")
    got = load_config(sci, ["loss.loss_parameters.null_weight=1e-5", "data.n_train=5"])
    assert got["optimizer"]["lr"] == 5e-3 and got["data"]["n_train"] == 5
    assert got["loss"]["loss_parameters"]["null_weight"] == 1e-5
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping of sections, got list"):
        load_config(listed)


def _train(cfg, **kw):
    from ase_gearsh.training.train import train

    return train(cfg, progress=False, log=lambda *a: None, **kw)


def _history(run):
    return load_checkpoint(run / "latest.ckpt")["extra"]["history"]


@pytest.mark.slow  # minutes of training on 2 cores: `make test-all`
def test_overfit_tiny_dataset(water_dataset, tmp_path, make_config):
    cfg = make_config(
        water_dataset,
        tmp_path,
        data={"n_train": 1, "n_valid": 1},
        optimizer={"lr": 0.003},
        training={"n_epochs": 400, "valid_every": 100},
    )
    run = _train(cfg)
    hist = _history(run)
    first, last = hist[0]["train_loss"], min(h["train_loss"] for h in hist[-20:])
    assert first / last >= 100, (first, last)
    csv = (run / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,seconds,lr,train_loss,val_loss,val_mae_onsite_meV")
    assert len(csv) == 401 and (run / "loss.png").stat().st_size > 5000
    assert (run / "model.ckpt").exists()


@pytest.mark.slow  # about a minute or two on 2 cores: `make test-all`
def test_resume_continues_exactly(water_dataset, tmp_path, make_config):
    """Stopping after epoch 2 and resuming gives the uninterrupted trajectory."""
    full = _train(make_config(water_dataset, tmp_path / "a", training={"n_epochs": 4}))
    part_cfg = make_config(water_dataset, tmp_path / "b", training={"n_epochs": 2})
    part = _train(part_cfg)
    with pytest.raises(Exception, match="--resume"):
        _train(part_cfg)  # refuses to overwrite an existing run
    part_cfg["training"]["n_epochs"] = 4
    _train(part_cfg, resume=True)
    a, b = _history(full), _history(part)
    assert [h["epoch"] for h in b] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [h["train_loss"] for h in a], [h["train_loss"] for h in b], rtol=1e-5
    )


@pytest.mark.slow  # 1.7-3.5 min on 2 cores (two compilations, one in a subprocess): `make test-all`
def test_kill_mid_epoch_loses_at_most_that_epoch(water_dataset, tmp_path, make_config):
    """kill -9 during training: latest.ckpt stays readable and --resume finishes."""
    cfg = make_config(water_dataset, tmp_path, training={"n_epochs": 400})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ase_gearsh", "train", str(path), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = tmp_path / "run" / "latest.ckpt"
    import time

    deadline = time.time() + 900  # generous: compilation on a loaded 2-core machine
    while time.time() < deadline:
        if latest.exists() and load_checkpoint(latest)["extra"]["epoch"] >= 3:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    done = load_checkpoint(latest)["extra"]["epoch"]
    assert done >= 3
    cfg["training"]["n_epochs"] = done + 2
    path.write_text(yaml.safe_dump(cfg))
    from ase_gearsh.cli import main

    assert main(["train", str(path), "--resume", "-q"]) == 0
    hist = _history(tmp_path / "run")
    assert [h["epoch"] for h in hist] == list(range(1, done + 3))


@pytest.fixture(scope="module")
def trained_run(water_dataset, tmp_path_factory, make_config):
    """One small training run shared by the checkpoint and eval tests (read only)."""
    return _train(
        make_config(
            water_dataset, tmp_path_factory.mktemp("trained"), training={"reliability": True}
        )
    )


def test_checkpoint_round_trip_and_errors(water_dataset, tmp_path, trained_run):
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.model.engine import Model

    run = trained_run
    model = Model.from_checkpoint(run / "model.ckpt")
    again = Model.from_checkpoint(run / "model.ckpt")
    atoms = Dataset(water_dataset)[0].atoms
    a = forward_blocks(model, model.graph(atoms))
    b = forward_blocks(again, again.graph(atoms))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    ck = load_checkpoint(run / "model.ckpt")
    assert {"config", "settings", "registry", "stats", "params", "versions"} <= set(ck)
    assert [e["symbol"] for e in ck["registry"]["species"]] == ["H", "O"]
    # training ends by fitting the reliability reference into model.ckpt
    assert set(ck["extra"]["reliability"]["species"]) == {"H", "O"}
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x04\x95 pickled? no")
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(junk)
    from flax import serialization

    payload = serialization.msgpack_restore((run / "model.ckpt").read_bytes())
    payload["version"] = 99
    old = tmp_path / "future.ckpt"
    old.write_bytes(serialization.msgpack_serialize(payload))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(old)
    payload["version"] = 1
    node = payload["params"]
    while isinstance(node, dict):  # first parameter array
        key = sorted(node)[0]
        parent, node = node, node[key]
    parent[key] = np.zeros((1, 2), np.float32)
    wrong = tmp_path / "wrong.ckpt"
    wrong.write_bytes(serialization.msgpack_serialize(payload))
    with pytest.raises(CheckpointError, match=r"has shape \(1, 2\)"):
        Model.from_checkpoint(wrong)


def test_init_params_starts_from_a_trained_model(water_dataset, tmp_path, trained_run, make_config):
    """training.init_params: a new run starts from the checkpoint's weights and
    statistics (its first validation equals the checkpoint's best at a negligible
    learning rate); a committee or a model of other settings is refused, by name."""
    from ase_gearsh.model.committee import build_committee

    best = trained_run / "model.ckpt"
    ck = load_checkpoint(best)
    cfg = make_config(
        water_dataset,
        tmp_path / "tuned",
        optimizer={"lr": 1e-12},
        training={"n_epochs": 1, "init_params": str(best)},
    )
    run = _train(cfg)
    new = load_checkpoint(run / "latest.ckpt")
    val = new["extra"]["history"][0]["val_mae_all_meV"]
    assert ck["extra"]["best"] > 1.0  # a trained, not a perfect, model
    np.testing.assert_allclose(val, ck["extra"]["best"], rtol=1e-4)
    assert new["stats"].keys() == ck["stats"].keys()
    for k in ck["stats"]:
        np.testing.assert_array_equal(new["stats"][k], ck["stats"][k])
    pair = build_committee([best, best], tmp_path / "pair.ckpt")
    cfg = make_config(
        water_dataset, tmp_path / "c", training={"n_epochs": 1, "init_params": str(pair)}
    )
    with pytest.raises(CheckpointError, match="committee of 2 models"):
        _train(cfg)
    cfg = make_config(
        water_dataset, tmp_path / "d", training={"n_epochs": 1, "init_params": str(best)}
    )
    cfg["model"]["bond_centered"]["cutoff"] += 0.5
    with pytest.raises(CheckpointError, match="other model settings"):
        _train(cfg)


@pytest.mark.slow  # minutes of training on 2 cores: `make test-all`
def test_training_on_k_sampled_data_with_lattice_shifts(
    chain_dataset, water_dataset, tmp_path, make_config
):
    cfg = make_config(
        [str(water_dataset), str(chain_dataset)],
        tmp_path,
        data={"val_data_path": str(chain_dataset), "n_valid": None},
    )
    run = _train(cfg)
    hist = _history(run)
    assert hist[-1]["val_mae_pair_meV"] != "" and np.isfinite(hist[-1]["val_mae_all_meV"])


@pytest.mark.slow  # minutes of training on 2 cores: `make test-all`
def test_two_devices_follow_the_one_device_trajectory(water_dataset, tmp_path, make_config):
    configs = {
        nd: make_config(
            water_dataset,
            tmp_path / f"d{nd}",
            data={"batch_size": 2, "n_valid": 1},
            training={"n_epochs": 3, "num_devices": nd},
        )
        for nd in (1, 2)
    }
    script = """
import json, sys
from ase_gearsh.training.train import train
from ase_gearsh.model.checkpoint import load_checkpoint
out = {}
for nd, cfg in json.loads(sys.argv[1]).items():
    run = train(cfg, progress=False, log=lambda *a: None)
    out[nd] = [h["train_loss"] for h in load_checkpoint(run / "latest.ckpt")["extra"]["history"]]
import jax
out["devices"] = len(jax.devices())
print(json.dumps(out))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(configs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    np.testing.assert_allclose(out["1"], out["2"], rtol=1e-4)
    assert out["1"][0] != out["1"][-1]


def test_eval_cli_reports_errors_and_plots(
    water_dataset, tmp_path, capsys, trained_run, monkeypatch
):
    from ase_gearsh.cli import main

    run = trained_run
    assert (
        main(
            ["eval", str(run / "model.ckpt"), str(water_dataset), "-o", str(tmp_path / "ev"), "-q"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "H MAE" in out and "eigenvalue MAE" in out and "MAE without it" in out
    assert "aligned" in out
    assert "nearly singular" not in out  # water's S is far from singular
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    from ase_gearsh.core.data import Dataset

    lam = min(np.linalg.eigvalsh(x.overlap())[0] for x in Dataset(water_dataset))
    assert s["overlap_min_eigenvalue"] == pytest.approx(lam, rel=1e-8)
    assert s["structures"] == 4 and s["h_mae_meV"] > 0
    assert s["eig_mae_window_meV"] > 0
    assert 0 <= s["eig_mae_window_aligned_meV"] <= s["eig_mae_window_meV"] + 1e-9
    for png in ("errors.png", "parity.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 10000
    assert (
        main(["eval", str(run / "model.ckpt"), str(water_dataset), "--validation-only", "-q"]) == 0
    )
    assert "1 structures" in capsys.readouterr().out
    # a nearly singular S (here: a threshold above water's) points to --overlap-cutoff
    monkeypatch.setattr("ase_gearsh.cli.NEAR_SINGULAR", 10.0)
    args = ["eval", str(run / "model.ckpt"), str(water_dataset), "--validation-only", "-q"]
    assert main(args) == 0
    assert "nearly singular" in capsys.readouterr().out
    assert main(args + ["--overlap-cutoff", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "nearly singular" not in out and "overlap cut-off 0.01" in out
    assert main(["eval", str(tmp_path / "missing.ckpt"), str(water_dataset)]) == 2
    assert "not found" in capsys.readouterr().err


def test_oracle_blocks_give_gpaw_eigenvalues(water_dataset, small_model, monkeypatch):
    """Eval's eigenvalue path: with the reference blocks it returns GPAW's eigenvalues."""
    from ase_gearsh.training import evaluate as ev

    ds = __import__("ase_gearsh.core.data", fromlist=["Dataset"]).Dataset(water_dataset)
    monkeypatch.setattr(
        ev,
        "predict_structure_blocks",
        lambda model, s, info=None: (s.arrays["onsite_H"][0], s.arrays["pair_H"][0]),
    )
    monkeypatch.setattr(
        "ase_gearsh.model.engine.Model.from_checkpoint", classmethod(lambda cls, p: small_model)
    )
    s = ev.evaluate("oracle", ds, progress=False)
    assert s["h_mae_meV"] == 0 and s["eig_mae_all_meV"] < 1e-6
    # H + c S has GPAW's eigenvalues shifted by c: all of the error is the common shift
    c = 0.05
    monkeypatch.setattr(
        ev,
        "predict_structure_blocks",
        lambda model, s, info=None: (
            s.arrays["onsite_H"][0] + c * s.arrays["onsite_S"],
            s.arrays["pair_H"][0] + c * s.arrays["pair_S"],
        ),
    )
    s = ev.evaluate("oracle", ds, progress=False)
    assert s["eig_mae_window_meV"] == pytest.approx(50.0, abs=1e-6)
    assert s["eig_abs_shift_meV"] == pytest.approx(50.0, abs=1e-6)
    assert s["eig_mae_window_unshifted_meV"] < 1e-6
    assert all(r["eig_shift_meV"] == pytest.approx(50.0, abs=1e-6) for r in s["per_structure"])
    # canonical orthogonalisation: the error of the oracle's H is the cut-off's own,
    # which the floor reports (the cut-off removes S's two smallest directions here)
    monkeypatch.setattr(
        ev,
        "predict_structure_blocks",
        lambda model, s, info=None: (s.arrays["onsite_H"][0], s.arrays["pair_H"][0]),
    )
    s0 = ds[0]
    cut = 1.01 * float(np.sort(np.linalg.eigvalsh(s0.overlap()))[1])
    s = ev.evaluate("oracle", ds, progress=False, limit=1, overlap_cutoff=cut)
    assert s["overlap_cutoff"] == cut
    assert s["eig_mae_window_meV"] == pytest.approx(s["eig_mae_window_cutoff_floor_meV"], abs=1e-9)
    assert s["eig_mae_window_meV"] > 0
    with pytest.raises(Exception, match="overlap_cutoff"):
        ev.evaluate("oracle", ds, progress=False, limit=1, overlap_cutoff=-1.0)


def test_validation_elements_must_be_in_the_training_set(
    water_dataset, chain_dataset, tmp_path, make_config
):
    from ase_gearsh.core.basis import RegistryError

    cfg = make_config(
        water_dataset, tmp_path, data={"val_data_path": str(chain_dataset), "n_valid": None}
    )
    with pytest.raises(RegistryError, match="element C is not in the model's registry"):
        _train(cfg)


def test_fixed_validation_split_by_name_or_index(water_dataset, tmp_path, make_config):
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.training.config import check_config
    from ase_gearsh.training.train import TrainingError, load_training_data

    names = Dataset(water_dataset).names
    cfg = check_config(
        make_config(
            water_dataset,
            tmp_path,
            data={"valid_structures": [names[2], 0], "n_valid": None, "n_train": None},
        )
    )
    train, valid = load_training_data(cfg)
    got = sorted(s.path.stem for s in valid)
    assert got == sorted([names[0], names[2]])
    assert not {s.path.stem for s in train} & set(got)
    assert len(train) + len(valid) == len(names)
    for bad, message in (
        (["no-such-structure"], "neither an index nor the name"),
        ([len(names)], "outside"),
        (list(range(len(names))), "leaves no training"),
    ):
        cfg["data"]["valid_structures"] = bad
        with pytest.raises(TrainingError, match=message):
            load_training_data(cfg)


def test_epoch_order_follows_data_and_training_seed():
    """Committee members (other training seeds) see other orders; a resumed run (same
    seeds and epoch) repeats its order exactly."""
    from ase_gearsh.training.train import epoch_rng

    def order(d, t, e):
        return epoch_rng(d, t, e).permutation(200)

    assert np.array_equal(order(0, 0, 5), order(0, 0, 5))
    assert not np.array_equal(order(0, 0, 5), order(0, 1, 5))
    assert not np.array_equal(order(0, 0, 5), order(1, 0, 5))
    assert not np.array_equal(order(0, 0, 5), order(0, 0, 6))
