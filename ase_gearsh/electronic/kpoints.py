"""k-points: a ``kpts`` setting as BZ points, IBZ points, weights and the BZ -> IBZ map.

Accepted settings (:func:`check_kpts`):

* ``None``: Gamma only;
* a Monkhorst-Pack size ``(n1, n2, n3)``;
* a dict ``{"size": ..., "gamma": True}``, ``{"density": ...}`` or
  ``{"path": "GMKG", "npoints": 60}`` (ASE's :func:`kpts2ndarray`), or the dict
  form of a :class:`~ase.dft.kpoints.BandPath`;
* a :class:`~ase.dft.kpoints.BandPath`;
* an explicit (n, 3) list of scaled k-points.

Grids (sizes and size/density dicts) are reduced by time reversal (k ~ -k, exact
for real H(R) and S(R)); paths and lists are kept as given, with equal weights.
k-points are scaled (fractional) and must be 0 along non-periodic directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.calculator import kpts2ndarray
from ase.dft.kpoints import BandPath

from .checks import ArgumentError, check_positive
from .dense import time_reversal_reduce

__all__ = ["KPoints", "KPT_DICT_KEYS", "check_kpts", "check_mp_size", "is_grid"]

KPT_DICT_KEYS = {"size", "gamma", "density", "even", "path", "npoints", "special_points"}
_TOL = 1e-12  # |k| along a non-periodic direction that counts as zero


def check_mp_size(size, where: str = "kpts") -> None:
    """Require a Monkhorst-Pack size: three positive integers."""
    arr = np.asarray(size)
    if (
        arr.shape != (3,)
        or arr.dtype.kind not in "iuf"
        or not np.all(np.isfinite(arr))
        or np.any(arr != np.round(arr))
        or np.any(arr < 1)
    ):
        raise ArgumentError(
            f"{where}: a Monkhorst-Pack size must be three positive integers like (4, 4, 1), "
            f"got {np.asarray(size).tolist()!r}; for a single k-point pass [[kx, ky, kz]]"
        )


def _check_kpts_dict(kpts: dict) -> dict | BandPath:
    if "labelseq" in kpts:  # BandPath.todict(), as stored by a calculator's todict()
        return BandPath(
            cell=kpts["cell"],
            kpts=kpts["kpts"],
            special_points=kpts.get("special_points"),
            path=kpts["labelseq"],
        )
    unknown = sorted(set(kpts) - KPT_DICT_KEYS)
    if unknown:
        raise ArgumentError(
            f"kpts dict: unknown key(s) {unknown}; expected some of {sorted(KPT_DICT_KEYS)}"
        )
    if "path" in kpts:
        if not isinstance(kpts["path"], str):
            raise ArgumentError(f"kpts['path'] must be a string like 'GMKG', got {kpts['path']!r}")
        if "npoints" in kpts:
            check_positive("kpts['npoints']", kpts["npoints"], integer=True)
    elif "size" in kpts:
        check_mp_size(kpts["size"], "kpts['size']")
    elif "density" in kpts:
        check_positive("kpts['density']", kpts["density"])
    else:
        raise ArgumentError(
            f"a kpts dict needs 'size', 'density' or 'path', got keys {sorted(kpts)}"
        )
    return kpts


def check_kpts(kpts):
    """Validate a ``kpts`` setting (see the module docstring); returns the value to
    keep (the dict form of a band path becomes a :class:`BandPath`)."""
    if kpts is None or isinstance(kpts, BandPath):
        return kpts
    if isinstance(kpts, dict):
        return _check_kpts_dict(kpts)
    try:
        arr = np.asarray(kpts, dtype=float)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.ndim == 1 and arr.shape == (3,):
        check_mp_size(kpts)
        return kpts
    if arr is not None and arr.ndim == 2 and arr.shape[1] == 3 and len(arr) > 0:
        if not np.all(np.isfinite(arr)):
            raise ArgumentError(
                "kpts: the scaled k-points must be finite, got "
                f"{arr[~np.isfinite(arr).all(1)].tolist()}"
            )
        return kpts
    shape = "ragged" if arr is None else str(arr.shape)
    raise ArgumentError(
        f"kpts must be None, a Monkhorst-Pack size (n1, n2, n3), a dict with 'size' or "
        f"'path', a BandPath or an (n, 3) array of scaled k-points; got "
        f"{type(kpts).__name__} of shape {shape}"
    )


def is_grid(kpts) -> bool:
    """Whether a (checked) ``kpts`` setting is a grid, reduced by time reversal."""
    return isinstance(kpts, dict) and "path" not in kpts or np.shape(kpts) == (3,)


def _frozen(a) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class KPoints:
    """The k-points of a calculation (read-only arrays).

    bz: (n_bz, 3) all scaled k-points (the full grid, or the path/list as given);
    ibz: (n_ibz, 3) the k-points used, reduced by time reversal for grids;
    weights: (n_ibz,) summing to 1; bz_to_ibz: (n_bz,) IBZ index of every BZ point;
    pbc: (3,) periodic directions (k is 0 along the others).
    """

    bz: np.ndarray
    ibz: np.ndarray
    weights: np.ndarray
    bz_to_ibz: np.ndarray
    pbc: np.ndarray

    def __post_init__(self):
        for name in ("bz", "ibz", "weights", "bz_to_ibz", "pbc"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @classmethod
    def gamma(cls, pbc=(True, True, True)) -> KPoints:
        """Gamma only."""
        return cls(
            np.zeros((1, 3)), np.zeros((1, 3)), np.ones(1), np.zeros(1, int), np.asarray(pbc, bool)
        )

    @classmethod
    def from_points(cls, kpts, pbc=(True, True, True), reduce: bool = False) -> KPoints:
        """From explicit scaled k-points; ``reduce``: merge k ~ -k (a grid)."""
        bz = np.asarray(kpts, float).reshape(-1, 3)
        pbc = np.asarray(pbc, bool)
        if np.any(np.abs(bz[:, ~pbc]) > _TOL):
            raise ArgumentError(
                f"k-points sample non-periodic directions (pbc="
                f"{pbc.tolist()}); expected k = 0 along them"
            )
        if reduce:
            ibz, w, bz2ibz = time_reversal_reduce(bz, return_map=True)
        else:
            ibz, w, bz2ibz = bz, np.full(len(bz), 1.0 / len(bz)), np.arange(len(bz))
        return cls(bz, ibz, w, bz2ibz, pbc)

    @classmethod
    def from_parameter(cls, kpts, atoms: Atoms) -> KPoints:
        """The k-points of a checked ``kpts`` setting (:func:`check_kpts`) for ``atoms``."""
        if kpts is None:
            return cls.gamma(atoms.pbc)
        bz = np.asarray(kpts2ndarray(kpts, atoms), float).reshape(-1, 3)
        try:
            return cls.from_points(bz, atoms.pbc, reduce=is_grid(kpts))
        except ArgumentError:
            raise ArgumentError(
                f"kpts={kpts!r} samples non-periodic directions "
                f"(pbc={np.asarray(atoms.pbc).tolist()}); expected k = 0 "
                f"along them"
            ) from None

    @property
    def gamma_only(self) -> bool:
        """Whether Gamma is the only k-point."""
        return len(self.ibz) == 1 and not np.any(self.ibz)

    def index(self, kpt) -> int:
        """Check an IBZ index."""
        n = len(self.ibz)
        if isinstance(kpt, bool) or not isinstance(kpt, (int, np.integer)) or not 0 <= kpt < n:
            raise ArgumentError(f"k-point index must be an integer in [0, {n}), got {kpt!r}")
        return int(kpt)

    def vector(self, kpt) -> np.ndarray:
        """A ``kpt`` argument as a scaled k-vector: None (Gamma), an index into ``ibz``
        or a scaled k-point (checked: shape (3,), finite, 0 along non-periodic
        directions)."""
        if kpt is None:
            return np.zeros(3)
        if np.ndim(kpt) == 0:
            return self.ibz[self.index(kpt)].copy()
        k = np.asarray(kpt, float)
        if k.shape != (3,) or not np.all(np.isfinite(k)):
            raise ArgumentError(
                f"kpt must be an index or a finite scaled k-point of "
                f"shape (3,), got shape {k.shape}"
            )
        if np.any(np.abs(k[~self.pbc]) > _TOL):
            raise ArgumentError(
                f"k-point {k.tolist()} has components along non-periodic "
                f"directions (pbc={self.pbc.tolist()}); expected 0 there"
            )
        return k
