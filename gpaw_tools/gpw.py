"""Opening GPAW restart files (.gpw) safely, with clear errors.

Works for files written by today's GPAW (``gpaw.GPAW``) and by the classic
calculator (``gpaw.calculator.GPAW``).  GPAW is imported only when a file is
actually opened.
"""

from __future__ import annotations

from pathlib import Path

from ase_gearsh.core.errors import GearsHError

ULM_MAGIC = b"- of Ulm"


class GPWError(GearsHError, ValueError):
    """A file cannot be used as an LCAO GPAW restart file."""


def read_parameters(path) -> dict:
    """Check that ``path`` is a readable LCAO .gpw file; return its parameters.

    Only the file header is read: no calculator is built.  The GPAW version
    that wrote the file is added as ``"_gpaw_version"``.
    """
    path = Path(path)
    if not path.exists():
        raise GPWError(f"{str(path)!r}: no such file")
    if not path.is_file():
        raise GPWError(f"{str(path)!r}: expected a GPAW .gpw file, got a directory")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head.startswith(ULM_MAGIC):
        raise GPWError(
            f"{str(path)!r}: not a GPAW restart file: expected a ULM file starting with "
            f"{ULM_MAGIC!r}, found {head[:8]!r}"
        )
    import ase.io.ulm as ulm

    try:
        with ulm.open(str(path)) as reader:
            tag = reader.get_tag() if hasattr(reader, "get_tag") else "gpaw"
            params = reader.parameters.asdict()
            keys = set(reader.keys())
            writer = getattr(reader, "gpaw_version", None)
    except Exception as err:  # ULM raises many kinds on damaged files
        raise GPWError(f"{str(path)!r}: unreadable or truncated GPAW file ({err})") from err
    if tag.lower() != "gpaw":
        raise GPWError(f"{str(path)!r}: ULM file of type {tag!r}, expected a GPAW restart file")
    if "wave_functions" not in keys:
        raise GPWError(
            f"{str(path)!r}: the file holds no wave functions; write it after "
            "the SCF has run (calc.write('run.gpw'))"
        )
    mode = params.get("mode", "fd")
    name = mode.get("name") if isinstance(mode, dict) else str(mode)
    if name != "lcao":
        raise GPWError(
            f"{str(path)!r}: mode {name!r}: expected an LCAO run (mode='lcao'); plane-wave "
            "and finite-difference runs have no Hamiltonian in an atomic-orbital basis"
        )
    params["_gpaw_version"] = writer
    return params


def open_calculator(path, checked: bool = False):
    """Restart a GPAW calculator from an LCAO .gpw file (no SCF is run).

    ``checked``: the file already passed :func:`read_parameters`.
    """
    if not checked:
        read_parameters(path)
    from gpaw import GPAW

    try:
        return GPAW(str(path), txt=None)
    except Exception as err:
        raise GPWError(
            f"{str(path)!r}: GPAW could not restart from this file; it may be "
            f"truncated or written by an incompatible GPAW ({err})"
        ) from err
