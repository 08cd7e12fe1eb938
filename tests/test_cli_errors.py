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
from ase_gearsh.core.io import OutputLock
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
            "--force",
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


# -- the hostile-input table: one line per case -------------------------------------
# ``name | command line | exit status | regex on stdout+stderr``.  Placeholders:
# {tmp} a fresh folder; {water} {spin} {truncated} {not_dataset} {nan_ds} {obj_ds}
# {part_ds} {mixed_ds} datasets (healthy, spin-polarised, one .npz cut in half, no
# dataset.json, NaN in H, a pickled object array, a left-over .part file, mixed spin);
# {model} {run} an untrained model and its run folder; structures {mol} (water),
# {box} (periodic water), {nanpos} (NaN position), {gold} (an element the model does
# not know), {empty} (no atoms), {frames} (two frames), {text_gpw} (text named .gpw);
# {file} a file, {existing} a folder holding old.txt, {locked} an output another
# process is writing; {cfg:a.b=1;c=x} a training config with overrides (YAML values).
# Every case must leave every file that existed before it unchanged.
TABLE = r"""
train: negative learning rate | gearsh train {cfg:optimizer.lr=-0.001} -q | 2 | optimizer\.lr.*a finite number > 0.*-0\.001
train: NaN learning rate | gearsh train {cfg:optimizer.lr=.nan} -q | 2 | optimizer\.lr.*a finite number > 0
train: zero epochs | gearsh train {cfg:training.n_epochs=0} -q | 2 | 'training\.n_epochs' must be >= 1, got 0
train: EMA decay above 1 | gearsh train {cfg:training.ema_decay=1.5} -q | 2 | ema_decay.*1\.5
train: negative time budget | gearsh train {cfg:training.max_minutes=-5} -q | 2 | max_minutes.*-5
train: wrong type of value | gearsh train {cfg:data.n_valid=many} -q | 2 | n_valid.*'many'
train: run folder is a file | gearsh train {cfg:} -o {file} -q | 2 | output folder .*file is a file; expected a folder
train: run folder under a file | gearsh train {cfg:} -o {file}/run -q | 2 | is a file; expected a folder
train: another run writes the folder | gearsh train {cfg:} -o {locked} -q | 2 | being written by another process \(pid \d+
train --resume into a new folder | gearsh train {cfg:} -o {tmp}/new --resume -q | 2 | --resume: no latest\.ckpt in .*new
train: dataset with NaN blocks | gearsh train {cfgds:nan_ds} -q | 2 | water.*\.npz.*hold NaN or inf
train: dataset with a pickled object array | gearsh train {cfgds:obj_ds} -q | 2 | cannot read dataset file '.*\.npz'.*pickle
eval: negative --limit | gearsh eval {model} {water} --limit -3 | 2 | limit must be a positive number of structures, got -3
eval: NaN blocks in the dataset | gearsh eval {model} {nan_ds} -q | 2 | hold NaN or inf
eval: pickled object array in the dataset | gearsh eval {model} {obj_ds} -q | 2 | cannot read dataset file
eval: spin-polarised dataset | gearsh eval {model} {spin} -q | 2 | spin-polarised
eval: output folder is a file | gearsh eval {model} {water} -o {file} -q | 2 | output folder .*file is a file; expected a folder
predict: --npts 0 | gearsh predict {mol} -m {model} -o {tmp}/out --npts 0 -q | 2 | npts must be an integer >= 2, got 0
predict: --width 0 | gearsh predict {mol} -m {model} -o {tmp}/out --width 0 -q | 2 | width .*> 0.* got 0
predict: --width nan | gearsh predict {mol} -m {model} -o {tmp}/out --width nan -q | 2 | width .*got nan
predict: --emin above --emax | gearsh predict {mol} -m {model} -o {tmp}/out --emin 5 --emax 1 -q | 2 | emin .*emax
predict: -o is a file | gearsh predict {mol} -m {model} -o {file} -q | 2 | output folder .*file is a file; expected a folder
predict: -o under a file | gearsh predict {mol} -m {model} -o {file}/out -q | 2 | lies under .*file, which is a file
predict: -o exists | gearsh predict {mol} -m {model} -o {existing} -q | 2 | existing already exists; choose another or pass --overwrite
predict: -o exists, failing run with --overwrite | gearsh predict {gold} -m {model} -o {existing} --overwrite -q | 2 | Au
predict: another run writes -o | gearsh predict {mol} -m {model} -o {locked} -q | 2 | being written by another process \(pid \d+
predict: k-points on a molecule | gearsh predict {mol} -m {model} -o {tmp}/out --kpts 2,2,2 -q | 2 | non-periodic|periodic
predict: KPM with k-points | gearsh predict {box} -m {model} -o {tmp}/out --kpts 2,2,2 --method kpm -q | 2 | Gamma only
predict: NaN position | gearsh predict {nanpos} -m {model} -o {tmp}/out -q | 2 | expected finite positions, got NaN or inf for atom\(s\) \[1\]
predict: element the model does not know | gearsh predict {gold} -m {model} -o {tmp}/out -q | 2 | Au.*(H|O)
predict: no atoms | gearsh predict {empty} -m {model} -o {tmp}/out -q | 2 | expected at least one atom
predict: --index beyond the frames | gearsh predict {frames} -m {model} -o {tmp}/out --index 7 -q | 2 | frames\.extxyz: --index '7' selects no frame of the file
predict: --index selects several frames | gearsh predict {frames} -m {model} -o {tmp}/out --index : -q | 2 | selects 2 frames; expected one frame
predict: --charge nan | gearsh predict {mol} -m {model} -o {tmp}/out --charge nan -q | 2 | charge must be a finite number
predict: unknown --method | gearsh predict {mol} -m {model} -o {tmp}/out --method lanczos | 2 | invalid choice: 'lanczos'
predict: model missing | gearsh predict {mol} -m {tmp}/none.ckpt -o {tmp}/out -q | 2 | checkpoint '.*none\.ckpt' not found
predict: model is a text file | gearsh predict {mol} -m {file} -o {tmp}/out -q | 2 | not a readable GEARS H checkpoint
attach-basis: other functional than the training data | gearsh attach-basis {model} --xc LDA | 2 | xc='LDA' differs from the functional of the training data \('PBE'.*--force
attach-basis: model missing | gearsh attach-basis {tmp}/none.ckpt | 2 | checkpoint '.*none\.ckpt' not found
attach-basis: output is a folder | gearsh attach-basis {model} -o {existing} | 2 | output .*existing is a folder; expected a checkpoint file name
attach-reliability: dataset missing | gearsh attach-reliability {model} {tmp}/nowhere -o {tmp}/x.ckpt -q | 2 | nowhere
check: healthy dataset | gearsh check {water} | 0 | 4 good structure\(s\), 0 problem\(s\)
check: truncated entry | gearsh check {truncated} | 1 | 3 good structure\(s\), 1 problem.*cannot read dataset file .*--overwrite
check: NaN blocks | gearsh check {nan_ds} | 1 | hold NaN or inf
check: pickled object array | gearsh check {obj_ds} | 1 | cannot read dataset file
check: left-over temporary file | gearsh check {part_ds} | 1 | temporary file of an interrupted write
check: spin settings mixed | gearsh check {mixed_ds} | 1 | nspins is (1|2), but (1|2)
check: not a dataset | gearsh check {not_dataset} | 2 | is not a dataset: dataset\.json is missing
check: folder missing | gearsh check {tmp}/nowhere | 2 | nowhere.*does not exist
extract: --threshold nan | extract {text_gpw} -o {tmp}/ds --threshold nan -q | 2 | threshold must be a finite number of eV >= 0, got nan
extract: negative --threshold | extract {text_gpw} -o {tmp}/ds --threshold -1 -q | 2 | threshold must be a finite number of eV >= 0, got -1
extract: negative --eigenvalue-tolerance | extract {text_gpw} -o {tmp}/ds --eigenvalue-tolerance -1 -q | 2 | eigenvalue tolerance must be a finite number of eV >= 0
extract: text file named .gpw (isolated failure) | extract {text_gpw} -o {tmp}/ds -q | 1 | not a GPAW restart file
extract: output is a dataset's file | extract {text_gpw} -o {water}/dataset.json -q | 2 | exists and is not a directory
generate: --jobs 0 | generate {mol} -o {tmp}/runs --jobs 0 | 2 | --jobs must be >= 1, got 0
generate: negative grid spacing | generate {mol} -o {tmp}/runs --h -0.2 | 2 | --h must be a finite number > 0 \(grid spacing, A\), got -0\.2
generate: NaN vacuum | generate {mol} -o {tmp}/runs --vacuum nan | 2 | --vacuum must be a finite number >= 0
generate: --basis-dir not a folder | generate {mol} -o {tmp}/runs --basis-dir {file} | 2 | --basis-dir '.*file' is not a folder
generate: another run writes -o | generate {mol} -o {locked} -q | 2 | being written by another process
"""


