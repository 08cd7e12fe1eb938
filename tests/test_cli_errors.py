"""User errors at the command line: one line ``<prog>: error: <message>``, exit status 2
(1 for isolated per-file failures), never a traceback.

One row per case: (name, argv builder, expected exit status, regex on stderr).  The
commands run in-process (``main(argv)``); nothing here compiles a network, so the
file is fast once the session's GPAW fixtures exist.
"""

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from ase_gearsh.cli import main as gearsh_main
from ase_gearsh.model.checkpoint import save_checkpoint
from ase_gearsh.model.engine import Model
from ase_gearsh.training.config import check_config, model_settings
from ase_gearsh.training.train import prepare_data
from gpaw_tools.extract import main as extract_main
from gpaw_tools.generate import main as generate_main

MAINS = {"gearsh": gearsh_main, "extract": extract_main, "generate": generate_main}
PROGS = {"extract": "python -m gpaw_tools.extract", "generate": "python -m gpaw_tools.generate"}


@dataclass
class Paths:
    """What the argv builders may use."""

    tmp: Path  # a fresh folder for this case
    water: Path  # the water dataset
    spin: Path  # a spin-polarised dataset
    truncated: Path  # the water dataset with one .npz cut in half
    not_dataset: Path  # a folder without dataset.json
    run: Path  # a run folder: model.ckpt and latest.ckpt of an untrained model
    make_config: object

    @property
    def model(self) -> str:
        return str(self.run / "model.ckpt")

    def config(self, train=None, name: str = "config", directory=None, **overrides) -> str:
        """A small training config written as YAML; its path."""
        train = self.water if train is None else train
        cfg = self.make_config(
            [str(t) for t in train] if isinstance(train, list) else train,
            directory or self.tmp,
            **overrides,
        )
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def text(self, name: str, content: str) -> str:
        path = self.tmp / name
        path.write_text(content)
        return str(path)


CASES = [
    # -- gearsh train ------------------------------------------------------------
    (
        "train: config file missing",
        lambda c: ["gearsh", "train", str(c.tmp / "missing.yaml")],
        2,
        r"config file '.*missing\.yaml' not found",
    ),
    (
        "train: YAML syntax error",
        lambda c: ["gearsh", "train", c.text("bad.yaml", "data: [unclosed\n")],
        2,
        r"bad\.yaml: not valid YAML",
    ),
    (
        "train: unknown config key",
        lambda c: ["gearsh", "train", c.config(data={"n_trian": 3})],
        2,
        r"unknown key 'data\.n_trian'; known keys here: .*n_train",
    ),
    (
        "train: folder without dataset.json",
        lambda c: ["gearsh", "train", c.config(train=c.not_dataset), "-q"],
        2,
        r"'.*not_a_dataset' is not a dataset: dataset\.json is missing",
    ),
    pytest.param(
        "train: truncated .npz in the dataset",
        lambda c: ["gearsh", "train", c.config(train=c.truncated), "-q"],
        2,
        r"cannot read dataset file '.*water.*\.npz'",
    ),
    (
        "train: spin-polarised data",
        lambda c: ["gearsh", "train", c.config(train=[c.water, c.spin]), "-q"],
        2,
        r"spin-polarised data \(nspins=2\); the model is trained on spin-paired",
    ),
    (
        "train: more validation structures than data",
        lambda c: ["gearsh", "train", c.config(data={"n_valid": 10}), "-q"],
        2,
        r"data\.n_valid=10 leaves no training structures \(the dataset has 4\)",
    ),
    (
        "train: a run is already there",
        lambda c: ["gearsh", "train", c.config(directory=c.run.parent), "-q"],
        2,
        r"already holds a training run \(latest\.ckpt\); pass --resume",
    ),
    (
        "train --resume: nothing to resume",
        lambda c: ["gearsh", "train", c.config(), "--resume", "-q"],
        2,
        r"--resume: no latest\.ckpt in",
    ),
    (
        "train --resume: model size changed in the config",
        lambda c: [
            "gearsh",
            "train",
            c.config(directory=c.run.parent, model={"mlp": {"mlp_layer_widths": [16, 8]}}),
            "--resume",
            "-q",
        ],
        2,
        r"--resume: .*latest\.ckpt was trained with other model settings .*"
        r"mlp_layer_widths: \[8, 8\] in the checkpoint, \[16, 8\] now",
    ),
    # -- gearsh eval ---------------------------------------------------------------
    (
        "eval: --limit 0",
        lambda c: ["gearsh", "eval", c.model, str(c.water), "--limit", "0"],
        2,
        r"limit must be a positive number of structures, got 0",
    ),
    (
        "eval: --limit not a number",
        lambda c: ["gearsh", "eval", c.model, str(c.water), "--limit", "all"],
        2,
        r"argument --limit: invalid int value: 'all'",
    ),
    (
        "eval: model file missing",
        lambda c: ["gearsh", "eval", str(c.tmp / "missing.ckpt"), str(c.water)],
        2,
        r"checkpoint '.*missing\.ckpt' not found",
    ),
    (
        "eval: model file is not a checkpoint",
        lambda c: ["gearsh", "eval", c.text("junk.ckpt", "no checkpoint"), str(c.water)],
        2,
        r"junk\.ckpt: not a readable GEARS H checkpoint",
    ),
    (
        "eval: folder without dataset.json",
        lambda c: ["gearsh", "eval", c.model, str(c.not_dataset), "-q"],
        2,
        r"'.*not_a_dataset' is not a dataset: dataset\.json is missing",
    ),
    (
        "eval: dataset folder missing",
        lambda c: ["gearsh", "eval", c.model, str(c.tmp / "nowhere"), "-q"],
        2,
        r"dataset directory '.*nowhere' does not exist",
    ),
    pytest.param(
        "eval: truncated .npz in the dataset",
        lambda c: ["gearsh", "eval", c.model, str(c.truncated), "-q"],
        2,
        r"cannot read dataset file '.*water.*\.npz'",
    ),
    # -- gearsh predict / attach-basis ---------------------------------------------
    (
        "predict: structure file missing",
        lambda c: [
            "gearsh",
            "predict",
            str(c.tmp / "none.xyz"),
            "-m",
            c.model,
            "-o",
            str(c.tmp / "out"),
            "-q",
        ],
        2,
        r"structure file '.*none\.xyz' not found",
    ),
    (
        "predict: --kpts malformed",
        lambda c: [
            "gearsh",
            "predict",
            str(c.tmp / "none.xyz"),
            "-m",
            c.model,
            "-o",
            str(c.tmp / "out"),
            "--kpts",
            "4,4",
        ],
        2,
        r"--kpts expects three .*like 4,4,1, got '4,4'",
    ),
    (
        "attach-basis: unknown functional",
        lambda c: [
            "gearsh",
            "attach-basis",
            c.model,
            "--xc",
            "NOSUCHXC",
            "-o",
            str(c.tmp / "x.ckpt"),
        ],
        2,
        r"xc='NOSUCHXC' is not a functional GPAW knows",
    ),
    (
        "attach-basis: dataset folder missing",
        lambda c: [
            "gearsh",
            "attach-basis",
            c.model,
            "--dataset",
            str(c.tmp / "nowhere"),
            "-o",
            str(c.tmp / "x.ckpt"),
        ],
        2,
        r"dataset directory '.*nowhere' does not exist",
    ),
    # -- gpaw_tools ------------------------------------------------------------------
    (
        "extract: output is a file",
        lambda c: ["extract", str(c.tmp / "none.gpw"), "-o", Path(c.text("file", "")) / "ds", "-q"],
        2,
        r"cannot create dataset directory",
    ),
    (
        "extract: .gpw file missing (isolated failure)",
        lambda c: ["extract", str(c.tmp / "none.gpw"), "-o", str(c.tmp / "ds"), "-q"],
        1,
        r"FAILED .*none\.gpw: '.*none\.gpw': no such file",
    ),
    (
        "generate: structure file missing",
        lambda c: ["generate", str(c.tmp / "none.xyz"), "-o", str(c.tmp / "runs")],
        2,
        r"structure file '.*none\.xyz' does not exist",
    ),
    (
        "generate: structure file unreadable",
        lambda c: [
            "generate",
            c.text("garbage.xyz", "3\n\nnot an xyz file\n"),
            "-o",
            str(c.tmp / "runs"),
            "-q",
        ],
        2,
        r"ASE cannot read '.*garbage\.xyz'",
    ),
    (
        "generate: malformed --element-basis",
        lambda c: [
            "generate",
            str(c.tmp / "none.xyz"),
            "-o",
            str(c.tmp / "runs"),
            "--element-basis",
            "Hf",
        ],
        2,
        r"--element-basis expects EL=NAME, got 'Hf'",
    ),
]


