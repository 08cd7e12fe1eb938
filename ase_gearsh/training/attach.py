"""Add to an existing checkpoint what inference needs besides the network:
``gearsh attach-basis`` (basis functions and training coverage) and
``gearsh attach-reliability`` (the reference of the reliability figure)."""

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
from ..model.engine import load_model, pair_cutoff_matrix
from ..model.graph import build_graph
from ..model.reliability import ReliabilityError, fit_reliability

__all__ = ["attach_basis", "attach_reliability", "dataset_structures"]


def attach_basis(
    path: str | Path,
    xc: str = "PBE",
    setups: str = "paw",
    output: str | Path | None = None,
    dataset: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Store basis functions (from the installed GPAW data) in a checkpoint that
    lacks them, checked against its registry; with ``dataset`` also the training
    coverage (shortest bonds, fewest and most neighbours) of the structures the
    model was trained on (``extra.train_names``).  Atomic rewrite of ``output``
    (default: in place).  A functional ``xc`` other than the one the checkpoint's
    basis or the dataset records is refused unless ``force``."""
    ck = load_checkpoint(path)
    _check_output_file(output)
    known = _training_xc(ck, dataset)
    if known is not None and known[0].lower() != str(xc).lower() and not force:
        raise BasisDataError(
            f"xc={xc!r} differs from the functional of the training data ({known[0]!r}, "
            f"recorded in {known[1]}); the overlap and basis would not match the model. "
            f"Pass --xc {known[0]}, or --force to store {xc} anyway"
        )
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


def _check_output_file(output) -> None:
    """A checkpoint path to write: not a folder, its folder exists."""
    if output is None:
        return
    out = Path(output)
    if out.is_dir():
        raise CheckpointError(f"output {out} is a folder; expected a checkpoint file name")
    if not out.parent.is_dir():
        raise CheckpointError(f"output {out}: folder {out.parent} does not exist")


def _training_xc(ck: dict, dataset) -> tuple[str, str] | None:
    """(functional, where it is recorded) of a model's training data, if known: the
    checkpoint's stored basis, else the first structure of ``dataset``."""
    for sym, d in (ck.get("basis") or {}).items():
        if isinstance(d, dict) and d.get("xc"):
            return str(d["xc"]), f"the checkpoint's basis of {sym}"
    if dataset is not None:
        for s in Dataset(dataset):
            if s.meta.get("xc"):
                return str(s.meta["xc"]), f"{dataset}"
            break
    return None


def attach_reliability(
    path: str | Path,
    structures_or_graphs,
    output: str | Path | None = None,
    *,
    max_reference: int = 128,
    n_components: int = 8,
    quantile: float = 0.99,
    progress: bool = False,
) -> dict:
    """Fit the reliability reference of the checkpoint's model on its training
    structures and store it in ``extra["reliability"]``; atomic rewrite of
    ``output`` (default: in place), every other field kept as it is.

    ``structures_or_graphs``: an iterable (read once) of
    :class:`~ase_gearsh.model.graph.Graph` (built with this model's registry, as
    training builds them), ``ase.Atoms`` or dataset structures.  Options: see
    :func:`~ase_gearsh.model.reliability.fit_reliability`.  Returns the reference
    (a JSON-ready dict).  The model is the one loaded for ``path`` in this process
    (:func:`~ase_gearsh.model.engine.load_model`), compiled stages included."""
    model = load_model(path)
    ref = fit_reliability(
        model,
        structures_or_graphs,
        max_reference=max_reference,
        n_components=n_components,
        quantile=quantile,
        progress=progress,
    )
    payload = serialization.msgpack_restore(Path(path).read_bytes())
    extra = dict(json.loads(payload["extra"]), reliability=ref)
    payload["extra"] = json.dumps(extra)
    atomic_write_bytes(Path(output or path), serialization.msgpack_serialize(payload))
    return ref


def dataset_structures(datasets, names=None, model_path: str | Path = "the model"):
    """The structures of dataset folders ``datasets`` (one path or several), read one
    at a time; with ``names`` only those whose source name is in it (the
    checkpoint's ``extra["train_names"]``), and a :class:`ReliabilityError` at the
    end if none was."""
    if isinstance(datasets, (str, Path)):
        datasets = [datasets]
    folders = [Dataset(d) for d in datasets]  # missing folders fail before any work
    kept = seen = 0
    for ds in folders:
        for s in ds:
            seen += 1
            if names is None or s.meta["source"]["name"] in names:
                kept += 1
                yield s
    if not kept:
        where = ", ".join(str(ds.path) for ds in folders)
        if names is None:
            raise ReliabilityError(f"{where}: no structures")
        raise ReliabilityError(
            f"none of the {seen} structures of {where} is among the {len(names)} training "
            f"structures of {model_path}; pass the training data, or use every structure "
            f"(--all-structures)"
        )
