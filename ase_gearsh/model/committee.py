"""Committees: several trained parameter sets of one network in one checkpoint.

``gearsh committee A.ckpt B.ckpt -o AB.ckpt`` (:func:`build_committee`) keeps the first
checkpoint as it is (config, settings, registry, basis, coverage, reliability reference)
and stores the parameters and statistics of the others as its further ``members``.
Prediction (:class:`~ase_gearsh.model.inference.Predictor`, hence ``gearsh eval``,
``gearsh predict`` and the calculator) returns the mean of the members' blocks, which is
as equivariant and as exactly symmetric as each member's, and the members' spread
(``committee_spread``).  Members must share the network settings and the basis registry;
they differ in their training (seed, data order, data), so a committee of models
trained side by side on separate cores uses a machine's cores for accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.io import atomic_write_bytes
from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["build_committee"]


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def build_committee(paths, output) -> Path:
    """Write the committee of the checkpoints ``paths`` (two or more; a committee among
    them contributes all its members) to ``output``, atomically.  Raises
    :class:`~ase_gearsh.model.checkpoint.CheckpointError` when a file is not a checkpoint
    or the networks differ (settings, registry, basis functions)."""
    from flax import serialization

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise CheckpointError(f"a committee needs two or more checkpoints, got {len(paths)}")
    output = Path(output)
    if output.is_dir():
        raise CheckpointError(f"output {str(output)!r} is a directory; expected a file name")
    checked = [load_checkpoint(p) for p in paths]  # readable, complete, this format
    first = checked[0]
    for p, ck in zip(paths[1:], checked[1:]):
        for key in ("settings", "registry"):
            diff = _differences(first[key], ck[key])
            if diff:
                raise CheckpointError(
                    f"{p}: network {key} differ from those of {paths[0]} "
                    f"({', '.join(diff)}); committee members must share the network"
                )
        if first.get("basis") and ck.get("basis") and not _same_basis(first["basis"], ck["basis"]):
            raise CheckpointError(
                f"{p}: basis functions differ from those of {paths[0]} (another functional or "
                f"basis set); committee members must share the basis"
            )
    raw = [serialization.msgpack_restore(p.read_bytes()) for p in paths]
    payload = raw[0]
    members, sources = [], []
    for p, r, ck in zip(paths, raw, checked):
        nested = r.get("members") or {}
        members.append({"params": r["params"], "stats": r["stats"]})
        members.extend(nested[k] for k in sorted(nested, key=int))
        recorded = ck["extra"].get("committee") if nested else None
        if isinstance(recorded, list) and len(recorded) == 1 + len(nested):
            sources.extend(recorded)  # a committee's own record of its members
        else:
            seed = (ck["config"].get("training") or {}).get("seed")
            sources.extend([{"file": p.name, "seed": seed}] * (1 + len(nested)))
    payload["members"] = {str(i): m for i, m in enumerate(members[1:])}
    payload.pop("state", None)  # a resume state belongs to one training run
    extra = dict(first["extra"], committee=sources)
    payload["extra"] = json.dumps(extra)
    atomic_write_bytes(output, serialization.msgpack_serialize(payload))
    return output


def _same_basis(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for sym in a:
        fa, fb = a[sym].get("basis") or {}, b[sym].get("basis") or {}
        if set(fa) != set(fb):
            return False
        for k in fa:
            va, vb = np.asarray(fa[k]["values"]), np.asarray(fb[k]["values"])
            if va.shape != vb.shape or not np.allclose(va, vb):
                return False
    return True
