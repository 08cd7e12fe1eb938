"""Descriptions of a species' basis set, and the model's species registry (numpy, ASE).

One description at two levels of detail:

* :class:`SpeciesBasis`: the radial basis functions and PAW projectors of one
  species sampled as GPAW's splines store them, the PAW overlap correction and
  the valence count.  Stored in model checkpoints; from it the exact overlap S
  of any structure follows (:mod:`gpaw_tools.overlap`).
* its :meth:`SpeciesBasis.summary`: basis name, ``l`` and radius of every radial
  function.  Stored in every dataset file (``meta["basis"]``) and in the
  :class:`Registry` of a model, which maps elements to model species indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from ase.units import Bohr

from .errors import GearsHError

__all__ = ["SpeciesBasis", "BasisDataError", "Registry", "RegistryError", "LMAX_SUPPORTED"]

LMAX_SUPPORTED = 3  # up to f orbitals


class BasisDataError(GearsHError, ValueError):
    """Missing or inconsistent basis-function data."""


@dataclass
class SpeciesBasis:
    """Radial basis functions and PAW projectors of one species (GPAW units: Bohr).

    ``basis`` and ``projectors`` are lists of ``(l, rmax, values)``: the radial
    function sampled on ``np.linspace(0, rmax, len(values))`` exactly as GPAW's
    spline stores it (so the spline is rebuilt bit for bit).  ``dO`` is the PAW
    overlap correction ``dO_ii`` and ``valence`` the number of valence electrons.
    """

    symbol: str
    valence: float
    basis: list
    projectors: list
    dO: np.ndarray
    name: str = ""
    setup: str = "paw"
    xc: str = ""
    # the GPAW side caches its spline objects here (gpaw_tools.overlap)
    _splines: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def Z(self) -> int:
        return atomic_numbers[self.symbol]

    @property
    def l(self) -> list[int]:
        return [int(b[0]) for b in self.basis]

    @property
    def n_orbitals(self) -> int:
        return sum(2 * int(b[0]) + 1 for b in self.basis)

    @property
    def n_projectors(self) -> int:
        return sum(2 * int(p[0]) + 1 for p in self.projectors)

    @property
    def rc(self) -> float:
        """Largest basis-function radius (Angstrom)."""
        return max(float(b[1]) for b in self.basis) * Bohr

    @property
    def projector_rc(self) -> float:
        """Largest projector radius (Angstrom); 0 without projectors."""
        return max((float(p[1]) for p in self.projectors), default=0.0) * Bohr

    def to_dict(self) -> dict:
        def fns(items):
            return [
                {"l": int(l), "rmax": float(r), "values": np.asarray(f, float)} for l, r, f in items
            ]

        return {
            "symbol": self.symbol,
            "valence": float(self.valence),
            "name": self.name,
            "setup": self.setup,
            "xc": self.xc,
            "units": "bohr",
            "basis": fns(self.basis),
            "projectors": fns(self.projectors),
            "dO": np.asarray(self.dO, float),
        }

    def summary(self) -> dict:
        """The short description stored in datasets and registries: basis name, l
        and radius (Angstrom) of every radial function, largest projector radius."""
        return {
            "symbol": self.symbol,
            "name": self.name,
            "l": self.l,
            "rc": [float(b[1]) * Bohr for b in self.basis],
            "projector_rc": self.projector_rc,
            "n_orbitals": self.n_orbitals,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpeciesBasis:
        try:

            def fns(items):
                if isinstance(items, dict):  # msgpack turns lists into {'0': ..}
                    items = [items[k] for k in sorted(items, key=int)]
                return [
                    (int(f["l"]), float(f["rmax"]), np.asarray(f["values"], float)) for f in items
                ]

            out = cls(
                symbol=str(d["symbol"]),
                valence=float(d["valence"]),
                basis=fns(d["basis"]),
                projectors=fns(d["projectors"]),
                dO=np.asarray(d["dO"], float),
                name=str(d.get("name", "")),
                setup=str(d.get("setup", "paw")),
                xc=str(d.get("xc", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BasisDataError(
                f"incomplete basis data for {d.get('symbol', '?')!r}: {type(err).__name__}: {err}"
            ) from None
        ni = out.n_projectors
        if out.dO.shape != (ni, ni):
            raise BasisDataError(
                f"{out.symbol}: dO has shape {out.dO.shape}, expected "
                f"({ni}, {ni}) for projectors with l = "
                f"{[p[0] for p in out.projectors]}"
            )
        return out


class RegistryError(GearsHError, ValueError):
    """Species or basis sets that do not match the model's registry."""


