"""Training: ``gearsh train config.yaml`` (see :mod:`ase_gearsh.config` for the keys).

Writes to ``<data.directory>/<data.experiment>/``: ``model.ckpt`` (best by
validation H MAE), ``latest.ckpt`` (everything needed by ``--resume``),
``metrics.csv`` (one row per epoch) and ``loss.png``.  Every checkpoint is
written atomically at the end of an epoch, so an interruption loses at most
the epoch in progress.
"""
from __future__ import annotations

import csv
import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np

from .config import check_config, load_config, model_settings
from .coverage import basis_for_registry, training_coverage
from .data import Dataset
from .engine import FAR, Model, pair_cutoff_matrix
from .graph import attach_labels, batch_graphs, build_graph, pad_size
from .layout import Layout, Registry

__all__ = ["train", "load_training_data", "TrainingError", "loss_from_sums"]

METRICS = ["epoch", "seconds", "lr", "train_loss", "val_loss", "val_mae_onsite_meV",
           "val_mae_pair_meV", "val_mae_all_meV"]


class TrainingError(RuntimeError):
    """Training cannot start or continue with this input."""


# -- data --------------------------------------------------------------------
def _paths(value):
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _read(paths, base: Path):
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_absolute():
            p = (base / p) if (base / p).exists() else p
        out.extend(Dataset(p))
    return out


