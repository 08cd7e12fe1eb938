"""ASE calculator: predicted H, exact S, eigenvalues, Fermi level, DOS and PDOS.

>>> from ase_gearsh import GearsHCalculator
>>> atoms.calc = GearsHCalculator("model.ckpt", kpts={"size": (4, 4, 1), "gamma": True})
>>> H = atoms.calc.get_hamiltonian()           # scipy.sparse CSR, eV, GPAW order, Gamma
>>> e, dos = atoms.calc.get_dos(width=0.1)
>>> e, pdos = atoms.calc.get_pdos(by="species")
>>> ef = atoms.calc.get_property("fermi_level", other_atoms)   # any atoms

ASE's calculator rules
----------------------
* The work is done in :meth:`GearsHCalculator.calculate`, for the properties
  in ``implemented_properties`` ("hamiltonian" and "overlap" at Gamma,
  "eigenvalues" of shape (1, n_kpts, n_bands), "fermi_level").
* Every getter follows :meth:`~ase.calculators.calculator.Calculator.get_property`'s
  state rule: results belong to ``calc.atoms`` (a copy made by ``calculate``)
  and are recomputed when the atoms asked about differ (``check_state`` /
  ``reset``).  ``atoms=None`` means the atoms the calculator is attached to
  (``atoms.calc = calc``), else those of the last calculation.  Results do
  not depend on the order of the calls.
* ``todict()`` holds every parameter, the model's checkpoint path included,
  so ``GearsHCalculator(**calc.todict())`` is an equivalent calculator.
* Checkpoints are loaded once per process (:func:`~ase_gearsh.model.engine.load_model`);
  a new calculator on a loaded model shares it, its compiled network and its
  overlap tables, and costs milliseconds.
* Bad input raises :class:`CalculatorInputError` (a ``GearsHError``, ASE
  ``CalculatorSetupError`` and ``ValueError``); a property that cannot be
  computed raises :class:`PropertyUnavailableError` (ASE ``PropertyNotPresent``).

Conventions
-----------
* H and S are in eV, GPAW's orbital order (atom, radial function, m), the
  Bloch sum ``M(k) = sum_R exp(2 pi i k.R) M(R)`` over all periodic images, so
  any cell size works (no neighbour-unique restriction).  ``kpt`` arguments
  are scaled (fractional) k-points or an index into ``get_ibz_k_points()``.
* S is exact: two-centre integrals of the basis functions stored in the
  model checkpoint, plus the PAW correction (see :mod:`gpaw_tools.overlap`).
* Spin-paired (one spin channel).  ``get_dos``/``get_pdos`` are per spin
  channel: the DOS integrates to the number of orbitals (``ase.dft.dos.DOS``
  doubles spin-paired DOS, so it integrates to twice that).
* The Fermi level uses Fermi-Dirac smearing of ``width`` eV (default 0.01) and
  the valence electron count of the PAW setups minus ``charge``; for gapped
  systems it is placed mid-gap.  ``get_occupation_numbers`` gives the same
  Fermi-Dirac occupations (0..2 per state).
* k-points: ``kpts=None`` (Gamma), a Monkhorst-Pack size ``(n1, n2, n3)``,
  a dict ``{"size": ..., "gamma": True}`` or ``{"path": "GMKG", "npoints": 60}``,
  a :class:`ase.dft.kpoints.BandPath`, or an explicit (n, 3) list.  Grids are
  reduced by time reversal (k ~ -k) to ``get_ibz_k_points()``;
  ``get_bz_k_points()`` is the full grid.  Paths and lists are kept as given.
* Large systems: dense diagonalisation is used up to ``dense_limit``
  orbitals; beyond it ``get_dos``/``get_pdos`` use the kernel polynomial
  method (:mod:`ase_gearsh.electronic.kpm`) at Gamma, eigenvalues are not
  available, and the Fermi level comes from the total KPM DOS at the fixed
  resolution ``kpm["fermi_width"]`` (computed once, whatever is asked first).
"""
from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import (Calculator, CalculatorSetupError, PropertyNotPresent,
                                        all_changes, compare_atoms, kpts2ndarray)
from ase.dft.kpoints import BandPath
from ase.spectrum.band_structure import BandStructure, get_band_structure

from gpaw_tools.overlap import OverlapCalculator

from .core.blocks import BlockMatrices
from .core.errors import GearsHError
from .electronic.dense import (energy_grid, fermi_level, gaussian_dos, group_matrix,
                               occupation_numbers, solve_dense, time_reversal_reduce)
from .electronic.kpm import (KPMMoments, chebyshev_moments, kpm_density, kpm_fermi_level,
                             kpm_n_moments, spectral_bounds)