def _table():
    rows = []
    for line in TABLE.strip().splitlines():
        name, command, status, message = (x.strip() for x in line.split(" | ", 3))
        rows.append(pytest.param(command, int(status), message, id=name))
    return rows


def _overrides(spec: str) -> dict:
    """'a.b=1;c=x' -> {'a': {'b': 1}, 'c': 'x'} (values parsed as YAML)."""
    out: dict = {}
    for item in filter(None, spec.split(";")):
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        d = out
        for k in parents:
            d = d.setdefault(k, {})
        d[last] = yaml.safe_load(value)
    return out


def _snapshot(*folders) -> dict:
    """Bytes of every file under the folders."""
    return {
        p: p.read_bytes()
        for f in folders
        if f.exists()
        for p in sorted(f.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def hostile(paths, tmp_path_factory):
    """Crafted datasets and structure files for the table (made once)."""
    from ase.build import molecule
    from ase.io import write

    base = tmp_path_factory.mktemp("hostile")
    water = paths["water"]
    files = sorted(water.glob("*.npz"))

    def dataset(name, edit=None, extra=()):
        d = base / name
        shutil.copytree(water, d)
        if edit is not None:
            with np.load(files[0]) as z:
                arrays = {k: z[k] for k in z.files}
            edit(arrays)
            np.savez(d / files[0].name, **arrays)
        for src in extra:
            shutil.copy(src, d / src.name)
        return d

    def nan_block(a):
        a["pair_H"] = a["pair_H"].copy()
        a["pair_H"][0, 3] = np.nan

    def object_array(a):
        a["positions"] = np.array([object()] * len(a["numbers"]), dtype=object)

    made = {
        "nan_ds": dataset("nan_ds", nan_block),
        "obj_ds": dataset("obj_ds", object_array),
        "part_ds": dataset("part_ds"),
        "mixed_ds": dataset("mixed_ds", extra=sorted(paths["spin"].glob("*.npz"))),
    }
    (made["part_ds"] / f".{files[1].name}.abc123.part").write_bytes(b"half a file")
    mol = molecule("H2O")
    mol.center(vacuum=3.0)
    box = mol.copy()
    box.pbc = True
    nanpos = mol.copy()
    nanpos.positions[1, 0] = np.nan
    gold = mol.copy()
    gold.symbols[0] = "Au"
    for name, atoms in [("mol", mol), ("box", box), ("nanpos", nanpos), ("gold", gold)]:
        write(base / f"{name}.extxyz", atoms)
        made[name] = base / f"{name}.extxyz"
    made["frames"] = base / "frames.extxyz"
    write(made["frames"], [mol, mol])
    made["empty"] = base / "empty.xyz"
    made["empty"].write_text("0\n\n")
    made["text_gpw"] = base / "notes.gpw"
    made["text_gpw"].write_text("not a GPAW file\n")
    return made


@pytest.mark.parametrize("command, status, message", _table())
def test_hostile_input(command, status, message, paths, hostile, tmp_path, capsys):
    """Exit status, one line that says what was expected and what was received, no
    traceback, and every file that existed before is unchanged afterwards."""
    case = tmp_path / "case"
    case.mkdir()
    values = {k: str(v) for k, v in {**paths, **hostile}.items() if k != "make_config"}
    values.update(tmp=str(case), model=str(paths["run"] / "model.ckpt"), run=str(paths["run"]))
    if "{file}" in command:
        (case / "file").write_text("a file the user keeps\n")
        values["file"] = str(case / "file")
    if "{existing}" in command:
        (case / "existing").mkdir()
        (case / "existing" / "old.txt").write_text("an earlier result\n")
        values["existing"] = str(case / "existing")
    values["locked"] = str(case / "busy")

    def config(match):
        kind, spec = match.group(1), match.group(2)
        train = paths["water"] if kind == "cfg" else hostile[spec]
        cfg = paths["make_config"](str(train), str(case / "runs"))
        for key, value in (_overrides(spec) if kind == "cfg" else {}).items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        path = case / f"config{len(list(case.glob('config*')))}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    command = re.sub(r"\{(cfg|cfgds):([^}]*)\}", config, command)
    argv = [part.format(**values) for part in command.split()]
    tool, args = argv[0], argv[1:]
    watched = [paths[k] for k in ("water", "spin", "truncated", "run")]
    watched += [v for v in hostile.values() if v.is_dir()] + [case]
    before = _snapshot(*watched)
    lock = OutputLock(case / "busy").acquire() if "{locked}" in command else None
    try:
        code = MAINS[tool](args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    finally:
        if lock is not None:
            lock.release()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text
    assert code == status, text
    assert re.search(message, " ".join(text.split())), text
    if status == 2:
        prog = f"gearsh {args[0]}" if tool == "gearsh" else PROGS[tool]
        lines = [line for line in out.err.splitlines() if line.startswith(f"{prog}: error: ")]
        assert len(lines) == 1 and re.search(message, lines[0]), out.err
    after = _snapshot(*watched)
    changed = [str(p) for p, data in before.items() if after.get(p) != data]
    assert not changed, f"files changed or removed: {changed}"
    leftovers = [p for p in case.rglob(".*") if p.suffix in (".part", ".old") or p.is_dir()]
    assert not leftovers, leftovers
