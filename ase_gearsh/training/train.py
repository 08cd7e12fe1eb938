"""Training: ``gearsh train config.yaml`` (see :mod:`ase_gearsh.training.config` for the keys).

Writes to ``<data.directory>/<data.experiment>/``: ``model.ckpt`` (best by
validation H MAE), ``latest.ckpt`` (everything needed by ``--resume``),
``metrics.csv`` (one row per epoch) and ``loss.png``.  Every checkpoint is
written atomically at the end of an epoch, so an interruption loses at most
the epoch in progress.

:func:`train` is five named steps and the epoch loop:

1. :func:`prepare_data`: datasets, registry and block layout, labelled graphs,
   statistics, training coverage, basis functions (:class:`TrainingData`);
2. :func:`build_model`: the network and its initial parameters;
3. :class:`StepFunctions`: loss, jitted training step and evaluation sums, batches
   sharded over ``training.num_devices`` devices;
4. :class:`Checkpointer`: ``model.ckpt``, ``latest.ckpt`` and ``--resume``;
5. :class:`MetricsWriter`: ``metrics.csv`` and ``loss.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from optax import contrib
from tqdm.auto import tqdm

from gpaw_tools.overlap import BasisDataError, basis_for_registry

from ..core.basis import Registry
from ..core.data import Dataset, Structure
from ..core.errors import GearsHError
from ..core.io import OutputLock, atomic_write_bytes, check_output_folder, new_figure, save_figure
from ..model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..model.coverage import training_coverage
from ..model.engine import FAR, Model, pair_cutoff_matrix, precision
from ..model.graph import (
    Graph,
    LabelError,
    attach_labels,
    attach_residual,
    attach_window,
    batch_graphs,
    build_graph,
    pad_residual,
    pad_size,
)
from ..model.layout import Layout
from ..model.statistics import fit_statistics
from .baseline import TwoCentre, fit_baseline, fit_onsite_baseline
from .config import apply_overrides, check_config, load_config, model_settings

__all__ = [
    "train",
    "load_training_data",
    "TrainingError",
    "loss_from_sums",
    "gamma_levels",
    "TrainingData",
    "prepare_data",
    "build_model",
    "StepFunctions",
    "TrainState",
    "FlatParameters",
    "ELEMENTWISE_OPTIMIZERS",
    "Checkpointer",
    "MetricsWriter",
]

METRICS = [
    "epoch",
    "seconds",
    "lr",
    "train_loss",
    "val_loss",
    "val_mae_onsite_meV",
    "val_mae_pair_meV",
    "val_mae_all_meV",
]

Log = Callable[..., None]


class TrainingError(GearsHError, RuntimeError):
    """Training cannot start or continue with this input."""


# -- the loop -----------------------------------------------------------------
def train(
    config: str | Path | dict,
    resume: bool = False,
    output: str | Path | None = None,
    log: Log = print,
    progress: bool = True,
    overrides=None,
) -> Path:
    """Train a model; returns the run directory.  ``config`` is a path or a dict;
    ``overrides``: ``KEY=VALUE`` strings applied to it (``training.seed=1``).

    With ``resume`` the run continues from ``latest.ckpt`` exactly as if it had
    not been interrupted (same batches, same optimiser state)."""
    cfg, base = _read_config(config, overrides)
    run = _run_folder(cfg, base, output, resume)
    with OutputLock(run, what="run folder (data.experiment or -o)"):
        _run_folder(cfg, base, output, resume)  # again, now that no one else writes it
        return _train_run(cfg, base, run, resume, log, progress)


def _train_run(cfg: dict, base: Path, run: Path, resume: bool, log: Log, progress: bool) -> Path:
    """The training run in ``run`` (locked by the caller)."""
    data = prepare_data(cfg, base, log, progress)
    start = None
    if cfg["training"]["init_params"] and not resume:
        data, start = _initial_weights(cfg, data, base, log)
    checkpoints = Checkpointer(run, cfg, data)
    resumed = checkpoints.load_latest() if resume else None  # checked before compiling
    model, params = build_model(cfg, data)
    if start is not None:
        params = _restore_tree(params, start[1], "parameter", start[0])
    steps = StepFunctions(cfg, model, data, log)
    state = steps.init_state(params)
    if resumed is not None:
        state = checkpoints.restore(resumed, state, steps)
        log(f"resuming after epoch {state.next_epoch - 1}")
    (run / "config.json").write_text(json.dumps(cfg, indent=1))
    metrics = MetricsWriter(run)
    from ..model.network import count_parameters

    tcfg = cfg["training"]
    n_epochs, lr = tcfg["n_epochs"], cfg["optimizer"]["lr"]
    log(
        f"{count_parameters(params):,} parameters; {len(data.train)} training and "
        f"{len(data.valid)} validation structures; {steps.steps_per_epoch} steps per epoch"
    )
    budget = 60.0 * tcfg["max_minutes"] if tcfg["max_minutes"] else None
    done_before = state.seconds  # training seconds of earlier runs (--resume)
    start = time.time()
    clock = lambda: done_before + time.time() - start  # noqa: E731
    if budget:  # a bar of minutes: its estimate is the budget's, not n_epochs'
        bar = tqdm(
            total=round(budget / 60, 1),
            initial=round(min(done_before, budget) / 60, 1),
            desc="training",
            unit="min",
            bar_format="{l_bar}{bar}| {n:.1f}/{total:g} min [{elapsed}<{remaining}{postfix}]",
            disable=not progress,
            dynamic_ncols=True,
        )
    else:
        bar = tqdm(
            total=n_epochs,
            initial=state.next_epoch - 1,
            desc="training",
            unit="epoch",
            disable=not progress,
            dynamic_ncols=True,
        )
    for epoch in range(state.next_epoch, n_epochs + 1):
        t0 = time.time()
        train_loss = steps.train_epoch(state, data.train, epoch, clock)
        stopping = epoch < n_epochs and bool(budget and clock() > budget)
        due = epoch % tcfg["valid_every"] == 0 or epoch == n_epochs or stopping
        val = steps.validate(state.weights, data.valid) if data.valid and due else None
        lr_now = lr * _lr_scale(state.opt_state) * state.lr_scale
        state.history.append(metrics_row(epoch, time.time() - t0, lr_now, train_loss, val))
        checkpoints.end_epoch(
            epoch, state, _score(val, train_loss, data.valid), stopping, steps.trees
        )
        metrics.end_epoch(epoch, state.history)
        post = {"loss": f"{train_loss:.3g}", "val_mae": f"{val[3]:.3g} meV" if val else "-"}
        if budget:
            bar.update(round(min(clock(), budget) / 60, 1) - bar.n)
            post["epoch"] = epoch
        else:
            bar.update(1)
        bar.set_postfix(post)
        if stopping:
            bar.close()
            log(f"stopping after epoch {epoch}: training.max_minutes reached")
            break
    bar.close()
    metrics.close(state.history)
    if tcfg["reliability"] and checkpoints.best_path.exists():
        from ..model.reliability import reference_summary
        from .attach import attach_reliability

        ref = attach_reliability(checkpoints.best_path, data.train, progress=progress)
        log(f"reliability reference of model.ckpt: {reference_summary(ref)}")
    return run


def _initial_weights(cfg: dict, data, base: Path, log: Log):
    """``training.init_params``: (data with the checkpoint's statistics, (path, its
    parameters)), after checking that it holds one model of the same elements, basis
    sets and model settings (else :class:`CheckpointError`)."""
    path = Path(cfg["training"]["init_params"])
    if not path.is_absolute() and (base / path).exists():
        path = base / path
    ck = load_checkpoint(path)
    if ck.get("members"):
        raise CheckpointError(
            f"training.init_params: {path} is a committee of {len(ck['members']) + 1} "
            f"models; give one member's checkpoint (a run's model.ckpt)"
        )
    now = {"registry": data.registry.to_dict(), "settings": _settings(cfg, data)}
    _check_same_model(ck, now, f"training.init_params: {path}")
    log(f"initial weights and statistics from {path}")
    return replace(data, stats=ck["stats"]), (path, ck["params"])


def _read_config(config, overrides=None) -> tuple[dict, Path]:
    """The checked config and the folder relative paths in it start from."""
    if isinstance(config, (str, Path)):
        return load_config(config, overrides), Path(config).resolve().parent
    return check_config(apply_overrides(config, overrides)), Path(".")


def _run_folder(cfg: dict, base: Path, output, resume: bool) -> Path:
    """The run folder (created); refuses to overwrite a run or to resume none."""
    d = cfg["data"]
    run = Path(output) if output else Path(d["directory"]) / d["experiment"]
    if not run.is_absolute() and not output:
        run = base / run
    check_output_folder(run, overwrite=True)  # not a file, not under one
    run.mkdir(parents=True, exist_ok=True)
    latest = run / "latest.ckpt"
    if latest.exists() and not resume:
        raise TrainingError(
            f"{run} already holds a training run (latest.ckpt); pass --resume "
            f"to continue it or choose another data.experiment / -o"
        )
    if resume and not latest.exists():
        raise TrainingError(f"--resume: no latest.ckpt in {run}")
    return run


def _score(val, train_loss: float, valid: list) -> float | None:
    """What the best model is judged by: validation H MAE when there is a validation
    set (``None`` in epochs without validation), else the training loss."""
    if val:
        return val[3]
    return None if valid else train_loss


# -- 1. data ------------------------------------------------------------------
def _paths(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _read(paths, base: Path) -> list[Structure]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_absolute():
            p = (base / p) if (base / p).exists() else p
        out.extend(Dataset(p))
    return out


def load_training_data(cfg: dict, base: Path = Path(".")) -> tuple[list, list]:
    """Structures for training and validation: ``data.val_data_path`` when given,
    else the structures that ``data.valid_structures`` names (structure names or
    indices into the training data), else a random split (``data.seed``)."""
    d = cfg["data"]
    train = _read(_paths(d["train_data_path"]), base)
    valid = _read(_paths(d["val_data_path"]), base)
    if not train:
        raise TrainingError(f"no structures found in data.train_data_path {d['train_data_path']!r}")
    chosen = d["valid_structures"]
    if chosen is not None and valid:
        raise TrainingError(
            "data.valid_structures and data.val_data_path both choose the validation "
            "set: give one of them"
        )
    if chosen is not None:
        names = [s.meta["source"]["name"] for s in train]  # the source file
        entries = [s.path.stem if s.path else "" for s in train]  # the dataset entry
        pick = []
        for item in chosen:
            if isinstance(item, int) and not isinstance(item, bool):
                if not -len(train) <= item < len(train):
                    raise TrainingError(
                        f"data.valid_structures: index {item} is outside the "
                        f"{len(train)} training structures"
                    )
                pick.append(item % len(train))
            elif isinstance(item, str) and item in entries:
                pick.append(entries.index(item))
            elif isinstance(item, str) and item in names:
                pick.append(names.index(item))
            else:
                raise TrainingError(
                    f"data.valid_structures: {item!r} is neither an index nor the name of a "
                    f"structure in data.train_data_path (names look like {entries[0]!r} "
                    f"or {names[0]!r})"
                )
        pick = sorted(set(pick))
        if len(pick) >= len(train):
            raise TrainingError("data.valid_structures leaves no training structures")
        valid = [train[k] for k in pick]
        train = [s for k, s in enumerate(train) if k not in set(pick)]
    elif not valid:
        rng = np.random.default_rng(d["seed"])
        order = rng.permutation(len(train))
        n_valid = d["n_valid"] if d["n_valid"] is not None else max(1, len(train) // 5)
        if n_valid >= len(train):
            raise TrainingError(
                f"data.n_valid={n_valid} leaves no training structures "
                f"(the dataset has {len(train)})"
            )
        valid = [train[k] for k in order[:n_valid]]
        train = [train[k] for k in order[n_valid:]]
    for name, part, n in (("n_train", train, d["n_train"]), ("n_valid", valid, d["n_valid"])):
        if n is not None:
            if n > len(part):
                raise TrainingError(
                    f"data.{name}={n} but only {len(part)} structures are available"
                )
            part[:] = part[:n]
    return train, valid


@dataclass
class TrainingData:
    """What the model and the loop need from the datasets (step 1)."""

    registry: Registry
    layout: Layout
    train: list[Graph]  # labelled graphs at the model's cut-offs
    valid: list[Graph]
    stats: dict  # closed-form statistics of the training labels
    coverage: dict  # shortest bonds, most neighbours (extrapolation warnings)
    basis: dict | None  # basis functions for the exact S (None: not installed)


def prepare_data(
    cfg: dict, base: Path = Path("."), log: Log = print, progress: bool = True
) -> TrainingData:
    """Step 1: read the datasets; one registry and block layout for both sets
    (validation may not add elements); labelled graphs at the model's cut-offs;
    statistics, training coverage and basis functions of the training set."""
    train_s, valid_s = load_training_data(cfg, base)
    registry = Registry.from_structures(train_s)
    for s in valid_s:
        registry.check_basis(s.basis, f"validation structure {s.meta['source']['name']}")
    layout = Layout(registry)
    bond = cfg["model"]["bond_centered"]
    if layout.lmax > bond["max_basis_degree"]:
        raise TrainingError(
            f"the basis sets have l={layout.lmax} but "
            f"model.bond_centered.max_basis_degree={bond['max_basis_degree']}"
        )
    pc = pair_cutoff_matrix(registry, bond["cutoff"])
    cutoff = cfg["model"]["atom_centered"]["descriptor"]["radial_basis"]["cutoff"]
    make = partial(
        _labelled_graphs, registry=registry, layout=layout, cutoff=cutoff, pc=pc, progress=progress
    )
    lp = cfg["loss"]["loss_parameters"]
    # S labels needed
    resid = lp["residual_weight"] > 0 or lp["null_weight"] > 0
    overlap = lp["eigenvalue_weight"] > 0 or lp["shift_weight"] > 0 or resid
    window = float(lp["eigenvalue_window"]) if lp["shift_weight"] > 0 else None
    resid_w = float(lp["eigenvalue_window"]) if resid else None
    null_c = float(lp["null_cutoff"]) if lp["null_weight"] > 0 else None
    tg, out_t, max_t = make(
        train_s,
        desc="training labels",
        overlap=overlap,
        window=window,
        residual=resid_w,
        null_cutoff=null_c,
    )
    if resid_w is not None:
        pad_residual(tg)
    vg, out_v, max_v = make(valid_s, desc="validation labels")
    rc_sum = float(np.max(registry.rc[1:, None] + registry.rc[None, 1:]))
    if bond["cutoff"] < rc_sum:
        log(
            f"note: bond cutoff {bond['cutoff']} A < largest rc_i + rc_j = {rc_sum:.2f} A; "
            f"pairs beyond it are predicted as zero"
        )
    if out_t + out_v:
        log(
            f"{out_t + out_v} stored blocks lie beyond the bond cut-offs (largest |H| "
            f"{max(max_t, max_v) * 1e3:.3g} meV); they are predicted as zero"
        )
    basis = _basis_data(train_s, registry, log)
    onsite_h0 = cfg["model"]["atom_centered"]["baseline"] == "two_centre"
    if (bond["baseline"] == "two_centre" or onsite_h0) and basis is None:
        raise TrainingError(
            "the two-centre baseline (model.*.baseline: two_centre) needs the basis "
            "functions of the training data (GPAW's basis files for these elements); "
            "use baseline: none"
        )
    stats, residual = {}, tg  # the statistics are fitted on what the network learns
    wanted = onsite_h0 or bond["baseline"] == "two_centre"
    two_centre = TwoCentre(basis, registry, layout) if wanted else None
    if onsite_h0:
        entries, resid = fit_onsite_baseline(tg, two_centre, pc)
        species = np.concatenate([g.species for g in tg])
        _log_rms(
            log,
            "on-site",
            [_centred(np.concatenate([g.onsite for g in tg]), species)],
            [_centred(np.concatenate(resid), species)],
            " (each element's mean block removed, as the statistics' shift does)",
        )
        residual = [replace(g, onsite=r) for g, r in zip(residual, resid)]
        stats.update(entries)
    if bond["baseline"] == "two_centre":
        table, _, resid = fit_baseline(tg, two_centre, pc)
        _log_rms(log, "pair", [g.pairs for g in tg], resid)
        residual = [replace(g, pairs=r) for g, r in zip(residual, resid)]
        stats["pair_baseline"] = table
    stats.update(fit_statistics(residual, layout, pc))
    return TrainingData(
        registry=registry,
        layout=layout,
        train=tg,
        valid=vg,
        stats=stats,
        coverage=training_coverage(tg, registry.n_species),
        basis=basis,
    )


def _log_rms(log, what, labels, residuals, note=""):
    n = max(1, sum(x.size for x in labels))
    before = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in labels) / n)
    after = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in residuals) / n)
    log(
        f"two-centre baseline H0: RMS of the {what} labels {before * 1e3:.1f} meV, of "
        f"what the network learns (H - H0) {after * 1e3:.1f} meV{note}"
    )


def _centred(blocks, species):
    out = blocks.astype(np.float64)
    for s in np.unique(species):
        out[species == s] -= out[species == s].mean(axis=0)
    return out


def _labelled_graphs(
    structures,
    *,
    registry,
    layout,
    cutoff,
    pc,
    desc="",
    progress=True,
    overlap=False,
    window=None,
    residual=None,
    null_cutoff=None,
):
    """Graphs with H labels; also the number and largest |H| of stored blocks
    beyond the bond cut-offs."""
    graphs, outside, outside_max = [], 0, 0.0
    for s in tqdm(structures, desc=desc, unit="structure", leave=False, disable=not progress):
        g = build_graph(
            s.atoms,
            registry.species_index(s.atoms.numbers),
            cutoff,
            pc,
            name=s.meta["source"]["name"],
        )
        info = attach_labels(g, s, layout, overlap=overlap)
        if window is not None:
            try:
                attach_window(g, s, layout, window)
            except LabelError as err:
                raise TrainingError(f"loss.loss_parameters.shift_weight > 0: {err}") from None
        if residual is not None:
            try:
                attach_residual(g, s, layout, residual, null_cutoff)
            except LabelError as err:
                raise TrainingError(
                    f"loss.loss_parameters.residual_weight or null_weight > 0: {err}"
                ) from None
        outside += info["outside"]
        outside_max = max(outside_max, info["outside_max"])
        graphs.append(g)
    return graphs, outside, outside_max


def _basis_data(structures, registry, log):
    """Basis functions and projectors for the exact overlap, stored in checkpoints."""
    meta = structures[0].meta
    xc = meta.get("xc")
    setups = (meta.get("gpaw", {}).get("parameters") or {}).get("setups", "paw")
    try:
        basis = basis_for_registry(registry, xc, setups)
    except (BasisDataError, ImportError) as err:
        log(
            f"warning: basis functions not stored in the checkpoint ({err}); the ASE "
            f"calculator will need them (gearsh attach-basis)"
        )
        return None
    return {sym: b.to_dict() for sym, b in basis.items()}


# -- 2. model -----------------------------------------------------------------
def _settings(cfg: dict, data: TrainingData) -> dict:
    """Network settings of the ``model`` section for this registry and layout."""
    return model_settings(
        cfg, data.registry.n_species, data.layout.lmax_out, data.layout.n_features
    )


def build_model(cfg: dict, data: TrainingData) -> tuple[Model, Any]:
    """Step 2: the network of the ``model`` section for this registry and layout,
    and its initial parameters (``training.seed``)."""
    model = Model(_settings(cfg, data), data.registry, data.stats, None, cfg)
    return model, model.init_params(cfg["training"]["seed"])


# -- 3. step functions --------------------------------------------------------
def _sums(pred_on, pred_pair, b, orbital_mask):
    """Summed squared and absolute errors and element counts, on-site and pairs."""
    m = orbital_mask[b["species"]]
    m_on = (m[:, :, None] & m[:, None, :]).astype(pred_on.dtype)
    mp = (
        orbital_mask[b["species"][b["pair_i"]]][:, :, None]
        & orbital_mask[b["species"][b["pair_j"]]][:, None, :]
    )
    m_off = mp.astype(pred_pair.dtype) * b["pair_weight"][:, None, None]
    e_on = (pred_on - b["onsite"]) * m_on
    e_off = (pred_pair - b["pairs"]) * m_off
    return jnp.stack(
        [
            (e_on**2).sum(),
            jnp.abs(e_on).sum(),
            m_on.sum(),
            (e_off**2).sum(),
            jnp.abs(e_off).sum(),
            m_off.sum(),
        ]
    )


_FAR_LEVEL = 1.0e3  # eV: the level given to padding orbitals (outside every window)


def _dense(on, pr, b, valid, n_atoms: int, diagonal: float):
    """Per-structure dense Gamma-point matrices (G, A n, A n) of a batch's canonical
    blocks: on-site blocks at (i, i), H_ij(R) at (i, j) and its transpose at (j, i)
    (summed over R); padding and unused orbitals get ``diagonal`` on the diagonal."""
    G = b["fermi"].shape[0]
    n = on.shape[-1]
    M = n_atoms * n
    g_at, loc = b["atom_graph"], b["atom_local"]
    rows = loc[:, None] * n + jnp.arange(n)  # (N, n)
    X = jnp.zeros((G + 1, M, M), on.dtype)
    X = X.at[g_at[:, None, None], rows[:, :, None], rows[:, None, :]].add(on)
    gi = g_at[b["pair_i"]][:, None, None]
    ri, rj = rows[b["pair_i"]], rows[b["pair_j"]]
    X = X.at[gi, ri[:, :, None], rj[:, None, :]].add(pr)
    X = X.at[gi, rj[:, :, None], ri[:, None, :]].add(jnp.swapaxes(pr, -1, -2))
    X = X[:G]
    v = valid.astype(on.dtype)
    return (
        X * v[:, :, None] * v[:, None, :]
        + jnp.eye(M, dtype=on.dtype) * (diagonal * (1 - v))[:, None, :]
    )


def _dense_rows(b, orbital_mask, n_atoms: int, n: int):
    """Structures G, dense size M = n_atoms n, each atom's dense rows (N, n) and the
    mask (G, M) of the rows that are real orbitals, for a batch built with
    ``structures``."""
    G = b["fermi"].shape[0]
    M = n_atoms * n
    rows = b["atom_local"][:, None] * n + jnp.arange(n)
    valid = (
        jnp.zeros((G + 1, M), bool)
        .at[b["atom_graph"][:, None], rows]
        .set(orbital_mask[b["species"]])[:G]
    )
    return G, M, rows, valid


def gamma_levels(on, pr, b, orbital_mask, n_atoms: int):
    """Gamma-point eigenvalues (G, A n) of (H, S) per structure of a batch built
    with ``structures`` (:func:`~ase_gearsh.model.graph.batch_graphs`): H from the
    canonical blocks ``on``, ``pr``, S from the batch's S labels.  Unused and
    padding orbitals sit at 1000 eV, above every real level.  Differentiable."""
    valid = _dense_rows(b, orbital_mask, n_atoms, on.shape[-1])[3]
    S = _dense(b["onsite_s"], b["pairs_s"], b, valid, n_atoms, 1.0)
    L = jnp.linalg.cholesky(S)
    H = _dense(on, pr, b, valid, n_atoms, _FAR_LEVEL)
    X = jax.scipy.linalg.solve_triangular(L, H, lower=True)
    A = jax.scipy.linalg.solve_triangular(L, jnp.swapaxes(X, -1, -2), lower=True)
    return jnp.linalg.eigvalsh(0.5 * (A + jnp.swapaxes(A, -1, -2)))


def _eigen_sums(pred_on, pred_pair, b, orbital_mask, window: float, n_atoms: int):
    """Squared and absolute errors and the count of the Gamma-point eigenvalues of
    (H, S) within ``window`` eV of each structure's Fermi level: the predicted H
    against the label H, both with the label S (per structure in the batch)."""
    ref = jax.lax.stop_gradient(gamma_levels(b["onsite"], b["pairs"], b, orbital_mask, n_atoms))
    pr = pred_pair * b["pair_weight"][:, None, None]
    pred = gamma_levels(pred_on, pr, b, orbital_mask, n_atoms)
    inside = (jnp.abs(ref - b["fermi"][:, None]) <= window) & (ref < 0.5 * _FAR_LEVEL)
    err = jnp.where(inside, pred - ref, 0.0)
    return jnp.stack([(err**2).sum(), jnp.abs(err).sum(), inside.sum().astype(err.dtype)])


def _residual_sums(pred_on, pred_pair, b, orbital_mask, residual):
    """The residuals of the reference's Gamma-point window states under the
    predicted H, in the S^-1 norm: for each window state (e_n, c_n) of the label
    (H, S), ||r_n||^2 = ||(H_pred - e_n S) c_n||^2_{S^-1} = sum_m (c_m^T dH c_n)^2
    over every reference state m (dH = H_pred - H).  ||r_n|| bounds the distance of
    e_n to the nearest predicted level, and S's near-null directions weigh in as
    they do in the eigenvalues.  ``residual`` = (atoms per structure, sets): for
    each of the sets "win" (the window states) and "null" (S's near-null
    directions x_p: the same sum with x_p for c_n, the rows of dH in S's canonical
    basis that belong to them) the sums of ||r||^2 and ||r|| and the number of
    columns (a batch built with ``structures`` from graphs with
    :func:`~ase_gearsh.model.graph.attach_residual`).

    With a subsample of bonds, dH holds the kept bonds scaled by the bonds of the
    full graph per kept bond: its expectation is the full dH, and the squared norm's
    expectation adds (1/p - 1) times each bond's own squared contribution, an MSE of
    the bonds in the same metric."""
    n_atoms, sets = residual
    G, M, rows, valid = _dense_rows(b, orbital_mask, n_atoms, pred_on.shape[-1])
    w = (b["pair_weight"] * b["pair_scale"])[:, None, None]
    dH = _dense(pred_on - b["onsite"], (pred_pair - b["pairs"]) * w, b, valid, n_atoms, 0.0)

    def columns(x):  # per-atom rows (N, n, K) -> per-structure dense (G, M, K)
        X = jnp.zeros((G + 1, M, x.shape[-1]), x.dtype)
        return X.at[b["atom_graph"][:, None], rows].add(x)[:G]

    C = columns(b["res_all"])
    out = []
    for key, count in (("win", "res_count"), ("null", "res_null_count")):
        if key not in sets:
            continue
        Cw = columns(b["res_win" if key == "win" else "res_null"])
        D = jnp.swapaxes(C, -1, -2) @ (dH @ Cw)  # (G, K, W): c_m^T dH c_n
        norm2 = (D**2).sum(axis=1)  # (G, W): ||r_n||^2 (zero for padding columns)
        real = norm2 > 0
        norm = jnp.where(real, jnp.sqrt(jnp.where(real, norm2, 1.0)), 0.0)  # finite gradients
        out.append(jnp.stack([norm2.sum(), norm.sum(), b[count].sum()]))
    return jnp.concatenate(out)


def _shift_sums(pred_on, pred_pair, b, orbital_mask, pairs: bool = True):
    """The first-order mean shift of each structure's levels within the window:
    c = <dH, rho_w> (Frobenius, over its blocks; pairs counted for H_ij and H_ji and
    scaled by the bonds left out by subsampling), rho_w the window density matrix of
    the reference (:func:`~ase_gearsh.model.graph.window_density`).  H + aS gives
    c = a.  ``pairs=False``: the on-site blocks' part only (no sampling noise from a
    subsample of bonds).  Returns the sums of c^2 and |c| and the number of
    structures (a batch built with ``structures`` from graphs labelled with
    ``window``)."""
    G = b["fermi"].shape[0]
    m = orbital_mask[b["species"]]
    m_on = (m[:, :, None] & m[:, None, :]).astype(pred_on.dtype)
    mp = (
        orbital_mask[b["species"][b["pair_i"]]][:, :, None]
        & orbital_mask[b["species"][b["pair_j"]]][:, None, :]
    )
    w_off = 2.0 * b["pair_weight"] * b["pair_scale"]
    m_off = mp.astype(pred_pair.dtype) * w_off[:, None, None]
    seg = partial(jax.ops.segment_sum, num_segments=G + 1)
    on = ((pred_on - b["onsite"]) * b["onsite_w"] * m_on).sum(axis=(1, 2))
    off = ((pred_pair - b["pairs"]) * b["pairs_w"] * m_off).sum(axis=(1, 2))
    c = seg(on, b["atom_graph"])[:G]
    if pairs:
        c = c + seg(off, b["atom_graph"][b["pair_i"]])[:G]
    real = seg((b["species"] > 0).astype(c.dtype), b["atom_graph"])[:G] > 0
    c = jnp.where(real, c, 0.0)
    return jnp.stack([(c**2).sum(), jnp.abs(c).sum(), real.sum().astype(c.dtype)])


def loss_from_sums(s, lp: dict):
    """Weighted MSE + RMSE (paper listing 6) from summed squared errors and counts."""
    mse_on = s[0] / jnp.maximum(s[2], 1.0)
    mse_off = s[3] / jnp.maximum(s[5], 1.0)
    term = lambda mse: lp["mse_weight"] * mse + lp["rmse_weight"] * jnp.sqrt(mse + 1e-12)  # noqa
    return lp["loss_multiplier"] * (
        lp["on_diagonal_weight"] * term(mse_on) + lp["off_diagonal_weight"] * term(mse_off)
    )


def _batch_sums(
    model: Model, orbital_mask, params, stats, batch, eigen=None, shift=False, residual=None
):
    """Error sums of a sharded batch (leading axis: devices), summed over shards;
    ``eigen`` = (window, atoms per structure) adds the eigenvalue sums, ``residual``
    (atoms per structure, sets) the residual sums (:func:`_residual_sums`), ``shift``
    ("all", "onsite" or False) the level-shift sums (:func:`_shift_sums`), in that
    order."""

    def one(b):
        on, pr = model.forward(params, stats, b)
        s = [_sums(on, pr, b, orbital_mask)]
        if eigen is not None:
            s.append(_eigen_sums(on, pr, b, orbital_mask, *eigen))
        if residual is not None:
            s.append(_residual_sums(on, pr, b, orbital_mask, residual))
        if shift:
            s.append(_shift_sums(on, pr, b, orbital_mask, shift == "all"))
        return jnp.concatenate(s)

    if jax.tree_util.tree_leaves(batch)[0].shape[0] == 1:
        # one shard: no vmap.  Under vmap (even of size 1) the gathers and segment
        # sums of the network become batched scatters, which made a WSe2 step twice
        # as slow on the CPU (benchmarks/training_throughput.py)
        return one(jax.tree_util.tree_map(lambda x: x[0], batch))
    return jax.vmap(one)(batch).sum(axis=0)


def _loss(
    model: Model,
    orbital_mask,
    lp: dict,
    params,
    stats,
    batch,
    eigen=None,
    shift=False,
    residual=None,
):
    s = _batch_sums(model, orbital_mask, params, stats, batch, eigen, shift, residual)
    loss = loss_from_sums(s, lp)

    def term(sq, count):  # weighted MSE + RMSE, like the H terms
        mse = sq / jnp.maximum(count, 1.0)
        return lp["mse_weight"] * mse + lp["rmse_weight"] * jnp.sqrt(mse + 1e-12)

    k = 6
    if eigen is not None:  # the eigenvalues in the window
        loss = loss + lp["loss_multiplier"] * lp["eigenvalue_weight"] * term(s[k], s[k + 2])
        k += 3
    if residual is not None:  # the window states' residuals (S^-1 norm)
        for key, weight in (("win", "residual_weight"), ("null", "null_weight")):
            if key in residual[1]:  # and the near-null directions' rows
                loss = loss + lp["loss_multiplier"] * lp[weight] * term(s[k], s[k + 2])
                k += 3
    if shift:  # the first-order mean shift of each structure's window levels
        loss = loss + lp["loss_multiplier"] * lp["shift_weight"] * term(s[k], s[k + 2])
    return loss, s


def _train_step(
    model: Model,
    orbital_mask,
    lp: dict,
    tx,
    ema_decay: float,
    unravel: Callable,
    ravel: Callable,
    params,
    opt_state,
    ema,
    stats,
    batch,
    lr_scale,
    step,
    eigen=None,
    shift=False,
    residual=None,
):
    """One optimiser step: (params, opt_state, ema, loss).  ``eigen``, ``shift``,
    ``residual``: see :func:`_batch_sums` (static).  ``params`` and ``ema`` are what
    ``unravel`` turns into the network's parameters and ``ravel`` back (one flat
    vector: :class:`FlatParameters`; or the parameter tree itself).

    The updates are multiplied by ``lr_scale`` (the host-side schedule: the same
    as scaling the learning rate, weight decay included).  ``ema`` is the moving
    average of the weights with decay min(ema_decay, (1 + step) / (10 + step))."""
    loss_of = partial(_loss, model, orbital_mask, lp, eigen=eigen, shift=shift, residual=residual)
    # the gradient of the tree, then raveled (one concatenation): the gradient of the
    # unravelling slices themselves would add one padded full-length vector per array
    (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(unravel(params), stats, batch)
    grads = ravel(grads)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    updates = jax.tree_util.tree_map(lambda u: u * lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(params, updates)
    if ema_decay:
        t = step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    return params, opt_state, ema, loss


def epoch_rng(data_seed: int, training_seed: int, epoch: int) -> np.random.Generator:
    """The random generator of one epoch's structure order and bond subsample: fixed by
    ``data.seed``, ``training.seed`` and the epoch, so a resumed run repeats it and
    models trained with other training seeds (committee members) see other orders."""
    return np.random.default_rng([data_seed, training_seed, epoch])


def _subsample(g, fraction, alpha, rng):
    """The graph with a random subset of its bonds (``data.bond_fraction``)."""
    P = len(g.pair_i)
    if fraction >= 1.0 or P == 0:
        return g
    k = max(1, int(math.ceil(fraction * P)))
    if alpha:
        w = (np.sqrt((g.pairs.astype(np.float64) ** 2).sum(axis=(1, 2))) + 1e-6) ** alpha
        pick = rng.choice(P, size=k, replace=False, p=w / w.sum())
    else:
        pick = rng.choice(P, size=k, replace=False)
    pick.sort()
    return replace(
        g,
        pair_i=g.pair_i[pick],
        pair_j=g.pair_j[pick],
        pair_shift=g.pair_shift[pick],
        pair_vec=g.pair_vec[pick],
        pairs=g.pairs[pick],
        pairs_s=None if g.pairs_s is None else g.pairs_s[pick],
        pairs_w=None if g.pairs_w is None else g.pairs_w[pick],
        pair_scale=P / k,
    )


def _shards(graphs, n_dev, am, nm, bm=None, structures=None):
    """Split a batch over devices, pad every shard to one common shape, stack.
    ``structures``: structures per shard for the eigenvalue loss (None: off)."""
    parts = [graphs[k::n_dev] for k in range(n_dev)]
    sizes = [
        (sum(g.n_atoms for g in p), sum(len(g.edge_i) for g in p), sum(len(g.pair_i) for g in p))
        for p in parts
    ]
    N = pad_size(max(s[0] for s in sizes), am)
    E = pad_size(max(s[1] for s in sizes), nm)
    P = pad_size(max(s[2] for s in sizes), bm or nm)
    out = []
    for p in parts:
        b = batch_graphs(p or graphs[:1], am, nm, far=FAR, sizes=(N, E, P), structures=structures)
        w = np.zeros(P, np.float32)
        w[: sum(len(g.pair_i) for g in p)] = 1.0
        if not p:  # an empty shard contributes nothing
            b["species"][:] = 0
            w[:] = 0
            if "fermi" in b:
                b["atom_graph"][:] = structures
        b["pair_weight"] = w
        out.append(b)
    return {k: np.stack([b[k] for b in out]) for k in out[0]}


def _optimizer(cfg, steps_per_epoch, log):
    o = cfg["optimizer"]
    make = getattr(optax, o["name"], None)
    if make is None or not callable(make):
        raise TrainingError(
            f"optimizer.name {o['name']!r} is not an optax optimizer (e.g. adan, lamb, adamw, adam)"
        )
    try:
        base = make(learning_rate=o["lr"], **o["opt_kwargs"])
    except TypeError as err:
        raise TrainingError(
            f"optimizer.opt_kwargs {o['opt_kwargs']} do not fit optax.{o['name']}: {err}"
        ) from None
    parts = []
    if o["grad_clip"]:
        parts.append(optax.clip_by_global_norm(float(o["grad_clip"])))
    parts.append(base)
    sch = o["schedule"]
    if sch["name"] == "reduce_on_plateau":
        acc = sch["accumulation_size"]
        if acc is not None and acc != steps_per_epoch:
            log(
                f"note: schedule.accumulation_size={acc} replaced by the steps per epoch "
                f"({steps_per_epoch}): the plateau is judged once per epoch"
            )
        parts.append(
            contrib.reduce_on_plateau(
                factor=sch["factor"],
                patience=sch["patience"],
                rtol=sch["rtol"],
                atol=sch["atol"],
                cooldown=sch["cooldown"],
                accumulation_size=steps_per_epoch,
                min_scale=sch["min_scale"],
            )
        )
    return optax.chain(*parts)


class Schedule:
    """The learning-rate factor of ``optimizer.schedule`` as a function of the
    budget used: ``progress = max(step / (n_epochs * steps_per_epoch),
    seconds / (60 * max_minutes))`` in [0, 1].

    ``warmup_cosine``: linear from ~0 to 1 over ``warmup_fraction`` of the budget,
    then a cosine to ``final_scale`` at the end of the budget.  Other schedules: 1
    (``reduce_on_plateau`` acts inside the optimiser)."""

    def __init__(self, cfg: dict, steps_per_epoch: int):
        sch = cfg["optimizer"]["schedule"]
        self.name = sch["name"]
        self.warmup = float(sch["warmup_fraction"])
        self.final = float(sch["final_scale"])
        self.total_steps = cfg["training"]["n_epochs"] * steps_per_epoch
        mm = cfg["training"]["max_minutes"]
        self.budget = 60.0 * mm if mm else None

    def progress(self, step: int, seconds: float) -> float:
        p = step / max(self.total_steps, 1)
        if self.budget:
            p = max(p, seconds / self.budget)
        return min(p, 1.0)

    def __call__(self, step: int, seconds: float) -> float:
        if self.name != "warmup_cosine":
            return 1.0
        p = self.progress(step, seconds)
        if self.warmup and p < self.warmup:
            return max(p / self.warmup, 1e-3)
        q = (p - self.warmup) / max(1.0 - self.warmup, 1e-12)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * min(q, 1.0)))


def _lr_scale(opt_state) -> float:
    for s in opt_state:
        if hasattr(s, "scale") and hasattr(s, "plateau_count"):
            return float(s.scale)
    return 1.0


def _device_count(num_devices) -> int:
    n_dev = len(jax.devices()) if num_devices == "all" else int(num_devices)
    if n_dev > len(jax.devices()):
        raise TrainingError(
            f"training.num_devices={n_dev} but JAX sees {len(jax.devices())} device(s)"
        )
    return n_dev


# optax optimisers whose update of an element depends only on that element's history
# and on global scalars: they run unchanged on one flat vector of all parameters
# (LAMB, LARS, Adafactor, NovoGrad and others use per-array norms or shapes and
# keep the parameter tree)
ELEMENTWISE_OPTIMIZERS = frozenset(
    {
        "adabelief",
        "adagrad",
        "adam",
        "adamax",
        "adamaxw",
        "adamw",
        "adan",
        "amsgrad",
        "lion",
        "nadam",
        "nadamw",
        "radam",
        "rmsprop",
        "sgd",
        "yogi",
    }
)


@dataclass(frozen=True)
class FlatParameters:
    """The parameter tree as one flat vector: a training step then updates the
    parameters, their moving average and an element-wise optimiser's moments with a
    few array operations, where a tree of a few hundred arrays costs a few hundred
    small kernels each.  :meth:`unravel` (traced inside the step) gives the network
    its tree; slices of the vector fuse into their consumers."""

    treedef: Any
    shapes: tuple

    @classmethod
    def of(cls, params) -> FlatParameters | None:
        """The layout of ``params``; None when its arrays differ in dtype."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if len({np.dtype(x.dtype) for x in leaves}) != 1:
            return None
        return cls(treedef, tuple(tuple(np.shape(x)) for x in leaves))

    @property
    def size(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def _pieces(self, flat):
        out, k = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[k : k + n].reshape(shape))
            k += n
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def ravel(self, params):
        """The vector of a parameter tree (under jit, or jax arrays on the host)."""
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(params)])

    def unravel(self, flat):
        """The parameter tree of a vector."""
        return self._pieces(flat)

    def trees(self, x):
        """``x`` (host arrays) with every vector of :attr:`size` elements as a tree."""
        n = self.size
        return jax.tree_util.tree_map(
            lambda a: self._pieces(np.asarray(a)) if np.shape(a) == (n,) else a, x
        )

    def flats(self, x):
        """The inverse of :meth:`trees`: every sub-tree shaped like the parameters as
        a vector (host arrays)."""

        def is_params(t):
            return jax.tree_util.tree_structure(t) == self.treedef

        return jax.tree_util.tree_map(
            lambda t: (
                np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(t)])
                if is_params(t)
                else t
            ),
            x,
            is_leaf=is_params,
        )