from .model.coverage import coverage_messages, warn_extrapolation
from .model.engine import Model, load_model
from .model.inference import predictor_for

__all__ = ["GearsHCalculator", "CalculatorInputError", "PropertyUnavailableError"]


class CalculatorInputError(GearsHError, CalculatorSetupError, ValueError):
    """Bad parameters, atoms or getter arguments; the message says what was expected
    and what was received."""


class PropertyUnavailableError(GearsHError, PropertyNotPresent):
    """A property this calculator cannot give for these atoms and settings."""


KPM_DEFAULTS = {"n_moments": None, "n_random": 16, "seed": 0, "fermi_width": 0.1}
KPT_DICT_KEYS = {"size", "gamma", "density", "even", "path", "npoints", "special_points"}
METHODS = ("auto", "dense", "kpm")
# parameter changes that leave the atoms-level data (blocks, H(k), S(k), bounds) valid
_KEEPS_MATRICES = {"kpts", "width", "charge", "dense_limit", "kpm"}
_NO_EFFECT = {"progress", "warn_extrapolation"}
# overlap tables are built lazily and are costly: one OverlapCalculator per model
_OVERLAPS: "weakref.WeakKeyDictionary[Model, tuple]" = weakref.WeakKeyDictionary()


# -- input checks (pure functions; they raise CalculatorInputError) -----------------
def _check_positive(name: str, value, integer: bool = False, allow_zero: bool = False):
    ok_type = isinstance(value, (int, np.integer)) if integer else \
        isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or \
            value < 0 or (value == 0 and not allow_zero):
        kind = "an integer" if integer else "a finite number"
        raise CalculatorInputError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, "
                                   f"got {value!r}")


def _check_mp_size(size, where: str = "kpts") -> None:
    arr = np.asarray(size)
    if arr.shape != (3,) or arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)) \
            or np.any(arr != np.round(arr)) or np.any(arr < 1):
        raise CalculatorInputError(
            f"{where}: a Monkhorst-Pack size must be three positive integers like (4, 4, 1), "
            f"got {np.asarray(size).tolist()!r}; for a single k-point pass [[kx, ky, kz]]")


def _check_kpts_dict(kpts: dict) -> dict | BandPath:
    if "labelseq" in kpts:  # BandPath.todict(), as stored by todict()
        return BandPath(cell=kpts["cell"], kpts=kpts["kpts"],
                        special_points=kpts.get("special_points"), path=kpts["labelseq"])
    unknown = sorted(set(kpts) - KPT_DICT_KEYS)
    if unknown:
        raise CalculatorInputError(f"kpts dict: unknown key(s) {unknown}; expected some of "
                                   f"{sorted(KPT_DICT_KEYS)}")
    if "path" in kpts:
        if not isinstance(kpts["path"], str):
            raise CalculatorInputError(f"kpts['path'] must be a string like 'GMKG', got "
                                       f"{kpts['path']!r}")
        if "npoints" in kpts:
            _check_positive("kpts['npoints']", kpts["npoints"], integer=True)
    elif "size" in kpts:
        _check_mp_size(kpts["size"], "kpts['size']")
    elif "density" in kpts:
        _check_positive("kpts['density']", kpts["density"])
    else:
        raise CalculatorInputError(f"a kpts dict needs 'size', 'density' or 'path', got keys "
                                   f"{sorted(kpts)}")
    return kpts


def _check_kpts(kpts):
    """Validate ``kpts`` (see the module docstring); returns the value to store."""
    if kpts is None or isinstance(kpts, BandPath):
        return kpts
    if isinstance(kpts, dict):
        return _check_kpts_dict(kpts)
    try:
        arr = np.asarray(kpts, dtype=float)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.ndim == 1 and arr.shape == (3,):
        _check_mp_size(kpts)
        return kpts
    if arr is not None and arr.ndim == 2 and arr.shape[1] == 3 and len(arr) > 0:
        if not np.all(np.isfinite(arr)):
            raise CalculatorInputError("kpts: the scaled k-points must be finite, got "
                                       f"{arr[~np.isfinite(arr).all(1)].tolist()}")
        return kpts
    shape = "ragged" if arr is None else str(arr.shape)
    raise CalculatorInputError(
        f"kpts must be None, a Monkhorst-Pack size (n1, n2, n3), a dict with 'size' or "
        f"'path', a BandPath or an (n, 3) array of scaled k-points; got "
        f"{type(kpts).__name__} of shape {shape}")