@pytest.fixture(scope="module")
def paths(water_dataset, spin_dataset, make_config, tmp_path_factory):
    """The datasets and an untrained run folder, made once for the module (zero
    parameters from the network's shapes: nothing is compiled)."""
    base = tmp_path_factory.mktemp("cli_errors")
    truncated = base / "truncated"
    shutil.copytree(water_dataset, truncated)
    victim = sorted(truncated.glob("*.npz"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (base / "not_a_dataset").mkdir()
    cfg = check_config(make_config(water_dataset, base))
    data = prepare_data(cfg, log=lambda *a: None, progress=False)
    settings = model_settings(
        cfg, data.registry.n_species, data.layout.lmax_out, data.layout.n_features
    )
    model = Model(settings, data.registry, data.stats, None, cfg)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), model.param_shapes())
    run = base / cfg["data"]["experiment"]
    run.mkdir()
    common = dict(
        config=cfg,
        settings=settings,
        registry=data.registry.to_dict(),
        stats=data.stats,
        params=params,
        basis=data.basis,
        extra={
            "epoch": 1,
            "history": [],
            "best": 1.0,
            "train_names": [g.name for g in data.train],
            "valid_names": [g.name for g in data.valid],
        },
    )
    save_checkpoint(run / "model.ckpt", **common)
    save_checkpoint(run / "latest.ckpt", **common, state={"opt_state": {}})
    return dict(
        water=water_dataset,
        spin=spin_dataset,
        truncated=truncated,
        not_dataset=base / "not_a_dataset",
        run=run,
        make_config=make_config,
    )


def _case_id(case):
    return (case.values if hasattr(case, "values") else case)[0]


@pytest.mark.parametrize("name, argv, status, message", CASES, ids=[_case_id(c) for c in CASES])
def test_user_error_is_one_line_without_traceback(
    name, argv, status, message, paths, tmp_path, capsys
):
    args = argv(Paths(tmp=tmp_path, **paths))
    tool, args = args[0], [str(a) for a in args[1:]]
    try:
        code = MAINS[tool](args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == status, err
    assert re.search(message, err), err
    if status == 2:
        prog = f"gearsh {args[0]}" if tool == "gearsh" else PROGS[tool]
        lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
        assert len(lines) == 1 and re.search(message, lines[0]), err
