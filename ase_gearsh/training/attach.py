"""``gearsh attach-basis``: add basis functions (and training coverage) to a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from flax import serialization

from gpaw_tools.overlap import basis_for_registry

from ..core.basis import BasisDataError, Registry
from ..core.data import Dataset
from ..core.io import atomic_write_bytes
from ..model.checkpoint import CheckpointError, basis_payload, load_checkpoint
from ..model.coverage import training_coverage
from ..model.engine import pair_cutoff_matrix
from ..model.graph import build_graph

__all__ = ["attach_basis"]


def attach_basis(
    path: str | Path,
    xc: str = "PBE",
    setups: str = "paw",
    output: str | Path | None = None,
    dataset: str | Path | None = None,
) -> Path:
    """Store basis functions (from the installed GPAW data) in a checkpoint that
    lacks them, checked against its registry; with ``dataset`` also the training
    coverage (shortest bonds, most neighbours) of the structures the model was
    trained on (``extra.train_names``).  Atomic rewrite of ``output`` (default:
    in place)."""
    ck = load_checkpoint(path)
    registry = Registry.from_dict(ck["registry"])
    try:
        basis = basis_for_registry(registry, xc, setups)
    except NameError as err:  # GPAW's answer to an unknown functional
        raise BasisDataError(
            f"xc={xc!r} is not a functional GPAW knows ({err}); pass the "
            f"functional of the training data, e.g. PBE"
        ) from None
    payload = serialization.msgpack_restore(Path(path).read_bytes())
    payload["basis"] = basis_payload({s: b.to_dict() for s, b in basis.items()})
    if dataset is not None:
        names = set(ck["extra"].get("train_names") or [])
        if not names:
            raise CheckpointError(
                f"{path}: no training structure names stored; cannot "
                f"tell which structures of {dataset} were trained on"
            )
        pc = pair_cutoff_matrix(registry, ck["settings"]["bond_cutoff"])
        graphs = [
            build_graph(
                s.atoms, registry.species_index(s.atoms.numbers), ck["settings"]["cutoff"], pc
            )
            for s in Dataset(dataset)
            if s.meta["source"]["name"] in names
        ]
        if len(graphs) != len(names):
            raise CheckpointError(
                f"{dataset} holds {len(graphs)} of the {len(names)} training structures of {path}"
            )
        extra = dict(ck["extra"], coverage=training_coverage(graphs, registry.n_species))
        payload["extra"] = json.dumps(extra)
    out = Path(output or path)
    atomic_write_bytes(out, serialization.msgpack_serialize(payload))
    return out