@dataclass(frozen=True)
class Registry:
    """Species -> basis (symbol, basis name, l of each shell, radii in A).

    ``species`` is ordered by atomic number; species index 0 is padding, so
    species ``k`` of this list has model index ``k + 1``.
    """

    species: tuple  # of dicts: symbol, number, name, l (tuple), rc, projector_rc

    @classmethod
    def from_basis(cls, basis: dict) -> Registry:
        """From {symbol: summary dict or :class:`SpeciesBasis`}."""
        entries = []
        for sym, b in basis.items():
            if isinstance(b, SpeciesBasis):
                b = b.summary()
            ls = tuple(int(x) for x in b["l"])
            if max(ls) > LMAX_SUPPORTED:
                raise RegistryError(
                    f"{sym}: basis has l={max(ls)}; the model supports "
                    f"l <= {LMAX_SUPPORTED} (s, p, d, f)"
                )
            entries.append(
                dict(
                    symbol=sym,
                    number=int(atomic_numbers[sym]),
                    name=str(b.get("name", "")),
                    l=ls,
                    rc=float(np.max(b["rc"])),
                    projector_rc=float(b.get("projector_rc", 0.0)),
                )
            )
        entries.sort(key=lambda e: e["number"])
        return cls(tuple(entries))

    @classmethod
    def from_structures(cls, structures) -> Registry:
        """Union of the structures' basis sets; the same element must use one basis."""
        merged, where = {}, {}
        for s in structures:
            for sym, b in s.basis.items():
                key = (str(b.get("name", "")), tuple(int(x) for x in b["l"]))
                if sym in merged and merged[sym][0] != key:
                    raise RegistryError(
                        f"element {sym} has two basis sets: {merged[sym][0][0]!r} "
                        f"(l={list(merged[sym][0][1])}) in {where[sym]} and {key[0]!r} "
                        f"(l={list(key[1])}) in {s.meta['source']['name']}; a model needs "
                        f"one basis per element"
                    )
                merged.setdefault(sym, (key, b))
                where.setdefault(sym, s.meta["source"]["name"])
        return cls.from_basis({sym: v[1] for sym, v in merged.items()})

    def to_dict(self) -> dict:
        return {"species": [dict(e, l=list(e["l"])) for e in self.species]}

    @classmethod
    def from_dict(cls, d: dict) -> Registry:
        return cls(tuple(dict(e, l=tuple(e["l"])) for e in d["species"]))

    @property
    def symbols(self) -> list[str]:
        return [e["symbol"] for e in self.species]

    @property
    def n_species(self) -> int:
        return len(self.species)

    @cached_property
    def _index(self) -> dict:
        return {e["number"]: k + 1 for k, e in enumerate(self.species)}

    def species_index(self, numbers) -> np.ndarray:
        """Model species index (1..n) of each atomic number; clear error if unknown."""
        numbers = np.asarray(numbers)
        out = np.zeros(len(numbers), dtype=np.int32)
        for z in np.unique(numbers):
            if int(z) not in self._index:
                raise RegistryError(
                    f"element {chemical_symbols[int(z)]} is not known to this model; it "
                    f"was trained on {', '.join(self.symbols)}"
                )
            out[numbers == z] = self._index[int(z)]
        return out

    def check_basis(self, basis: dict, where: str = "dataset") -> None:
        """Raise if a dataset's basis sets differ from this registry's."""
        known = {e["symbol"]: e for e in self.species}
        for sym, b in basis.items():
            if sym not in known:
                raise RegistryError(
                    f"{where}: element {sym} is not in the model's "
                    f"registry ({', '.join(self.symbols)})"
                )
            ls = tuple(int(x) for x in b["l"])
            if ls != known[sym]["l"] or str(b.get("name", "")) != known[sym]["name"]:
                raise RegistryError(
                    f"{where}: {sym} uses basis {b.get('name')!r} with l={list(ls)}, the "
                    f"model expects {known[sym]['name']!r} with l={list(known[sym]['l'])}"
                )

    @property
    def rc(self) -> np.ndarray:
        """Basis cut-off radius (A) per model species index (index 0: padding, 0)."""
        return np.array([0.0] + [e["rc"] for e in self.species])

    @property
    def n_orbitals(self) -> np.ndarray:
        return np.array([0] + [sum(2 * l + 1 for l in e["l"]) for e in self.species])