class StepFunctions:
    """Step 3: the optimiser, the jitted training step and evaluation sums, and
    batches sharded over a one-axis :class:`jax.sharding.Mesh` of
    ``training.num_devices`` devices (parameters and optimiser state replicated).

    Every jitted call runs inside :func:`~ase_gearsh.model.engine.precision`, so
    it is traced and compiled with the project's matmul precision."""

    def __init__(self, cfg: dict, model: Model, data: TrainingData, log: Log = print):
        d = cfg["data"]
        self.n_dev = _device_count(cfg["training"]["num_devices"])
        self.batch_size = d["batch_size"]
        if self.batch_size < self.n_dev:
            raise TrainingError(
                f"data.batch_size={self.batch_size} is smaller than "
                f"training.num_devices={self.n_dev}: every device needs at "
                f"least one structure per step"
            )
        self.valid_batch_size = max(d["valid_batch_size"], self.n_dev)
        self.steps_per_epoch = max(1, len(data.train) // self.batch_size)
        # the epochs' order and bond subsample: the data seed and the training seed, so
        # that models trained with other training seeds (a committee) see other orders
        self.seed = (d["seed"], cfg["training"]["seed"])
        self.pad = (d["atoms_pad_multiple"], d["nl_pad_multiple"], d["bond_pad_multiple"])
        self.bond_fraction, self.sampling_alpha = d["bond_fraction"], d["sampling_alpha"]
        self.tx = _optimizer(cfg, self.steps_per_epoch, log)
        self.schedule = Schedule(cfg, self.steps_per_epoch)
        self.ema_decay = float(cfg["training"]["ema_decay"])
        self.lp = cfg["loss"]["loss_parameters"]
        mesh = jax.sharding.Mesh(np.array(jax.devices()[: self.n_dev]), ("data",))
        self._shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self._repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.stats = self.replicate({k: jnp.asarray(v) for k, v in data.stats.items()})
        mask = jnp.asarray(data.layout.orbital_mask)
        # the level-shift loss: every step (cheap: no diagonalisation)
        self.shift = (
            ("all" if self.lp["shift_pairs"] else "onsite")
            if self.lp["shift_weight"] > 0
            else False
        )
        sets = tuple(
            key
            for key, weight in (("win", "residual_weight"), ("null", "null_weight"))
            if self.lp[weight] > 0
        )
        resid = bool(sets)
        needs_s = self.shift or self.lp["eigenvalue_weight"] > 0 or resid
        if needs_s and any(g.onsite_s is None for g in data.train):
            raise TrainingError(
                "loss.loss_parameters.eigenvalue_weight, residual_weight, null_weight and "
                "shift_weight need the S labels of the training structures (prepare_data "
                "attaches them)"
            )
        if resid and any(g.res_all is None for g in data.train):
            raise TrainingError(
                "loss.loss_parameters.residual_weight needs the reference eigenvectors of "
                "the training structures (prepare_data attaches them)"
            )
        if "null" in sets and any(g.res_null is None for g in data.train):
            raise TrainingError(
                "loss.loss_parameters.null_weight needs S's near-null directions of the "
                "training structures (prepare_data attaches them)"
            )
        most_atoms = max(g.n_atoms for g in data.train)
        # the residual loss: every step, on the step's bonds (no diagonalisation)
        self.residual = (most_atoms, sets) if resid else None

        self.flat: FlatParameters | None = None  # set by init_state
        self.elementwise = cfg["optimizer"]["name"] in ELEMENTWISE_OPTIMIZERS

        def unravel(p):  # traced after init_state
            return p if self.flat is None else self.flat.unravel(p)

        def ravel(tree):
            return tree if self.flat is None else self.flat.ravel(tree)

        def compiled_step(eigen=None):
            step = partial(
                _train_step, model, mask, self.lp, self.tx, self.ema_decay, unravel, ravel
            )
            return jax.jit(
                partial(step, eigen=eigen, shift=self.shift, residual=self.residual),
                donate_argnums=(0, 1, 2),
            )

        self._step = compiled_step()
        # the eigenvalue loss: from eigenvalue_start of the budget on, all bonds
        self.eigen_start = None
        if self.lp["eigenvalue_weight"] > 0:
            self.eigen_start = float(self.lp["eigenvalue_start"])
            self._step_eigen = compiled_step((float(self.lp["eigenvalue_window"]), most_atoms))
        self._eval_sums = jax.jit(partial(_batch_sums, model, mask))
        self._unravel_jit = jax.jit(unravel)

    def replicate(self, tree):
        """``tree`` on every device of the mesh."""
        return jax.device_put(tree, self._repl)

    def batch(self, graphs: list[Graph], per_structure: bool = False) -> dict:
        """Padded arrays of ``graphs``, split over the devices (leading axis);
        ``per_structure``: with the S labels and structure indices that the
        eigenvalue and shift losses need."""
        per_shard = -(-self.batch_size // self.n_dev) if per_structure else None
        arrays = _shards(graphs, self.n_dev, *self.pad, structures=per_shard)
        return {k: jax.device_put(jnp.asarray(v), self._shard) for k, v in arrays.items()}

    def train_epoch(self, state: TrainState, graphs: list[Graph], epoch: int, clock) -> float:
        """One pass over ``graphs`` in an order (and bond subsample) fixed by
        ``data.seed``, ``training.seed`` and the epoch; updates ``state`` (parameters, optimiser
        state, moving average, step count) and returns the mean training loss.
        ``clock()`` gives the training seconds used so far (for the schedule).
        Losses stay on the device until the end of the epoch, so the host builds
        the next batch while the device computes."""
        rng = epoch_rng(*self.seed, epoch)
        order = rng.permutation(len(graphs))
        bs, losses = self.batch_size, []
        for k in range(self.steps_per_epoch):
            eigen = (
                self.eigen_start is not None
                and self.schedule.progress(state.step, clock()) >= self.eigen_start
            )
            chosen = [
                graphs[i]
                if eigen  # eigenvalues need every bond
                else _subsample(graphs[i], self.bond_fraction, self.sampling_alpha, rng)
                for i in order[k * bs : (k + 1) * bs]
            ]
            batch = self.batch(chosen, eigen or self.shift or self.residual is not None)
            scale = self.schedule(state.step, clock())
            step = self._step_eigen if eigen else self._step
            with precision():
                state.params, state.opt_state, state.ema, loss = step(
                    state.params,
                    state.opt_state,
                    state.ema,
                    self.stats,
                    batch,
                    jnp.float32(scale),
                    jnp.int32(state.step),
                )
            state.step += 1
            state.lr_scale = scale
            losses.append(loss)
        losses = np.asarray(jax.device_get(jnp.stack(losses)))
        if not np.all(np.isfinite(losses)):
            raise TrainingError(
                f"epoch {epoch}: the loss became {losses[~np.isfinite(losses)][0]}; lower "
                f"optimizer.lr or set optimizer.grad_clip"
            )
        return float(np.mean(losses))

    def init_state(self, params) -> TrainState:
        """The training state that starts from the parameter tree ``params``,
        replicated over the devices: with an element-wise optimiser
        (:data:`ELEMENTWISE_OPTIMIZERS`) the parameters, their moving average and the
        optimiser's moments are each one flat vector (:class:`FlatParameters`), so
        that an update is a few array operations instead of a few per parameter
        array; :meth:`trees` and :meth:`flats` convert for checkpoints."""
        self.flat = FlatParameters.of(params) if self.elementwise else None
        p = params if self.flat is None else self.flat.ravel(params)
        state = TrainState(self.replicate(p), self.replicate(self.tx.init(p)))
        if self.ema_decay:
            state.ema = jax.tree_util.tree_map(jnp.copy, state.params)
        return state

    def trees(self, x):
        """``x`` (parameters, or a state holding vectors of them) with every flat
        parameter vector as the parameter tree, on the host (the checkpoints' form)."""
        x = jax.device_get(x)
        return x if self.flat is None else self.flat.trees(x)

    def flats(self, x):
        """The inverse of :meth:`trees`."""
        return x if self.flat is None else self.flat.flats(x)

    def validate(self, params, graphs: list[Graph]) -> tuple[float, float, float, float]:
        """Validation loss and H MAE (meV): on-site, pairs, all elements (``params``:
        the tree, or a flat vector of :meth:`init_state`)."""
        if self.flat is not None and hasattr(params, "shape"):  # a flat vector
            params = self._unravel_jit(params)
        tot = np.zeros(6)
        vb = self.valid_batch_size
        for k in range(0, len(graphs), vb):
            batch = self.batch(graphs[k : k + vb])
            with precision():
                tot += np.asarray(self._eval_sums(params, self.stats, batch))
        loss = float(loss_from_sums(jnp.asarray(tot), self.lp))
        mae_on = tot[1] / max(tot[2], 1) * 1e3
        mae_off = tot[4] / max(tot[5], 1) * 1e3
        mae_all = (tot[1] + tot[4]) / max(tot[2] + tot[5], 1) * 1e3
        return loss, mae_on, mae_off, mae_all


# -- 4. checkpoints -----------------------------------------------------------
@dataclass
class TrainState:
    """What ``--resume`` restores: parameters, optimiser state, the next epoch,
    the metrics history and the best score so far."""

    params: Any
    opt_state: Any
    ema: Any = None  # moving average of params (training.ema_decay); params when off
    next_epoch: int = 1
    history: list[dict] = field(default_factory=list)
    best: float = math.inf
    step: int = 0  # optimiser steps taken
    lr_scale: float = 1.0  # the schedule's factor at the last step

    @property
    def weights(self):
        """The weights to validate and save: the moving average when there is one."""
        return self.ema if self.ema is not None else self.params

    @property
    def seconds(self) -> float:
        """Training seconds of the epochs done (for the budget)."""
        return float(sum(h["seconds"] for h in self.history))


def _json(value):
    return json.loads(json.dumps(value))


def _restore_tree(template, stored, what: str, path: Path):
    """``stored`` (a checkpoint's state dict) in the structure of ``template``,
    shapes checked: a :class:`CheckpointError` says what does not fit."""
    try:
        tree = serialization.from_state_dict(template, stored)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: the stored {what} do not fit the configured model ({err})"
        ) from None
    want = jax.tree_util.tree_flatten_with_path(template)[0]
    got = jax.tree_util.tree_leaves(tree)
    for (keypath, a), b in zip(want, got):
        if np.shape(a) != np.shape(b):
            raise CheckpointError(
                f"{path}: stored {what} {jax.tree_util.keystr(keypath)} has "
                f"shape {np.shape(b)}, the configured model expects "
                f"{np.shape(a)}"
            )
    return tree


def _difference(key: str, stored: dict, now: dict) -> str:
    """What differs between a checkpoint's settings or registry and this run's."""
    if key == "registry":
        entries = [
            [(e["symbol"], e["name"], list(e["l"])) for e in r["species"]] for r in (stored, now)
        ]
        return f"{entries[0]} in the checkpoint, {entries[1]} now"
    return ", ".join(
        f"{k}: {stored.get(k)!r} in the checkpoint, {now.get(k)!r} now"
        for k in sorted(set(stored) | set(now))
        if stored.get(k) != now.get(k)
    )


def _check_same_model(ck: dict, now: dict, where: str, advice: str = "") -> None:
    """A :class:`CheckpointError` unless the checkpoint ``ck`` was written for the
    registry and model settings in ``now``; ``where`` starts the message."""
    for key, what in (("registry", "elements and basis sets"), ("settings", "model settings")):
        stored, want = ck.get(key), _json(now[key])
        if stored != want:
            raise CheckpointError(
                f"{where} was trained with other {what} than the config and data give "
                f"({_difference(key, stored, want)}){advice}"
            )


class Checkpointer:
    """Step 4: ``model.ckpt`` (the best model so far), ``latest.ckpt`` (with the
    optimiser state, every ``training.checkpoint_every`` epochs, at the last
    epoch and when stopping early) and ``--resume`` from ``latest.ckpt``."""

    def __init__(self, run: Path, cfg: dict, data: TrainingData):
        self.best_path, self.latest = run / "model.ckpt", run / "latest.ckpt"
        self.every = cfg["training"]["checkpoint_every"]
        self.n_epochs = cfg["training"]["n_epochs"]
        self.common = dict(
            config=cfg,
            settings=_settings(cfg, data),
            registry=data.registry.to_dict(),
            stats=data.stats,
            basis=data.basis,
        )
        self.extra = {
            "n_train": len(data.train),
            "n_valid": len(data.valid),
            "train_names": [g.name for g in data.train],
            "valid_names": [g.name for g in data.valid],
        }
        self.coverage = data.coverage

    def load_latest(self) -> dict:
        """``latest.ckpt``, checked to have been written for the same model
        settings and registry as this run's (else :class:`CheckpointError`)."""
        ck = load_checkpoint(self.latest)
        _check_same_model(
            ck,
            self.common,
            f"--resume: {self.latest}",
            "; restore them or start a new run (another data.experiment or -o)",
        )
        return ck

    def restore(self, ck: dict, state: TrainState, steps: StepFunctions) -> TrainState:
        """``state`` (:meth:`StepFunctions.init_state`) continued from the checkpoint
        ``ck`` (:meth:`load_latest`), in the form of ``state`` on its devices."""

        def place(tree):
            return steps.replicate(steps.flats(tree))

        def template(x):
            return steps.trees(x)

        opt_state = (ck.get("state") or {}).get("opt_state")
        if opt_state is None:
            raise CheckpointError(
                f"--resume: {self.latest} holds no optimiser state (a model.ckpt copied over it?)"
            )
        extra = ck["extra"]
        raw = ck["state"].get("params")  # the training weights when params are an average
        restored = TrainState(
            params=place(
                _restore_tree(
                    template(state.params),
                    ck["params"] if raw is None else raw,
                    "parameter",
                    self.latest,
                )
            ),
            opt_state=place(
                _restore_tree(template(state.opt_state), opt_state, "optimiser state", self.latest)
            ),
            next_epoch=int(extra["epoch"]) + 1,
            history=extra["history"],
            best=float(extra["best"]),
            step=int(extra.get("step", 0)),
            lr_scale=float(extra.get("lr_scale", 1.0)),
        )
        if state.ema is not None:
            restored.ema = place(
                _restore_tree(template(state.ema), ck["params"], "averaged parameter", self.latest)
            )
        return restored

    def end_epoch(
        self,
        epoch: int,
        state: TrainState,
        score: float | None,
        stopping: bool = False,
        trees: Callable = jax.device_get,
    ) -> None:
        """Save ``model.ckpt`` when ``score`` improved on the best; ``latest.ckpt``
        when due; update ``state.best``.  ``trees`` gives the state's arrays on the
        host in the checkpoints' form (:meth:`StepFunctions.trees`)."""
        improved = score is not None and score < state.best
        extra = {
            "epoch": epoch,
            "history": state.history,
            "best": state.best if score is None else min(state.best, score),
            "step": state.step,
            "lr_scale": state.lr_scale,
            **self.extra,
            "coverage": self.coverage,
        }
        if improved:
            state.best = score
        latest = epoch % self.every == 0 or epoch == self.n_epochs or stopping
        if not (improved or latest):
            return
        # params: the weights to predict with (the moving average when there is one)
        common = dict(self.common, params=trees(state.weights), extra=extra)
        if improved:
            save_checkpoint(self.best_path, **common)
        if latest:
            resume = {"opt_state": trees(state.opt_state)}
            if state.ema is not None:
                resume["params"] = trees(state.params)
            save_checkpoint(self.latest, **common, state=resume)


# -- 5. metrics ---------------------------------------------------------------
def metrics_row(epoch: int, seconds: float, lr: float, train_loss: float, val) -> dict:
    """One row of ``metrics.csv`` (validation columns empty without validation)."""
    return {
        "epoch": epoch,
        "seconds": round(seconds, 3),
        "lr": lr,
        "train_loss": train_loss,
        "val_loss": val[0] if val else "",
        "val_mae_onsite_meV": val[1] if val else "",
        "val_mae_pair_meV": val[2] if val else "",
        "val_mae_all_meV": val[3] if val else "",
    }


class MetricsWriter:
    """Step 5: ``metrics.csv`` rewritten (atomically) after every epoch, and
    ``loss.png`` every ``plot_every`` epochs and at the end."""

    def __init__(self, run: Path, plot_every: int = 10):
        self.csv, self.png, self.plot_every = run / "metrics.csv", run / "loss.png", plot_every

    def end_epoch(self, epoch: int, history: list[dict]) -> None:
        _write_metrics(self.csv, history)
        if epoch % self.plot_every == 0:
            _plot_losses(self.png, history)

    def close(self, history: list[dict]) -> None:
        _plot_losses(self.png, history)


def _write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS)
    w.writeheader()
    w.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def _plot_losses(path: Path, history: list[dict]) -> None:
    """Training and validation loss, and validation H MAE, against the epoch."""
    ep = [h["epoch"] for h in history]
    fig, ax = new_figure(1, 2, figsize=(9, 3.5))
    ax[0].semilogy(ep, [h["train_loss"] for h in history], label="train loss")
    vl = [(h["epoch"], h["val_loss"]) for h in history if h["val_loss"] != ""]
    if vl:
        ax[0].semilogy(*zip(*vl), label="validation loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key, lab in (
        ("val_mae_onsite_meV", "on-site"),
        ("val_mae_pair_meV", "pair"),
        ("val_mae_all_meV", "all"),
    ):
        v = [(h["epoch"], h[key]) for h in history if h[key] != ""]
        if v:
            ax[1].semilogy(*zip(*v), label=lab)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation H MAE (meV)")
    if ax[1].lines:
        ax[1].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