def _check_kpm(kpm) -> None:
    if kpm is None:
        return
    if not isinstance(kpm, dict):
        raise CalculatorInputError(f"kpm must be a dict with keys {sorted(KPM_DEFAULTS)}, got "
                                   f"{type(kpm).__name__}")
    unknown = sorted(set(kpm) - set(KPM_DEFAULTS))
    if unknown:
        raise CalculatorInputError(f"kpm: unknown key(s) {unknown}; expected some of "
                                   f"{sorted(KPM_DEFAULTS)}")
    if kpm.get("n_moments") is not None:
        _check_positive("kpm['n_moments']", kpm["n_moments"], integer=True)
        if kpm["n_moments"] < 2:
            raise CalculatorInputError(f"kpm['n_moments'] must be >= 2, got {kpm['n_moments']}")
    if "n_random" in kpm:
        _check_positive("kpm['n_random']", kpm["n_random"], integer=True)
    if "fermi_width" in kpm:
        _check_positive("kpm['fermi_width']", kpm["fermi_width"])


def _check_parameter(key: str, value):
    """Validate one parameter (not ``model``); returns the value to store."""
    if key == "kpts":
        return _check_kpts(value)
    if key == "kpm":
        _check_kpm(value)
    elif key == "width":
        _check_positive("width (Fermi-Dirac smearing, eV)", value)
    elif key == "charge":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                             np.floating)) \
                or not math.isfinite(value):
            raise CalculatorInputError(f"charge must be a finite number, got {value!r}")
    elif key == "dense_limit":
        _check_positive("dense_limit", value, integer=True, allow_zero=True)
    elif key in ("edge_chunk", "pair_chunk"):
        _check_positive(key, value, integer=True)
    return value


def _check_atoms(atoms) -> None:
    if not isinstance(atoms, Atoms):
        raise CalculatorInputError(f"expected an ase.Atoms object, got {type(atoms).__name__}")
    if len(atoms) == 0:
        raise CalculatorInputError("expected at least one atom, got an empty Atoms object")
    bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
    if len(bad):
        raise CalculatorInputError(f"expected finite positions, got NaN or inf for atom(s) "
                                   f"{bad[:10].tolist()}")
    cell = np.asarray(atoms.cell)
    if not np.all(np.isfinite(cell)):
        raise CalculatorInputError(f"expected a finite cell, got {cell.tolist()}")
    flat = np.asarray(atoms.pbc) & (np.linalg.norm(cell, axis=1) == 0)
    if flat.any():
        raise CalculatorInputError(f"periodic direction(s) {np.flatnonzero(flat).tolist()} "
                                   f"have a zero cell vector (pbc={atoms.pbc.tolist()})")


def _check_dos_args(width, npts, emin, emax, method) -> None:
    _check_positive("width (DOS broadening, eV)", width)
    if isinstance(npts, bool) or not isinstance(npts, (int, np.integer)) or npts < 2:
        raise CalculatorInputError(f"npts must be an integer >= 2, got {npts!r}")
    if emin is not None and emax is not None and not emax > emin:
        raise CalculatorInputError(f"need emin < emax, got emin={emin}, emax={emax}")
    if method not in METHODS:
        raise CalculatorInputError(f"method must be 'auto', 'dense' or 'kpm', got {method!r}")


def _resolve_model(model) -> tuple[Model, Any]:
    """(loaded model, value recorded in ``parameters``) for a path or a Model."""
    if isinstance(model, Model):
        return model, (model.path if getattr(model, "path", None) else model)
    if isinstance(model, (str, Path)):
        return load_model(model), str(model)
    raise CalculatorInputError(f"model must be a checkpoint path or an ase_gearsh Model, got "
                               f"{type(model).__name__}")


def _overlap_calculator(model: Model) -> OverlapCalculator:
    """The model's shared :class:`OverlapCalculator` (rebuilt if its basis data change)."""
    data = getattr(model, "basis_data", None)
    if not data:
        raise PropertyUnavailableError(
            f"the model {getattr(model, 'path', '') or ''} stores no basis functions, so S "
            f"cannot be computed; add them with `gearsh attach-basis MODEL --xc XC` (the "
            f"functional of the training data)")
    entry = _OVERLAPS.get(model)
    if entry is None or entry[0] is not data:
        entry = _OVERLAPS[model] = (data, OverlapCalculator(data))
    return entry[1]


