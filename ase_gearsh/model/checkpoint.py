"""One-file model checkpoints (msgpack: arrays and JSON text, never code).

A checkpoint holds the config, network settings, basis registry, scale-shift
statistics, parameters, package versions and (for ``latest.ckpt``) the
optimiser and data-order state needed to resume; a committee
(:mod:`~ase_gearsh.model.committee`) also the parameters and statistics of its further
members (``members``).  Writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.errors import GearsHError
from ..core.io import atomic_write_bytes

__all__ = [
    "CKPT_FORMAT",
    "CKPT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "versions",
    "basis_payload",
]

CKPT_FORMAT = "gearsh-model"
CKPT_VERSION = 1


class CheckpointError(GearsHError, ValueError):
    """A missing, corrupt or incompatible checkpoint."""


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("ase-gearsh", "jax", "e3x", "flax", "optax", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(k): _to_numpy(v) for k, v in enumerate(tree)}
    if tree is None:
        return {}
    return np.asarray(tree)


def basis_payload(basis: dict) -> dict:
    """{symbol: SpeciesBasis.to_dict()} with lists as index-keyed dicts (msgpack)."""
    out = {}
    for sym, d in basis.items():
        d = dict(d)
        for key in ("basis", "projectors"):
            d[key] = {
                str(k): {
                    "l": int(f["l"]),
                    "rmax": float(f["rmax"]),
                    "values": np.asarray(f["values"], float),
                }
                for k, f in enumerate(d[key])
            }
        d["dO"] = np.asarray(d["dO"], float)
        out[str(sym)] = d
    return out


def save_checkpoint(
    path,
    *,
    config: dict,
    settings: dict,
    registry: dict,
    stats: dict,
    params,
    extra: dict | None = None,
    state: dict | None = None,
    basis: dict | None = None,
) -> None:
    """Write a checkpoint atomically.  ``params``/``state`` are pytrees of arrays.

    ``basis``: {symbol: ase_gearsh.core.basis.SpeciesBasis.to_dict()}, the basis
    functions and PAW projectors from which the exact overlap S is computed at
    inference time.
    """
    from flax import serialization

    payload = {
        "format": CKPT_FORMAT,
        "version": CKPT_VERSION,
        "config": json.dumps(config),
        "settings": json.dumps(settings),
        "registry": json.dumps(registry),
        "versions": json.dumps(versions()),
        "extra": json.dumps(extra or {}),
        "stats": _pack_stats(stats),
        "params": _to_numpy(serialization.to_state_dict(params)),
    }
    if basis:
        payload["basis"] = basis_payload(basis)
    if state is not None:
        payload["state"] = _to_numpy(serialization.to_state_dict(state))
    atomic_write_bytes(Path(path), serialization.msgpack_serialize(payload))


def load_checkpoint(path) -> dict:
    """Read and check a checkpoint; JSON fields are decoded."""
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    data = path.read_bytes()
    try:
        payload = serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several types on garbage
        raise CheckpointError(
            f"{path}: not a readable GEARS H checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise CheckpointError(
            f"{path}: not a GEARS H checkpoint (format "
            f"{payload.get('format') if isinstance(payload, dict) else None!r},"
            f" expected {CKPT_FORMAT!r})"
        )
    if payload.get("version") != CKPT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('version')}; "
            f"this ase_gearsh reads version {CKPT_VERSION}. Retrain, or use "
            f"the ase_gearsh release listed in the file's versions"
        )
    try:
        for key in ("config", "settings", "registry", "versions", "extra"):
            payload[key] = json.loads(payload[key])
        for key in ("stats", "params"):
            if not isinstance(payload[key], dict):
                raise KeyError(key)
        payload["stats"] = _unpack_stats(payload["stats"])
        members = payload.get("members") or {}
        if not isinstance(members, dict):
            raise KeyError("members")
        for key, m in members.items():
            int(key)  # member keys are indices
            if not isinstance(m.get("params"), dict) or not isinstance(m.get("stats"), dict):
                raise KeyError(f"members.{key}")
            m["stats"] = _unpack_stats(m["stats"])
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: checkpoint is incomplete or corrupt ({err})") from None
    return payload


def _pack_stats(stats: dict) -> dict:
    """Statistics as stored: the baseline table (mostly zero channels: padding species,
    unused (parity, L, feature) slots) as its non-zero radial functions and their
    indices; everything else as is."""
    out = {k: np.asarray(v) for k, v in stats.items() if k != "pair_baseline"}
    if "pair_baseline" in stats:
        t = np.asarray(stats["pair_baseline"])  # (S, S, G, 2, L, F)
        moved = np.moveaxis(t, 2, -1)  # (S, S, 2, L, F, G)
        idx = np.argwhere(np.abs(moved).max(axis=-1) > 0).astype(np.int32)
        out["pair_baseline_shape"] = np.asarray(t.shape, np.int64)
        out["pair_baseline_index"] = idx
        out["pair_baseline_values"] = moved[tuple(idx.T)].astype(np.float32)
    return out


def _unpack_stats(stats: dict) -> dict:
    if "pair_baseline_values" not in stats:
        return stats
    stats = dict(stats)
    shape = tuple(int(x) for x in stats.pop("pair_baseline_shape"))
    idx = np.asarray(stats.pop("pair_baseline_index"), np.int64).reshape(-1, 5)
    vals = np.asarray(stats.pop("pair_baseline_values"), np.float32)
    moved = np.zeros(shape[:2] + shape[3:] + shape[2:3], np.float32)
    moved[tuple(idx.T)] = vals
    stats["pair_baseline"] = np.moveaxis(moved, -1, 2)
    return stats
