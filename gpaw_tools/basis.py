"""Basis-set metadata from a GPAW calculator: orbital counts, l, cut-off radii."""
from __future__ import annotations

import numpy as np
from ase.units import Bohr


def _basis_splines(setup):
    # today's GPAW: LeanSetup.basis_functions_J; classic: Setup.phit_j
    splines = getattr(setup, "basis_functions_J", None)
    if splines is None:
        splines = setup.phit_j
    return list(splines)


def setup_basis(setup, default_name: str | None = None) -> dict:
    """Basis description of one PAW setup (lengths in Angstrom)."""
    splines = _basis_splines(setup)
    ls = [int(s.get_angular_momentum_number()) for s in splines]
    rc = [float(s.get_cutoff() * Bohr) for s in splines]
    name = getattr(getattr(setup, "basis", None), "name", None) or default_name
    nao = int(setup.nao)
    if nao != sum(2 * l + 1 for l in ls):
        raise RuntimeError(f"{setup.symbol}: {nao} orbitals but radial functions with "
                           f"l = {ls}")
    return {
        "symbol": setup.symbol,
        "name": name,
        "l": ls,
        "rc": rc,
        "projector_rc": float(max(p.get_cutoff() for p in setup.pt_j) * Bohr)
        if len(setup.pt_j) else 0.0,
        "n_orbitals": nao,
    }


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
    counts, rc, rp = [], [], []
    for setup in calc.setups:
        info = setup_basis(setup, default)
        known = species.setdefault(info["symbol"], info)
        if known != info:
            raise ValueError(
                f"atoms of {info['symbol']} use different basis sets ({known['name']} and "
                f"{info['name']}); one basis per species is required")
        counts.append(info["n_orbitals"])
        rc.append(max(info["rc"]))
        rp.append(info["projector_rc"])
    return species, np.array(counts), np.array(rc), np.array(rp)
