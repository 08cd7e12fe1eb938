"""Basis-set metadata from a GPAW calculator: orbital counts, l, cut-off radii."""

from __future__ import annotations

import numpy as np

from .overlap import species_from_setup


def setup_basis(setup, default_name: str | None = None) -> dict:
    """Basis description of one PAW setup (lengths in Angstrom):
    :meth:`ase_gearsh.core.basis.SpeciesBasis.summary` of the setup."""
    name = getattr(getattr(setup, "basis", None), "name", None) or default_name
    sb = species_from_setup(setup, name=name)
    if int(setup.nao) != sb.n_orbitals:
        raise RuntimeError(
            f"{setup.symbol}: {int(setup.nao)} orbitals but radial functions with l = {sb.l}"
        )
    return sb.summary()


def calculator_basis(calc) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Per-species basis dict, and per-atom orbital counts, basis and projector radii.

    Orbital order within an atom is GPAW's: radial function, then m = -l..l in
    GPAW's real spherical harmonics.
    """
    params = calc.parameters
    basis_param = params.get("basis", None) if hasattr(params, "get") else None
    default = None
    if isinstance(basis_param, str):
        default = basis_param
    elif isinstance(basis_param, dict):
        default = basis_param.get("default")
    species: dict[str, dict] = {}
    seen: dict[int, dict] = {}
    counts, rc, rp = [], [], []
    for setup in calc.setups:
        if id(setup) not in seen:  # atoms of one species share their setup object
            seen[id(setup)] = setup_basis(setup, default)
        info = seen[id(setup)]
        known = species.setdefault(info["symbol"], info)
        if known != info:
            raise ValueError(
                f"atoms of {info['symbol']} use different basis sets ({known['name']} and "
                f"{info['name']}); one basis per species is required"
            )
        counts.append(info["n_orbitals"])
        rc.append(max(info["rc"]))
        rp.append(info["projector_rc"])
    return species, np.array(counts), np.array(rc), np.array(rp)