class GearsHCalculator(Calculator):
    """Machine-learned LCAO Hamiltonian calculator (see the module docstring).

    ``model``: path of a ``model.ckpt`` (loaded once per process and shared) or
    a loaded :class:`~ase_gearsh.model.engine.Model`.  Parameters and defaults
    are in ``default_parameters``.
    """

    implemented_properties = ["hamiltonian", "overlap", "eigenvalues", "fermi_level"]
    default_parameters = {
        "kpts": None,
        "width": 0.01,           # Fermi-Dirac smearing for the Fermi level, eV
        "charge": 0.0,
        "dense_limit": 20000,    # orbitals; above: KPM for DOS/PDOS and the Fermi level
        "kpm": dict(KPM_DEFAULTS),
        "edge_chunk": 65536,
        "pair_chunk": 1024,       # bonds per network call (small chunks are cache-friendly)
        "warn_extrapolation": True,
        "progress": False,
    }

    def __init__(self, model=None, atoms: Atoms | None = None, **kwargs):
        if model is None:
            raise CalculatorInputError("a model is required: a checkpoint path or an "
                                       "ase_gearsh Model, got None")
        self._model: Model | None = None
        self._predictor = None
        self._cache: dict = {}
        self._cache_atoms: Atoms | None = None
        self._attached = None
        super().__init__(atoms=atoms, model=model, **kwargs)

    @property
    def model(self) -> Model:
        """The loaded :class:`~ase_gearsh.model.engine.Model` (shared per checkpoint)."""
        return self._model

    # -- parameters -------------------------------------------------------------------
    def set(self, **kwargs) -> dict:
        """Validate and set parameters; drops exactly the results they invalidate."""
        unknown = set(kwargs) - set(self.default_parameters) - {"model"}
        if unknown:
            raise CalculatorInputError(f"unknown parameter(s) {sorted(unknown)}; expected "
                                       f"some of {sorted(self.default_parameters)} or model")
        kwargs = {k: v if k == "model" else _check_parameter(k, v) for k, v in kwargs.items()}
        new_model = None
        if "model" in kwargs:
            new_model, kwargs["model"] = _resolve_model(kwargs["model"])
        changed = super().set(**kwargs)
        if new_model is not None and new_model is not self._model:
            self._model = new_model
            changed.setdefault("model", kwargs["model"])
        self._invalidate(set(changed) - _NO_EFFECT)
        return changed

    def _invalidate(self, changed: set) -> None:
        """Drop the results and cached pieces that the changed parameters affect."""
        if not changed:
            return
        if changed <= {"width", "charge"}:  # only the Fermi level moves
            self.results.pop("fermi_level", None)
        elif changed <= _KEEPS_MATRICES:  # the atoms-level pieces stay valid

            def keep(key):
                return key in ("blocks", "bounds") or isinstance(key, tuple) and (
                    key[0] in ("H", "S") or key[0] == "kpm" and "kpm" not in changed)
            self._cache = {k: v for k, v in self._cache.items() if keep(k)}
            self.results = {k: v for k, v in self.results.items()
                            if k in ("hamiltonian", "overlap")}
        else:  # the model or chunk sizes: start over (the atoms are kept)
            self._predictor = None
            self._cache.clear()
            self.results = {}

    def _kpm_options(self) -> dict:
        return {**KPM_DEFAULTS, **(self.parameters.kpm or {})}

    # -- ASE state rules --------------------------------------------------------------
    def reset(self) -> None:
        """Forget the atoms, the results and everything derived from the atoms."""
        super().reset()
        self._cache = {}
        self._cache_atoms = None

    def set_atoms(self, atoms: Atoms) -> None:
        """Called by ASE on ``atoms.calc = calc``: ``atoms=None`` in the getters then
        means these atoms (followed as they change, through ``check_state``)."""
        self._attached = weakref.ref(atoms)

    def _target(self, atoms: Atoms | None) -> Atoms | None:
        """The atoms a getter is about: ``atoms``, else the attached ones, else ``self.atoms``."""
        if atoms is not None:
            return atoms
        attached = self._attached() if self._attached is not None else None
        if attached is not None and attached.calc is self:
            return attached
        return self.atoms

    def _sync(self, atoms: Atoms | None = None) -> Atoms:
        """Bring the calculator to the target atoms (``check_state``; ``reset`` and a
        fresh :meth:`calculate` if they differ); return ``self.atoms``."""
        target = self._target(atoms)
        if target is None:
            raise CalculatorInputError("no atoms: attach the calculator (atoms.calc = calc) or "
                                       "pass atoms")
        if self.atoms is None or self.check_state(target):
            self.reset()
            self.calculate(target, [], all_changes)
        return self.atoms

    def get_property(self, name: str, atoms: Atoms | None = None,
                     allow_calculation: bool = True):
        """ASE's ``get_property``; ``atoms=None`` means the attached atoms (else the atoms
        of the last calculation).  Results are recomputed whenever the atoms differ."""
        return super().get_property(name, self._target(atoms), allow_calculation)

    def _ensure(self, name: str):
        """``results[name]`` for ``self.atoms`` (call :meth:`_sync` first), computed
        if missing; no copy."""
        if name not in self.results:
            self.calculate(self.atoms, [name], [])
        return self.results[name]

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("eigenvalues",),
                  system_changes: Sequence[str] = all_changes) -> None:
        """Compute ``properties`` (names from ``implemented_properties``) for ``atoms``
        (default: ``self.atoms``) into ``self.results``."""
        if atoms is None and self.atoms is None:
            raise CalculatorInputError("no atoms: attach the calculator (atoms.calc = calc) or "
                                       "pass atoms")
        _check_atoms(atoms if atoms is not None else self.atoms)
        unknown = [p for p in properties if p not in self.implemented_properties]
        if unknown:
            raise CalculatorInputError(f"unknown properties {unknown}; this calculator "
                                       f"computes {self.implemented_properties}")
        super().calculate(atoms, properties, system_changes)
        if system_changes or self._cache_atoms is None or \
                compare_atoms(self._cache_atoms, self.atoms):
            self._cache.clear()  # derived from other atoms
            self.results = {}
            self._cache_atoms = self.atoms.copy()
        self._kpoints()  # checks kpts against these atoms
        compute = {"hamiltonian": lambda: self._matrix("H", np.zeros(3)),
                   "overlap": lambda: self._matrix("S", np.zeros(3)),
                   "eigenvalues": lambda: self._eigenvalues()[None],
                   "fermi_level": self._fermi_level}
        for name in properties:
            if name not in self.results:
                self.results[name] = compute[name]()

    # -- atoms-level pieces (no state checks below this line: callers sync first) ------
    @property
    def predictor(self):
        """The shared :class:`~ase_gearsh.model.inference.Predictor` of the model."""
        if self._predictor is None:
            self._predictor = predictor_for(self.model, self.parameters.edge_chunk,
                                            self.parameters.pair_chunk)
        return self._predictor

    def _blocks(self) -> BlockMatrices:
        if "blocks" not in self._cache:
            pb = self.predictor(self.atoms, progress=self.parameters.progress)
            if self.parameters.warn_extrapolation:
                self._check_coverage(pb)
            self._cache["blocks"] = pb
        return self._cache["blocks"]

    def _check_coverage(self, pb: BlockMatrices) -> None:
        model = self.model
        species = model.registry.species_index(self.atoms.numbers)
        warn_extrapolation(coverage_messages(
            getattr(model, "coverage", None), model.registry.symbols, species, pb.pair_i,
            pb.pair_j, pb.pair_distance, pb.neighbours))

    def _matrix(self, kind: str, k: np.ndarray):
        """H(k) ("H") or S(k) ("S") as scipy.sparse CSR; Gamma also goes to ``results``."""
        gamma = not np.any(k)
        key = (kind, tuple(np.round(k, 12)))
        if key not in self._cache:
            if kind == "H":
                self._cache[key] = self._blocks().matrix(None if gamma else k)
            else:
                oc = _overlap_calculator(self.model)
                self._cache[key] = oc.overlap(self.atoms) if gamma else \
                    oc.overlap(self.atoms, kpts=[k])[0]
        if gamma:
            self.results["hamiltonian" if kind == "H" else "overlap"] = self._cache[key]
        return self._cache[key]

    def _n_orbitals(self) -> int:
        registry = self.model.registry
        return int(registry.n_orbitals[registry.species_index(self.atoms.numbers)].sum())

    def _n_electrons(self) -> float:
        data = getattr(self.model, "basis_data", None) or {}
        symbols = self.atoms.get_chemical_symbols()
        missing = sorted(set(symbols) - set(data))
        if missing:
            raise PropertyUnavailableError(f"no valence electron count for {missing}: the "
                                           f"model stores no basis data (gearsh attach-basis)")
        return sum(float(data[s]["valence"]) for s in symbols) - float(self.parameters.charge)

    def _kpoints(self) -> dict:
        """{'bz', 'ibz', 'weights', 'bz2ibz'} for the ``kpts`` parameter and these atoms."""
        if "kpts" not in self._cache:
            kp = self.parameters.kpts
            bz = np.zeros((1, 3)) if kp is None else np.asarray(kpts2ndarray(kp, self.atoms),
                                                                  float).reshape(-1, 3)
            nonper = ~np.asarray(self.atoms.pbc)
            if np.any(np.abs(bz[:, nonper]) > 1e-12):
                raise CalculatorInputError(f"kpts={kp!r} samples non-periodic directions "
                                           f"(pbc={self.atoms.pbc.tolist()}); expected k = 0 "
                                           f"along them")
            grid = isinstance(kp, dict) and "path" not in kp or np.shape(kp) == (3,)
            if grid:
                ibz, w, bz2ibz = time_reversal_reduce(bz, return_map=True)
            else:
                ibz, w, bz2ibz = bz, np.full(len(bz), 1.0 / len(bz)), np.arange(len(bz))
            self._cache["kpts"] = {"bz": bz, "ibz": ibz, "weights": w, "bz2ibz": bz2ibz}
        return self._cache["kpts"]

    def _kvec(self, kpt) -> np.ndarray:
        """A getter's ``kpt`` (None, IBZ index or scaled k-point) as a scaled k-vector."""
        if kpt is None:
            return np.zeros(3)
        if np.ndim(kpt) == 0:
            return self._kpoints()["ibz"][self._k_index(kpt)]
        k = np.asarray(kpt, float)
        if k.shape != (3,) or not np.all(np.isfinite(k)):
            raise CalculatorInputError(f"kpt must be an index or a finite scaled k-point of "
                                       f"shape (3,), got shape {k.shape}")
        if np.any(np.abs(k[~np.asarray(self.atoms.pbc)]) > 1e-12):
            raise CalculatorInputError(f"k-point {k.tolist()} has components along "
                                       f"non-periodic directions (pbc="
                                       f"{self.atoms.pbc.tolist()}); expected 0 there")
        return k

    def _k_index(self, kpt) -> int:
        n = len(self._kpoints()["ibz"])
        if isinstance(kpt, bool) or not isinstance(kpt, (int, np.integer)) or \
                not 0 <= kpt < n:
            raise CalculatorInputError(f"k-point index must be an integer in [0, {n}), got "
                                       f"{kpt!r}")
        return int(kpt)

    # -- dense spectrum -----------------------------------------------------------------
    def _require_dense(self) -> None:
        n, limit = self._n_orbitals(), self.parameters.dense_limit
        if n > limit:
            raise PropertyUnavailableError(
                f"{n} orbitals exceed dense_limit={limit}: dense eigenvalues would need "
                f"{8 * n * n / 2**30:.1f} GiB per matrix; use get_dos()/get_pdos() (kernel "
                f"polynomial method) or raise dense_limit")

    def _k_loop(self, desc: str):
        it = range(len(self._kpoints()["ibz"]))
        if self.parameters.progress and len(it) > 1:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=desc, unit="k-point", leave=False)
        return it

    def _eigenvalues(self) -> np.ndarray:
        """(n_kpts, n_bands) eigenvalues at the IBZ k-points, eV (values only)."""
        if "eigenvalues" not in self._cache:
            self._require_dense()
            ibz = self._kpoints()["ibz"]
            self._cache["eigenvalues"] = np.array([
                solve_dense(self._matrix("H", ibz[q]), self._matrix("S", ibz[q]))[0]
                for q in self._k_loop("eigh")])
        return self._cache["eigenvalues"]

    def _mulliken(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues (nk, nb), per-atom Mulliken weights (nk, n_atoms, nb))."""
        if "mulliken" not in self._cache:
            self._require_dense()
            ibz = self._kpoints()["ibz"]
            counts = self._blocks().orbital_counts
            groups = group_matrix(np.repeat(np.arange(len(counts)), counts), len(counts))
            out = [solve_dense(self._matrix("H", ibz[q]), self._matrix("S", ibz[q]), groups)
                   for q in self._k_loop("eigh")]
            self._cache["mulliken"] = (np.array([e for e, _ in out]),
                                       np.array([m for _, m in out]))
        return self._cache["mulliken"]

    def _fermi_level(self) -> float:
        if self._n_orbitals() > self.parameters.dense_limit:
            return self._kpm_fermi_level()
        return fermi_level(self._eigenvalues(), self._kpoints()["weights"],
                           self._n_electrons(), self.parameters.width)

    # -- kernel polynomial method -----------------------------------------------------
    def _kpm_bounds(self) -> tuple[float, float]:
        if "bounds" not in self._cache:
            self._cache["bounds"] = spectral_bounds(self._matrix("H", np.zeros(3)),
                                                    self._matrix("S", np.zeros(3)))
        return self._cache["bounds"]

    def _kpm_moments(self, width: float, by: str = "species") -> KPMMoments:
        """Chebyshev moments at Gamma for a resolution of about ``width`` eV, projected
        on species or atoms (cached; the total row is the same for either)."""
        ibz = self._kpoints()["ibz"]
        if len(ibz) > 1 or np.any(ibz):
            raise PropertyUnavailableError("the kernel polynomial method is implemented at "
                                           "Gamma only; use kpts=None (a large supercell) or "
                                           "dense diagonalisation")
        opts = self._kpm_options()
        bounds = self._kpm_bounds()
        M = opts["n_moments"] or kpm_n_moments(bounds, width)
        key = ("kpm", M, by)
        if key not in self._cache:
            atom_of = np.repeat(np.arange(len(self.atoms)), self._blocks().orbital_counts)
            if by == "atom":
                groups = {f"atom{i}": np.flatnonzero(atom_of == i)
                          for i in range(len(self.atoms))}
            else:
                symbols = np.array(self.atoms.get_chemical_symbols())[atom_of]
                groups = {s: np.flatnonzero(symbols == s) for s in dict.fromkeys(symbols)}
            self._cache[key] = chebyshev_moments(
                self._matrix("H", np.zeros(3)), self._matrix("S", np.zeros(3)), n_moments=M,
                n_random=opts["n_random"], groups=groups, bounds=bounds, seed=opts["seed"],
                progress=self.parameters.progress)
        return self._cache[key]

    def _kpm_fermi_level(self) -> float:
        """From the total KPM DOS at the fixed resolution ``kpm['fermi_width']``."""
        mom = self._kpm_moments(self._kpm_options()["fermi_width"])
        return kpm_fermi_level(mom, self._n_electrons())

    def _kpm_density(self, width, npts, emin, emax, by="species"):
        mom = self._kpm_moments(width, by)
        lo, hi = self._kpm_bounds()
        return energy_grid(emin, emax, npts, lo, hi), mom

    # -- public getters -----------------------------------------------------------------
    def blocks(self, atoms: Atoms | None = None) -> BlockMatrices:
        """Predicted real-space blocks (:class:`~ase_gearsh.core.blocks.BlockMatrices`:
        on-site and pair blocks with lattice shifts, GPAW order, eV, and the
        prediction's ``timings``) from which H(k) follows at any k; cached like
        every result until the atoms change."""
        self._sync(atoms)
        return self._blocks()

    def uses_kpm(self, method: str = "auto", atoms: Atoms | None = None) -> bool:
        """Whether ``get_dos``/``get_pdos(method=...)`` use the kernel polynomial method:
        ``'kpm'``, ``'dense'``, or ``'auto'`` (KPM above ``dense_limit`` orbitals)."""
        if method not in METHODS:
            raise CalculatorInputError(f"method must be 'auto', 'dense' or 'kpm', got "
                                       f"{method!r}")
        if method == "auto":
            self._sync(atoms)
            return self._n_orbitals() > self.parameters.dense_limit
        return method == "kpm"

    def kpm_moments(self, width: float = 0.1, by: str = "species",
                    atoms: Atoms | None = None) -> KPMMoments:
        """The Chebyshev moments behind ``get_dos``/``get_pdos(method='kpm', width=...)``."""
        _check_positive("width (DOS broadening, eV)", width)
        if by not in ("species", "atom"):
            raise CalculatorInputError(f"by must be 'species' or 'atom', got {by!r}")
        self._sync(atoms)
        return self._kpm_moments(width, by)

    def get_hamiltonian(self, kpt=None, atoms: Atoms | None = None):
        """Predicted H(k) as scipy.sparse CSR (eV, GPAW orbital order).

        ``kpt``: None (Gamma), an index into ``get_ibz_k_points()`` or a scaled k-point.
        """
        self._sync(atoms)
        k = self._kvec(kpt)
        return self._ensure("hamiltonian") if not k.any() else self._matrix("H", k)

    def get_overlap(self, kpt=None, atoms: Atoms | None = None):
        """Exact S(k) as scipy.sparse CSR (GPAW orbital order); ``kpt`` as for H."""
        self._sync(atoms)
        k = self._kvec(kpt)
        return self._ensure("overlap") if not k.any() else self._matrix("S", k)

    def get_eigenvalues(self, kpt: int = 0, spin: int = 0) -> np.ndarray:
        """Eigenvalues (eV) at IBZ k-point index ``kpt`` (dense solver)."""
        self._check_spin(spin)
        self._sync()
        return self._ensure("eigenvalues")[spin, self._k_index(kpt)].copy()

    def get_fermi_level(self) -> float:
        """Fermi level (eV): Fermi-Dirac ``width`` smearing over the IBZ eigenvalues, or
        the integrated total KPM DOS above ``dense_limit`` orbitals."""
        self._sync()
        return float(self._ensure("fermi_level"))

    def get_occupation_numbers(self, kpt: int = 0, spin: int = 0) -> np.ndarray:
        """Fermi-Dirac occupations 0..2 (spin-paired, no k-point weight) at IBZ ``kpt``;
        ``sum_k w_k occ_k.sum()`` is ``get_number_of_electrons()``."""
        eps = self.get_eigenvalues(kpt, spin)
        return occupation_numbers(eps, self.get_fermi_level(), self.parameters.width)

    def get_number_of_bands(self) -> int:
        """Number of bands: the number of orbitals of the atoms."""
        self._sync()
        return self._n_orbitals()

    def get_number_of_electrons(self) -> float:
        """Valence electrons of the PAW setups minus ``charge``."""
        self._sync()
        return self._n_electrons()

    def get_spin_polarized(self) -> bool:
        """Always False: the calculator is spin-paired."""
        return False

    def get_number_of_spins(self) -> int:
        """Always 1 (spin-paired)."""
        return 1

    def _check_spin(self, spin) -> None:
        if spin != 0:
            raise CalculatorInputError(f"spin must be 0 (this calculator is spin-paired, one "
                                       f"channel), got {spin!r}")

    def get_bz_k_points(self) -> np.ndarray:
        """All k-points (scaled): the full grid before time-reversal reduction, or the
        path/list as given."""
        self._sync()
        return self._kpoints()["bz"].copy()

    def get_ibz_k_points(self) -> np.ndarray:
        """The k-points used (scaled): the grid reduced by time reversal (k ~ -k)."""
        self._sync()
        return self._kpoints()["ibz"].copy()

    def get_k_point_weights(self) -> np.ndarray:
        """Weights of ``get_ibz_k_points()`` (sum 1)."""
        self._sync()
        return self._kpoints()["weights"].copy()

    def get_bz_to_ibz_map(self) -> np.ndarray:
        """IBZ index of every k-point of ``get_bz_k_points()``."""
        self._sync()
        return self._kpoints()["bz2ibz"].copy()

    def band_structure(self, reference: float | None = None) -> BandStructure:
        """:class:`ase.spectrum.band_structure.BandStructure` at the calculator's
        k-points (set ``kpts={"path": "GMKG", "npoints": 60}`` or a ``BandPath``).
        ``reference`` (eV) defaults to the Fermi level from these k-points; along a
        path pass the Fermi level of a k-grid calculation instead."""
        atoms = self._sync()
        self._ensure("eigenvalues")
        return get_band_structure(atoms=atoms, calc=self, reference=reference)

    def get_dos(self, width: float = 0.1, npts: int = 2001, emin: float | None = None,
                emax: float | None = None, method: str = "auto"):
        """(energies, dos): Gaussian-broadened DOS per spin channel (states/eV).

        ``method``: 'dense', 'kpm' or 'auto' (dense up to ``dense_limit`` orbitals).
        With KPM the broadening is the Jackson kernel's (about ``width``).
        """
        _check_dos_args(width, npts, emin, emax, method)
        if self.uses_kpm(method):
            e, mom = self._kpm_density(width, npts, emin, emax)
            return e, kpm_density(mom, e)["total"]
        self._sync()
        eps = self._eigenvalues()
        e = energy_grid(emin, emax, npts, eps.min(), eps.max(), 5 * width)
        return e, gaussian_dos(eps, self._kpoints()["weights"], e, width)

    def get_pdos(self, width: float = 0.1, npts: int = 2001, emin: float | None = None,
                 emax: float | None = None, by: str = "species", method: str = "auto"):
        """(energies, pdos): Mulliken-projected DOS per spin channel (states/eV).

        ``by='species'``: dict symbol -> (npts,); ``by='atom'``: (N_atoms, npts)
        array.  The projections sum to the total DOS.
        """
        _check_dos_args(width, npts, emin, emax, method)
        if by not in ("species", "atom"):
            raise CalculatorInputError(f"by must be 'species' or 'atom', got {by!r}")
        use_kpm = self.uses_kpm(method)
        atoms = self._sync()
        symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
        if use_kpm:
            e, mom = self._kpm_density(width, npts, emin, emax, by)
            out = kpm_density(mom, e)
            if by == "species":
                return e, {s: out[s] for s in dict.fromkeys(symbols)}
            return e, np.array([out[f"atom{a}"] for a in range(len(atoms))])
        eps, weights = self._mulliken()
        e = energy_grid(emin, emax, npts, eps.min(), eps.max(), 5 * width)
        per_atom = gaussian_dos(eps, self._kpoints()["weights"], e, width, spectral=weights)
        if by == "atom":
            return e, per_atom
        return e, {s: per_atom[symbols == s].sum(0) for s in dict.fromkeys(symbols)}