def load_training_data(cfg: dict, base: Path = Path(".")):
    """Structures for training and validation (a split when no validation path)."""
    d = cfg["data"]
    train = _read(_paths(d["train_data_path"]), base)
    valid = _read(_paths(d["val_data_path"]), base)
    if not train:
        raise TrainingError(f"no structures found in data.train_data_path "
                            f"{d['train_data_path']!r}")
    if not valid:
        rng = np.random.default_rng(d["seed"])
        order = rng.permutation(len(train))
        n_valid = d["n_valid"] if d["n_valid"] is not None else max(1, len(train) // 5)
        if n_valid >= len(train):
            raise TrainingError(f"data.n_valid={n_valid} leaves no training structures "
                                f"(the dataset has {len(train)})")
        valid = [train[k] for k in order[:n_valid]]
        train = [train[k] for k in order[n_valid:]]
    for name, part, n in (("n_train", train, d["n_train"]), ("n_valid", valid, d["n_valid"])):
        if n is not None:
            if n > len(part):
                raise TrainingError(f"data.{name}={n} but only {len(part)} structures are "
                                    f"available")
            part[:] = part[:n]
    return train, valid


def _basis_data(structures, registry, log):
    """Basis functions and projectors for the exact overlap, stored in checkpoints."""
    from gpaw_tools.overlap import BasisDataError
    meta = structures[0].meta
    xc = meta.get("xc")
    setups = (meta.get("gpaw", {}).get("parameters") or {}).get("setups", "paw")
    try:
        basis = basis_for_registry(registry, xc, setups)
    except (BasisDataError, ImportError) as err:
        log(f"warning: basis functions not stored in the checkpoint ({err}); the ASE "
            f"calculator will need them (gearsh attach-basis)")
        return None
    return {sym: b.to_dict() for sym, b in basis.items()}


def _graphs(structures, make_graph, layout, desc=""):
    from tqdm.auto import tqdm
    graphs, outside, outside_max = [], 0, 0.0
    for s in tqdm(structures, desc=desc, unit="structure", leave=False):
        g = make_graph(s.atoms, name=s.meta["source"]["name"])
        info = attach_labels(g, s, layout)
        outside += info["outside"]
        outside_max = max(outside_max, info["outside_max"])
        graphs.append(g)
    return graphs, outside, outside_max


# -- loss ---------------------------------------------------------------------
def _sums(pred_on, pred_pair, b, orbital_mask):
    import jax.numpy as jnp
    m = orbital_mask[b["species"]]
    m_on = (m[:, :, None] & m[:, None, :]).astype(pred_on.dtype)
    mp = orbital_mask[b["species"][b["pair_i"]]][:, :, None] & \
        orbital_mask[b["species"][b["pair_j"]]][:, None, :]
    m_off = mp.astype(pred_pair.dtype) * b["pair_weight"][:, None, None]
    e_on = (pred_on - b["onsite"]) * m_on
    e_off = (pred_pair - b["pairs"]) * m_off
    return jnp.stack([(e_on ** 2).sum(), jnp.abs(e_on).sum(), m_on.sum(),
                      (e_off ** 2).sum(), jnp.abs(e_off).sum(), m_off.sum()])


def loss_from_sums(s, lp):
    """Weighted MSE + RMSE (paper listing 6) from summed squared errors and counts."""
    import jax.numpy as jnp
    mse_on = s[0] / jnp.maximum(s[2], 1.0)
    mse_off = s[3] / jnp.maximum(s[5], 1.0)
    term = lambda mse: lp["mse_weight"] * mse + lp["rmse_weight"] * jnp.sqrt(mse + 1e-12)  # noqa
    return lp["loss_multiplier"] * (lp["on_diagonal_weight"] * term(mse_on)
                                    + lp["off_diagonal_weight"] * term(mse_off))


# -- batching -----------------------------------------------------------------
def _subsample(g, fraction, alpha, rng):
    """The graph with a random subset of its bonds (``data.bond_fraction``)."""
    from dataclasses import replace
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
    return replace(g, pair_i=g.pair_i[pick], pair_j=g.pair_j[pick],
                   pair_shift=g.pair_shift[pick], pair_vec=g.pair_vec[pick],
                   pairs=g.pairs[pick])


def _shards(graphs, n_dev, am, nm):
    """Split a batch over devices, pad every shard to one common shape, stack."""
    parts = [graphs[k::n_dev] for k in range(n_dev)]
    sizes = [(sum(g.n_atoms for g in p), sum(len(g.edge_i) for g in p),
              sum(len(g.pair_i) for g in p)) for p in parts]
    N = pad_size(max(s[0] for s in sizes), am)
    E = pad_size(max(s[1] for s in sizes), nm)
    P = pad_size(max(s[2] for s in sizes), nm)
    out = []
    for p in parts:
        b = batch_graphs(p, am, nm, far=FAR, sizes=(N, E, P)) if p else \
            batch_graphs(graphs[:1], am, nm, far=FAR, sizes=(N, E, P))
        w = np.zeros(P, np.float32)
        w[:sum(len(g.pair_i) for g in p)] = 1.0
        if not p:  # an empty shard contributes nothing
            b["species"][:] = 0
            w[:] = 0
        b["pair_weight"] = w
        out.append(b)
    return {k: np.stack([b[k] for b in out]) for k in out[0]}


# -- optimiser ----------------------------------------------------------------
def _optimizer(cfg, steps_per_epoch, log):
    import optax
    o = cfg["optimizer"]
    make = getattr(optax, o["name"], None)
    if make is None or not callable(make):
        raise TrainingError(f"optimizer.name {o['name']!r} is not an optax optimizer "
                            f"(e.g. adan, lamb, adamw, adam)")
    try:
        base = make(learning_rate=o["lr"], **o["opt_kwargs"])
    except TypeError as err:
        raise TrainingError(f"optimizer.opt_kwargs {o['opt_kwargs']} do not fit "
                            f"optax.{o['name']}: {err}") from None
    parts = []
    if o["grad_clip"]:
        parts.append(optax.clip_by_global_norm(float(o["grad_clip"])))
    parts.append(base)
    sch = o["schedule"]
    if sch["name"] == "reduce_on_plateau":
        acc = sch["accumulation_size"]
        if acc is not None and acc != steps_per_epoch:
            log(f"note: schedule.accumulation_size={acc} replaced by the steps per epoch "
                f"({steps_per_epoch}): the plateau is judged once per epoch")
        from optax import contrib
        parts.append(contrib.reduce_on_plateau(
            factor=sch["factor"], patience=sch["patience"], rtol=sch["rtol"],
            atol=sch["atol"], cooldown=sch["cooldown"], accumulation_size=steps_per_epoch,
            min_scale=sch["min_scale"]))
    return optax.chain(*parts)


def _lr_scale(opt_state):
    for s in opt_state:
        if hasattr(s, "scale") and hasattr(s, "plateau_count"):
            return float(s.scale)
    return 1.0


# -- training -----------------------------------------------------------------
def train(config, resume: bool = False, output=None, log=print, progress: bool = True) -> Path:
    """Train a model; returns the run directory.  ``config`` is a path or a dict."""
    from .checkpoint import load_checkpoint, save_checkpoint
    if isinstance(config, (str, Path)):
        base = Path(config).resolve().parent
        cfg = load_config(config)
    else:
        base = Path(".")
        cfg = check_config(config)
    run = Path(output) if output else Path(cfg["data"]["directory"]) / cfg["data"]["experiment"]
    if not run.is_absolute() and not output:
        run = base / run
    run.mkdir(parents=True, exist_ok=True)
    latest, best_path = run / "latest.ckpt", run / "model.ckpt"
    if latest.exists() and not resume:
        raise TrainingError(f"{run} already holds a training run (latest.ckpt); pass --resume "
                            f"to continue it or choose another data.experiment / -o")
    if resume and not latest.exists():
        raise TrainingError(f"--resume: no latest.ckpt in {run}")

    import jax
    import jax.numpy as jnp
    import optax
    from flax import serialization
    jax.config.update("jax_default_matmul_precision", "highest")

    d, tcfg = cfg["data"], cfg["training"]
    train_s, valid_s = load_training_data(cfg, base)
    registry = Registry.from_structures(train_s)
    for s in valid_s:  # one layout for both sets: validation may not add elements
        registry.check_basis(s.basis, f"validation structure {s.meta['source']['name']}")
    layout = Layout(registry)
    bond = cfg["model"]["bond_centered"]
    if layout.lmax > bond["max_basis_degree"]:
        raise TrainingError(f"the basis sets have l={layout.lmax} but "
                            f"model.bond_centered.max_basis_degree={bond['max_basis_degree']}")
    pc = pair_cutoff_matrix(registry, bond["cutoff"])
    maker = partial(build_graph, registry=registry, pair_cutoff=pc,
                    cutoff=cfg["model"]["atom_centered"]["descriptor"]["radial_basis"]["cutoff"])
    tg, out_t, max_t = _graphs(train_s, maker, layout, "training labels")
    vg, out_v, max_v = _graphs(valid_s, maker, layout, "validation labels")
    rc_sum = float(np.max(registry.rc[1:, None] + registry.rc[None, 1:]))
    if bond["cutoff"] < rc_sum:
        log(f"note: bond cutoff {bond['cutoff']} A < largest rc_i + rc_j = {rc_sum:.2f} A; "
            f"pairs beyond it are predicted as zero")
    if out_t + out_v:
        log(f"{out_t + out_v} stored blocks lie beyond the bond cut-offs (largest |H| "
            f"{max(max_t, max_v) * 1e3:.3g} meV); they are predicted as zero")
    from .statistics import fit_statistics
    stats = fit_statistics(tg, layout, pc)
    coverage = training_coverage(tg, registry.n_species)
    basis = _basis_data(train_s, registry, log)
    settings = model_settings(cfg, registry.n_species, layout.lmax_out, layout.n_features)
    model = Model(settings, registry, stats, None, cfg)
    params = model.init_params(tcfg["seed"])

    n_dev = len(jax.devices()) if tcfg["num_devices"] == "all" else int(tcfg["num_devices"])
    if n_dev > len(jax.devices()):
        raise TrainingError(f"training.num_devices={n_dev} but JAX sees "
                            f"{len(jax.devices())} device(s)")
    bs = d["batch_size"]
    if bs < n_dev:
        raise TrainingError(f"data.batch_size={bs} is smaller than training.num_devices="
                            f"{n_dev}: every device needs at least one structure per step")
    steps = max(1, len(tg) // bs)
    tx = _optimizer(cfg, steps, log)
    opt_state = tx.init(params)
    lp = cfg["loss"]["loss_parameters"]
    orbital_mask = jnp.asarray(layout.orbital_mask)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, repl)
    opt_state = jax.device_put(opt_state, repl)

    stats_dev = jax.device_put({k: jnp.asarray(v) for k, v in stats.items()}, repl)

    def sums_fn(p, st, batch):
        def one(b):
            on, pr = model._blocks(p, st, b)
            return _sums(on, pr, b, orbital_mask)
        return jax.vmap(one)(batch).sum(axis=0)

    def loss_fn(p, st, batch):
        s = sums_fn(p, st, batch)
        return loss_from_sums(s, lp), s

    @jax.jit
    def step(p, o, st, batch):
        (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, st, batch)
        updates, o = tx.update(grads, o, p, value=loss)
        return optax.apply_updates(p, updates), o, loss, s

    eval_sums = jax.jit(sums_fn)

    start_epoch, history, best = 1, [], math.inf
    if resume:
        ck = load_checkpoint(latest)
        st = ck.get("state", {})
        params = jax.device_put(serialization.from_state_dict(params, ck["params"]), repl)
        opt_state = jax.device_put(serialization.from_state_dict(opt_state, st["opt_state"]),
                                   repl)
        start_epoch = int(ck["extra"]["epoch"]) + 1
        history = ck["extra"]["history"]
        best = float(ck["extra"]["best"])
        log(f"resuming after epoch {start_epoch - 1}")
    (run / "config.json").write_text(json.dumps(cfg, indent=1))
    registry_d = registry.to_dict()

    def to_device(batch):
        return {k: jax.device_put(jnp.asarray(v), shard) for k, v in batch.items()}

    def validate(p):
        if not vg:
            return None
        tot = np.zeros(6)
        vb = max(d["valid_batch_size"], n_dev)
        for k in range(0, len(vg), vb):
            tot += np.asarray(eval_sums(p, stats_dev, to_device(_shards(vg[k:k + vb], n_dev,
                                                             d["atoms_pad_multiple"],
                                                             d["nl_pad_multiple"]))))
        loss = float(loss_from_sums(jnp.asarray(tot), lp))
        mae_on = tot[1] / max(tot[2], 1) * 1e3
        mae_off = tot[4] / max(tot[5], 1) * 1e3
        mae_all = (tot[1] + tot[4]) / max(tot[2] + tot[5], 1) * 1e3
        return loss, mae_on, mae_off, mae_all

    from tqdm.auto import tqdm
    t0 = time.time()
    deadline = t0 + 60 * tcfg["max_minutes"] if tcfg["max_minutes"] else None
    bar = tqdm(range(start_epoch, tcfg["n_epochs"] + 1), desc="training", unit="epoch",
               disable=not progress, initial=start_epoch - 1, total=tcfg["n_epochs"])
    for epoch in bar:
        rng = np.random.default_rng([d["seed"], epoch])
        order = rng.permutation(len(tg))
        losses, te = [], time.time()
        for k in range(steps):
            chosen = [_subsample(tg[i], d["bond_fraction"], d["sampling_alpha"], rng)
                      for i in order[k * bs:(k + 1) * bs]]
            batch = to_device(_shards(chosen, n_dev, d["atoms_pad_multiple"],
                                      d["nl_pad_multiple"]))
            params, opt_state, loss, _ = step(params, opt_state, stats_dev, batch)
            losses.append(float(loss))
        if not np.all(np.isfinite(losses)):
            raise TrainingError(f"epoch {epoch}: the loss became {losses[-1]}; lower "
                                f"optimizer.lr or set optimizer.grad_clip")
        train_loss = float(np.mean(losses))
        last = epoch == tcfg["n_epochs"] or bool(deadline and time.time() > deadline)
        val = validate(params) if vg and (epoch % tcfg["valid_every"] == 0 or last) else None
        row = {"epoch": epoch, "seconds": round(time.time() - te, 3),
               "lr": cfg["optimizer"]["lr"] * _lr_scale(opt_state),
               "train_loss": train_loss, "val_loss": val[0] if val else "",
               "val_mae_onsite_meV": val[1] if val else "",
               "val_mae_pair_meV": val[2] if val else "",
               "val_mae_all_meV": val[3] if val else ""}
        history.append(row)
        # best model: by validation H MAE when there is a validation set
        score = val[3] if val else (None if vg else train_loss)
        improved = score is not None and score < best
        extra = {"epoch": epoch, "history": history,
                 "best": best if score is None else min(best, score),
                 "n_train": len(tg), "n_valid": len(vg),
                 "train_names": [g.name for g in tg], "valid_names": [g.name for g in vg]}
        common = dict(config=cfg, settings=settings, registry=registry_d, stats=stats,
                      params=jax.device_get(params), extra=dict(extra, coverage=coverage),
                      basis=basis)
        if improved:
            best = score
            save_checkpoint(best_path, **common)
        if epoch % tcfg["checkpoint_every"] == 0 or epoch == tcfg["n_epochs"]:
            save_checkpoint(latest, **common,
                            state={"opt_state": jax.device_get(opt_state)})
        _write_metrics(run / "metrics.csv", history)
        if epoch % 10 == 0:
            _plot_losses(run / "loss.png", history)
        bar.set_postfix(loss=f"{train_loss:.3g}",
                        val_mae=f"{val[3]:.3g} meV" if val else "-")
        if last and epoch < tcfg["n_epochs"]:
            save_checkpoint(latest, **common, state={"opt_state": jax.device_get(opt_state)})
            log(f"stopping after epoch {epoch}: training.max_minutes reached")
            break
    bar.close()
    _plot_losses(run / "loss.png", history)
    return run


def _write_metrics(path: Path, history):
    from .schema import atomic_write_bytes
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS)
    w.writeheader()
    w.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def _plot_losses(path: Path, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].semilogy(ep, [h["train_loss"] for h in history], label="train loss")
    vl = [(h["epoch"], h["val_loss"]) for h in history if h["val_loss"] != ""]
    if vl:
        ax[0].semilogy(*zip(*vl), label="validation loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key, lab in (("val_mae_onsite_meV", "on-site"), ("val_mae_pair_meV", "pair"),
                     ("val_mae_all_meV", "all")):
        v = [(h["epoch"], h[key]) for h in history if h[key] != ""]
        if v:
            ax[1].semilogy(*zip(*v), label=lab)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation H MAE (meV)")
    if ax[1].lines:
        ax[1].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
