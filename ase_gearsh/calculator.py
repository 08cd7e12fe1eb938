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
* Reliability: when the checkpoint stores a reliability reference
  (``gearsh attach-reliability``; :mod:`ase_gearsh.model.reliability`),
  ``results["reliability"]`` is the structure's figure (1 ~ the edge of the training
  set's atom environments, larger = extrapolating) and ``results["atom_reliability"]``
  the per-atom scores, from the same network run as H; above
  ``reliability_threshold`` (2.0) an :class:`~ase_gearsh.model.reliability.UnreliableWarning`
  names the worst atoms.  Checkpoints without a reference report ``None``.
  ``get_reliability()`` returns the figure.
* Committees (``gearsh committee``): H is the mean of the members' predictions and
  ``results["committee_spread"]`` the members' mean absolute deviation from it (eV,
  over all stored H elements), a second reliability figure from the same prediction
  (``None`` for a single model).
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
  model checkpoint, plus the PAW correction (see :mod:`gpaw_tools.overlap`),
  screened by ``overlap_screen`` (default 1e-8: elements below 5e-9 and projector
  terms below 5e-10 left out; every element measured within 1e-8 of GPAW's; 0:
  GPAW's S to rounding).
* ``overlap_cutoff`` (default 0): dense spectra by canonical orthogonalisation,
  without the eigenvectors of S(k) whose eigenvalues lie below it (near-linear
  dependences of the basis, which amplify the errors of a predicted H into level
  shifts; docs/inference.md).  Each k-point keeps the same number of bands.
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
  From 20,000 orbitals its triangular solves run in single precision
  (``kpm["precision"]``, default ``'auto'``; about twice as fast at device scale).
  For Gamma-only structures of ``overlap_alongside`` atoms or more (default 500),
  the exact S is computed in a worker thread while the network predicts H (an
  error there is raised only where S is asked for).

Layout: this module holds the ASE plumbing (parameters, state, results), the
model, predictor and overlap pieces and the cache of H(k) and S(k).  k-points
are :class:`~ase_gearsh.electronic.kpoints.KPoints`; spectra, Fermi level, DOS
and PDOS are :class:`~ase_gearsh.electronic.spectrum.DenseSpectrum` and
:class:`~ase_gearsh.electronic.spectrum.KPMSpectrum`, which the getters delegate to.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import (
    Calculator,
    CalculatorSetupError,
    PropertyNotPresent,
    all_changes,
    compare_atoms,
)
from ase.spectrum.band_structure import BandStructure, get_band_structure

from gpaw_tools.overlap import OverlapCalculator, check_screen

from .core.blocks import BlockMatrices
from .core.errors import GearsHError
from .core.processes import worker_thread
from .electronic.checks import ArgumentError, check_choice, check_positive
from .electronic.dense import (
    NEAR_NULL_NORM,
    ElectronicError,
    check_overlap_cutoff,
    occupation_numbers,
)
from .electronic.kpm import KPMMoments
from .electronic.kpoints import KPT_DICT_KEYS, KPoints, check_kpts
from .electronic.spectrum import (
    KPM_DEFAULTS,
    METHODS,
    DenseSpectrum,
    KPMSpectrum,
    OrbitalLabels,
    check_dos_args,
    check_kpm_options,
    check_projection,
)
from .electronic.window import FermiStates, fermi_states, window_states
from .model.coverage import coverage_messages, warn_extrapolation
from .model.engine import Model, load_model
from .model.inference import predictor_for
from .model.reliability import (
    RELIABILITY_THRESHOLD,
    ReliabilityError,
    reference_of,
    reliability_scores,
    warn_unreliable,
)

__all__ = [
    "GearsHCalculator",
    "CalculatorInputError",
    "PropertyUnavailableError",
    "KPM_DEFAULTS",
    "KPT_DICT_KEYS",
    "METHODS",
]


class CalculatorInputError(GearsHError, CalculatorSetupError, ValueError):
    """Bad parameters, atoms or getter arguments; the message says what was expected
    and what was received."""


class PropertyUnavailableError(GearsHError, PropertyNotPresent):
    """A property this calculator cannot give for these atoms and settings."""


# parameter changes that leave the atoms-level data (blocks, H(k), S(k), KPM at Gamma) valid
_KEEPS_MATRICES = {"kpts", "width", "charge", "dense_limit", "kpm", "overlap_cutoff"}
_NO_EFFECT = {"progress", "warn_extrapolation", "reliability_threshold", "overlap_alongside"}
# results that depend on the atoms only (kept when k-points or smearing change)
_ATOMS_RESULTS = ("hamiltonian", "overlap", "reliability", "atom_reliability", "committee_spread")
# overlap tables are built lazily and are costly: one OverlapCalculator per model
_OVERLAPS: weakref.WeakKeyDictionary[Model, tuple] = weakref.WeakKeyDictionary()


# -- input checks (pure functions; they raise CalculatorInputError) -----------------
@contextmanager
def _input_errors():
    """Re-raise the electronic layer's argument errors as :class:`CalculatorInputError`
    (a context manager and a decorator)."""
    try:
        yield
    except ArgumentError as err:
        raise CalculatorInputError(str(err)) from None


@_input_errors()
def _check_parameters(kwargs: dict, known) -> dict:
    """Validate ``set``'s arguments (``model`` is resolved apart); returns the values
    to store."""
    unknown = set(kwargs) - set(known) - {"model"}
    if unknown:
        raise CalculatorInputError(
            f"unknown parameter(s) {sorted(unknown)}; expected some of {sorted(known)} or model"
        )
    return {k: v if k == "model" else _check_parameter(k, v) for k, v in kwargs.items()}


def _check_parameter(key: str, value):
    """Validate one parameter (not ``model``); returns the value to store."""
    if key == "kpts":
        return check_kpts(value)
    if key == "kpm":
        check_kpm_options(value)
    elif key == "width":
        check_positive("width (Fermi-Dirac smearing, eV)", value)
    elif key == "charge":
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value)
        ):
            raise CalculatorInputError(f"charge must be a finite number, got {value!r}")
    elif key == "dense_limit":
        check_positive("dense_limit", value, integer=True, allow_zero=True)
    elif key in ("edge_chunk", "pair_chunk"):
        check_positive(key, value, integer=True)
    elif key == "overlap_screen":
        try:
            check_screen(value)
        except ValueError as err:
            raise CalculatorInputError(f"overlap_screen: {err}") from None
    elif key == "overlap_cutoff":
        try:
            return check_overlap_cutoff(value)
        except ElectronicError as err:
            raise CalculatorInputError(str(err)) from None
    elif key == "overlap_alongside" and value is not None:
        check_positive("overlap_alongside (atoms; None: never)", value, integer=True)
    elif key == "reliability_threshold" and value is not None:
        check_positive("reliability_threshold (None: never warn)", value)
    return value


def _check_calculation(atoms, properties: Sequence[str], implemented: Sequence[str]) -> None:
    """Validate the atoms and the property names of a ``calculate`` call."""
    if atoms is None:
        raise CalculatorInputError(
            "no atoms: attach the calculator (atoms.calc = calc) or pass atoms"
        )
    if not isinstance(atoms, Atoms):
        raise CalculatorInputError(f"expected an ase.Atoms object, got {type(atoms).__name__}")
    if len(atoms) == 0:
        raise CalculatorInputError("expected at least one atom, got an empty Atoms object")
    bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
    if len(bad):
        raise CalculatorInputError(
            f"expected finite positions, got NaN or inf for atom(s) {bad[:10].tolist()}"
        )
    cell = np.asarray(atoms.cell)
    if not np.all(np.isfinite(cell)):
        raise CalculatorInputError(f"expected a finite cell, got {cell.tolist()}")
    flat = np.asarray(atoms.pbc) & (np.linalg.norm(cell, axis=1) == 0)
    if flat.any():
        raise CalculatorInputError(
            f"periodic direction(s) {np.flatnonzero(flat).tolist()} "
            f"have a zero cell vector (pbc={atoms.pbc.tolist()})"
        )
    unknown = [p for p in properties if p not in implemented]
    if unknown:
        raise CalculatorInputError(
            f"unknown properties {unknown}; this calculator computes {implemented}"
        )


def _check_spin(spin) -> None:
    if spin != 0:
        raise CalculatorInputError(
            f"spin must be 0 (this calculator is spin-paired, one channel), got {spin!r}"
        )


def _check_dense_limit(n_orbitals: int, limit: int) -> None:
    if n_orbitals > limit:
        raise PropertyUnavailableError(
            f"{n_orbitals} orbitals exceed dense_limit={limit}: dense eigenvalues would need "
            f"{8 * n_orbitals * n_orbitals / 2**30:.1f} GiB per matrix; use get_dos()/"
            f"get_pdos() (kernel polynomial method) or raise dense_limit"
        )


# -- model pieces (pure functions of the model and the atoms) -------------------------
def _resolve_model(model) -> tuple[Model, Any]:
    """(loaded model, value recorded in ``parameters``) for a path or a Model."""
    if isinstance(model, Model):
        return model, (model.path if getattr(model, "path", None) else model)
    if isinstance(model, (str, Path)):
        return load_model(model), str(model)
    raise CalculatorInputError(
        f"model must be a checkpoint path or an ase_gearsh Model, got {type(model).__name__}"
    )


def _overlap_calculator(model: Model) -> OverlapCalculator:
    """The model's shared :class:`OverlapCalculator` (rebuilt if its basis data change)."""
    data = getattr(model, "basis_data", None)
    if not data:
        raise PropertyUnavailableError(
            f"the model {getattr(model, 'path', '') or ''} stores no basis functions, so S "
            f"cannot be computed; add them with `gearsh attach-basis MODEL --xc XC` (the "
            f"functional of the training data)"
        )
    entry = _OVERLAPS.get(model)
    if entry is None or entry[0] is not data:
        entry = _OVERLAPS[model] = (data, OverlapCalculator(data))
    return entry[1]


def _release_overlap_buffers(model: Model) -> None:
    """Free the scratch arrays the model's overlap calculator keeps between structures
    (1.4 GB at 4000 atoms) before a sparse factorisation needs the memory."""
    entry = _OVERLAPS.get(model)
    if entry is not None:
        entry[1].release_buffers()


def _overlap(model: Model, atoms: Atoms, k: np.ndarray, screen: float = 0.0):
    """Exact S(k) (scipy.sparse CSR) of ``atoms`` with the model's basis functions,
    screened by ``screen`` (0: exact; :class:`~gpaw_tools.overlap.OverlapCalculator`)."""
    oc = _overlap_calculator(model)
    if not np.any(k):
        return oc.overlap(atoms, screen=screen)
    return oc.overlap(atoms, kpts=[k], screen=screen)[0]


def _check_coverage(model: Model, atoms: Atoms, pb: BlockMatrices) -> None:
    """Warn about bonds and environments outside the model's training data."""
    species = model.registry.species_index(atoms.numbers)
    warn_extrapolation(
        coverage_messages(
            getattr(model, "coverage", None),
            model.registry.symbols,
            species,
            pb.pair_i,
            pb.pair_j,
            pb.pair_distance,
            pb.neighbours,
        )
    )


def _reliability(model: Model, atoms: Atoms, pb: BlockMatrices, threshold) -> tuple:
    """(figure, per-atom scores) of a prediction, (None, None) when the model has no
    reliability reference; warns above ``threshold`` (None: never)."""
    invariants = getattr(pb, "atom_invariants", None)
    try:
        ref = reference_of(model)
        if ref is None or invariants is None:
            return None, None
        symbols = atoms.get_chemical_symbols()
        scores = reliability_scores(ref, symbols, invariants)
    except ReliabilityError as err:  # an unreadable reference must not stop predictions
        warnings.warn(f"no reliability figure: {err}", RuntimeWarning, stacklevel=4)
        return None, None
    if threshold is not None:
        warn_unreliable(ref, symbols, scores, threshold)
    return float(scores.max()), scores


def _n_orbitals(model: Model, atoms: Atoms) -> int:
    registry = model.registry
    return int(registry.n_orbitals[registry.species_index(atoms.numbers)].sum())


def _n_electrons(model: Model, atoms: Atoms, charge: float) -> float:
    """Valence electrons of the PAW setups (from the model's basis data) minus ``charge``."""
    data = getattr(model, "basis_data", None) or {}
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(data))
    if missing:
        raise PropertyUnavailableError(
            f"no valence electron count for {missing}: the "
            f"model stores no basis data (gearsh attach-basis)"
        )
    return sum(float(data[s]["valence"]) for s in symbols) - float(charge)


class GearsHCalculator(Calculator):
    """Machine-learned LCAO Hamiltonian calculator (see the module docstring).

    ``model``: path of a ``model.ckpt`` (loaded once per process and shared) or
    a loaded :class:`~ase_gearsh.model.engine.Model`.  Parameters and defaults
    are in ``default_parameters``.
    """

    implemented_properties = [
        "hamiltonian",
        "overlap",
        "eigenvalues",
        "fermi_level",
        "reliability",
        "atom_reliability",
        "committee_spread",
    ]
    default_parameters = {
        "kpts": None,
        "width": 0.01,  # Fermi-Dirac smearing for the Fermi level, eV
        "charge": 0.0,
        "dense_limit": 20000,  # orbitals; above: KPM for DOS/PDOS and the Fermi level
        "kpm": dict(KPM_DEFAULTS),
        "edge_chunk": 65536,
        "pair_chunk": 512,  # bonds per network call (small chunks are cache-friendly)
        "warn_extrapolation": True,
        "reliability_threshold": RELIABILITY_THRESHOLD,  # warn above (None: never)
        "progress": False,
        # exact S at Gamma computed in a thread while the network runs (Gamma-only
        # calculations of at least this many atoms; None: never)
        "overlap_alongside": 500,
        # S leaves out elements below half of this and projector terms below a 20th
        # (0: exact; gpaw_tools.overlap): at device scale far fewer non-zeros, faster
        "overlap_screen": 1e-8,
        # dense spectra: directions of S with eigenvalues below this are left out
        # (canonical orthogonalisation; 0: the full generalised problem)
        "overlap_cutoff": 0.0,
    }

    def __init__(self, model=None, atoms: Atoms | None = None, **kwargs):
        if model is None:
            raise CalculatorInputError(
                "a model is required: a checkpoint path or an ase_gearsh Model, got None"
            )
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
        kwargs = _check_parameters(kwargs, self.default_parameters)
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
        elif changed <= _KEEPS_MATRICES:  # blocks, H(k), S(k) and KPM bounds stay valid
            kept = {
                k: v
                for k, v in self._cache.items()
                if k in ("blocks", "kpm", "reliability") or isinstance(k, tuple)
            }
            if "kpm" in changed and "kpm" in kept:  # new options: new moments
                kept["kpm"] = kept["kpm"].with_options(self.parameters.kpm)
            self._cache = kept
            self.results = {k: v for k, v in self.results.items() if k in _ATOMS_RESULTS}
        else:  # the model or chunk sizes: start over (the atoms are kept)
            self._predictor = None
            self._cache.clear()
            self.results = {}

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
            raise CalculatorInputError(
                "no atoms: attach the calculator (atoms.calc = calc) or pass atoms"
            )
        if self.atoms is None or self.check_state(target):
            self.reset()
            self.calculate(target, [], all_changes)
        return self.atoms

    def get_property(self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True):
        """ASE's ``get_property``; ``atoms=None`` means the attached atoms (else the atoms
        of the last calculation).  Results are recomputed whenever the atoms differ."""
        return super().get_property(name, self._target(atoms), allow_calculation)

    def _ensure(self, name: str):
        """``results[name]`` for ``self.atoms`` (call :meth:`_sync` first), computed
        if missing; no copy."""
        if name not in self.results:
            self.calculate(self.atoms, [name], [])
        return self.results[name]

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("eigenvalues",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        """Compute ``properties`` (names from ``implemented_properties``) for ``atoms``
        (default: ``self.atoms``) into ``self.results``."""
        _check_calculation(
            atoms if atoms is not None else self.atoms, properties, self.implemented_properties
        )
        super().calculate(atoms, properties, system_changes)
        if (
            system_changes
            or self._cache_atoms is None
            or compare_atoms(self._cache_atoms, self.atoms)
        ):
            self._cache.clear()  # derived from other atoms
            self.results = {}
            self._cache_atoms = self.atoms.copy()
        self._kpoints()  # checks kpts against these atoms
        compute = {
            "hamiltonian": lambda: self._matrix("H", np.zeros(3)),
            "overlap": lambda: self._matrix("S", np.zeros(3)),
            "eigenvalues": lambda: self._dense().eigenvalues()[None],
            "fermi_level": self._fermi_level,
            "reliability": lambda: self._reliability()[0],
            "atom_reliability": lambda: self._reliability()[1],
            "committee_spread": lambda: getattr(self._blocks(), "committee_spread", None),
        }
        for name in properties:
            if name not in self.results:
                self.results[name] = compute[name]()

    # -- atoms-level pieces (no state checks below this line: callers sync first) ------
    @property
    def predictor(self):
        """The shared :class:`~ase_gearsh.model.inference.Predictor` of the model."""
        if self._predictor is None:
            self._predictor = predictor_for(
                self.model, self.parameters.edge_chunk, self.parameters.pair_chunk
            )
        return self._predictor

    def _blocks(self) -> BlockMatrices:
        if "blocks" not in self._cache:
            alongside = self._overlap_alongside()
            try:
                # H's CSR layout in a thread while the network runs: most properties
                # assemble H (not the blocks, reliability or committee spread alone)
                pb = self.predictor(self.atoms, progress=self.parameters.progress, layout=True)
            finally:
                if alongside is not None:
                    self._collect_overlap(alongside)
            if self.parameters.warn_extrapolation:
                _check_coverage(self.model, self.atoms, pb)
            self._cache["blocks"] = pb
            self.results["committee_spread"] = getattr(pb, "committee_spread", None)
            self._reliability()  # with every prediction: results and the warning
        return self._cache["blocks"]

    def _overlap_alongside(self):
        """Start exact S(Gamma) in a worker thread when it will be wanted (Gamma-only
        calculation of at least ``overlap_alongside`` atoms, S not yet computed): its
        compiled kernels and the network's XLA calls release the GIL.  On 2 cores both
        already use both cores, so little time is hidden (3999 atoms: 19.9 against
        20.5 s), but S is built before H is assembled (peak memory 4.7 against 5.4
        GiB; benchmarks/device_scale.py).  Returns the future, or None."""
        limit = self.parameters.overlap_alongside
        key = ("S", (0.0, 0.0, 0.0))
        if limit is None or len(self.atoms) < limit or key in self._cache:
            return None
        if self.parameters.kpts is not None or not getattr(self.model, "basis_data", None):
            return None
        # one worker thread for exact S computed alongside the network
        return worker_thread("gearsh-overlap").submit(
            _overlap, self.model, self.atoms.copy(), np.zeros(3), self.parameters.overlap_screen
        )

    def _collect_overlap(self, future) -> None:
        """Keep S from :meth:`_overlap_alongside`; an error is left for the caller that
        asks for S (it is raised again there), so a prediction of H alone never fails
        because of S."""
        try:
            S = future.result()
        except Exception:  # noqa: BLE001 - recomputed, and raised, where S is asked for
            return
        self._cache[("S", (0.0, 0.0, 0.0))] = S

    def _reliability(self) -> tuple:
        """(figure, per-atom scores) of the prediction, also put in ``results``."""
        pb = self._blocks()  # a new prediction scores itself (through this method)
        if "reliability" not in self._cache:
            p = self.parameters
            self._cache["reliability"] = _reliability(
                self.model,
                self.atoms,
                pb,
                p.reliability_threshold if p.warn_extrapolation else None,
            )
        figure, scores = self._cache["reliability"]
        self.results["reliability"] = figure
        self.results["atom_reliability"] = None if scores is None else scores.copy()
        return figure, scores

    def _matrix(self, kind: str, k: np.ndarray):
        """H(k) ("H") or S(k) ("S") as scipy.sparse CSR; Gamma also goes to ``results``."""
        gamma = not np.any(k)
        key = (kind, tuple(np.round(k, 12)))
        if key not in self._cache:
            self._cache[key] = (
                self._blocks().matrix(None if gamma else k)
                if kind == "H"
                else _overlap(self.model, self.atoms, k, self.parameters.overlap_screen)
            )
        if gamma:
            self.results["hamiltonian" if kind == "H" else "overlap"] = self._cache[key]
        return self._cache[key]

    def _n_orbitals(self) -> int:
        return _n_orbitals(self.model, self.atoms)

    def _n_electrons(self) -> float:
        return _n_electrons(self.model, self.atoms, self.parameters.charge)

    @_input_errors()
    def _kpoints(self) -> KPoints:
        """The k-points of the ``kpts`` parameter for these atoms."""
        if "kpts" not in self._cache:
            self._cache["kpts"] = KPoints.from_parameter(self.parameters.kpts, self.atoms)
        return self._cache["kpts"]

    @_input_errors()
    def _at_k(self, kind: str, kpt, atoms: Atoms | None):
        """H ("H") or S ("S") at a getter's ``kpt`` (None, IBZ index or scaled k-point)."""
        self._sync(atoms)
        k = np.zeros(3) if kpt is None else self._kpoints().vector(kpt)
        return (
            self._matrix(kind, k)
            if k.any()
            else self._ensure("hamiltonian" if kind == "H" else "overlap")
        )

    def _kpoint_array(self, name: str) -> np.ndarray:
        self._sync()
        return getattr(self._kpoints(), name).copy()

    def _labels(self) -> OrbitalLabels:
        return OrbitalLabels.from_counts(
            self._blocks().orbital_counts, self.atoms.get_chemical_symbols()
        )

    def _dense(self) -> DenseSpectrum:
        """Dense spectrum at the IBZ k-points (up to ``dense_limit`` orbitals)."""
        _check_dense_limit(self._n_orbitals(), self.parameters.dense_limit)
        if "dense" not in self._cache:
            kp = self._kpoints()
            self._cache["dense"] = DenseSpectrum(
                partial(self._matrix, "H"),
                partial(self._matrix, "S"),
                kp.ibz,
                kp.weights,
                self._labels(),
                overlap_cutoff=self.parameters.overlap_cutoff,
            )
        self._cache["dense"].progress = self.parameters.progress
        return self._cache["dense"]

    def _kpm(self) -> KPMSpectrum:
        """Kernel polynomial spectrum of H and S at Gamma."""
        if not self._kpoints().gamma_only:
            raise PropertyUnavailableError(
                "the kernel polynomial method is implemented at "
                "Gamma only; use kpts=None (a large supercell) or "
                "dense diagonalisation"
            )
        if "kpm" not in self._cache:
            H, S = self._matrix("H", np.zeros(3)), self._matrix("S", np.zeros(3))
            _release_overlap_buffers(self.model)
            self._cache["kpm"] = KPMSpectrum(H, S, self._labels(), self.parameters.kpm)
        self._cache["kpm"].progress = self.parameters.progress
        self._cache["kpm"].n_electrons = self._n_electrons()  # for resolution_at='fermi'
        return self._cache["kpm"]

    def _fermi_level(self) -> float:
        if self._n_orbitals() > self.parameters.dense_limit:
            return self._kpm().fermi_level(self._n_electrons())
        return self._dense().fermi_level(self._n_electrons(), self.parameters.width)

    def _spectrum(self, method: str) -> DenseSpectrum | KPMSpectrum:
        use_kpm = self.uses_kpm(method)
        self._sync()
        return self._kpm() if use_kpm else self._dense()

    # -- public getters -----------------------------------------------------------------
    def blocks(self, atoms: Atoms | None = None) -> BlockMatrices:
        """Predicted real-space blocks (:class:`~ase_gearsh.core.blocks.BlockMatrices`:
        on-site and pair blocks with lattice shifts, GPAW order, eV, and the
        prediction's ``timings``) from which H(k) follows at any k; cached like
        every result until the atoms change."""
        self._sync(atoms)
        return self._blocks()

    @_input_errors()
    def uses_kpm(self, method: str = "auto", atoms: Atoms | None = None) -> bool:
        """Whether ``get_dos``/``get_pdos(method=...)`` use the kernel polynomial method:
        ``'kpm'``, ``'dense'``, or ``'auto'`` (KPM above ``dense_limit`` orbitals)."""
        check_choice("method", method, METHODS)
        if method == "auto":
            self._sync(atoms)
            return self._n_orbitals() > self.parameters.dense_limit
        return method == "kpm"

    @_input_errors()
    def kpm_moments(
        self, width: float = 0.1, by: str | None = "species", atoms: Atoms | None = None
    ) -> KPMMoments:
        """The Chebyshev moments behind ``get_dos``/``get_pdos(method='kpm', width=...)``
        (``by=None``: the total alone, as ``get_dos`` computes it, in half the time)."""
        check_positive("width (DOS broadening, eV)", width)
        self._sync(atoms)
        if by is not None:
            by = check_projection(by, self.atoms.get_chemical_symbols())
        return self._kpm().moments(width, by)

    def get_hamiltonian(self, kpt=None, atoms: Atoms | None = None):
        """Predicted H(k) as scipy.sparse CSR (eV, GPAW orbital order).

        ``kpt``: None (Gamma), an index into ``get_ibz_k_points()`` or a scaled k-point.
        """
        return self._at_k("H", kpt, atoms)

    def get_overlap(self, kpt=None, atoms: Atoms | None = None):
        """Exact S(k) as scipy.sparse CSR (GPAW orbital order); ``kpt`` as for H."""
        return self._at_k("S", kpt, atoms)

    @_input_errors()
    def get_eigenvalues(self, kpt: int = 0, spin: int = 0) -> np.ndarray:
        """Eigenvalues (eV) at IBZ k-point index ``kpt`` (dense solver)."""
        _check_spin(spin)
        self._sync()
        return self._ensure("eigenvalues")[spin, self._kpoints().index(kpt)].copy()

    def get_reliability(self, atoms: Atoms | None = None, per_atom: bool = False):
        """The reliability figure of the prediction: the largest per-atom score, where
        a score is the distance of the atom's descriptor to the training atoms of its
        species over the training set's own spread (1 ~ edge of the training data,
        larger = extrapolating, ``inf`` for a species without reference).  With
        ``per_atom`` the scores (N,).  ``None`` when the checkpoint stores no
        reference (``gearsh attach-reliability`` adds one)."""
        self._sync(atoms)
        figure, scores = self._reliability()
        if per_atom:
            return None if scores is None else scores.copy()
        return figure

    def get_fermi_level(self) -> float:
        """Fermi level (eV): Fermi-Dirac ``width`` smearing over the IBZ eigenvalues, or
        the integrated total KPM DOS above ``dense_limit`` orbitals."""
        self._sync()
        return float(self._ensure("fermi_level"))

    def get_near_null_levels(self, threshold: float = NEAR_NULL_NORM) -> np.ndarray:
        """Per IBZ k-point, the number of occupied levels (below the Fermi level) along
        S's near-null directions: S-normalised eigenvectors with |c|^2 > ``threshold``
        (default 50; DFT's occupied levels of nearly singular WSe2 szp(dzp) stay below
        4).  Such levels are spurious, made by small H errors along directions that S
        barely spans, and each moves the Fermi level by one state; without DFT, a
        non-zero count says the spectrum should not be trusted as it is (try
        ``overlap_cutoff``, e.g. 1e-2 to 3e-2; docs/inference.md).  Dense path only."""
        self._sync()
        if self._n_orbitals() > self.parameters.dense_limit:
            raise PropertyUnavailableError(
                f"near-null levels need the dense spectrum; {self._n_orbitals()} orbitals "
                f"exceed dense_limit={self.parameters.dense_limit}"
            )
        return self._dense().near_null_levels(self.get_fermi_level(), float(threshold))

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

    def get_bz_k_points(self) -> np.ndarray:
        """All k-points (scaled): the full grid before time-reversal reduction, or the
        path/list as given."""
        return self._kpoint_array("bz")

    def get_ibz_k_points(self) -> np.ndarray:
        """The k-points used (scaled): the grid reduced by time reversal (k ~ -k)."""
        return self._kpoint_array("ibz")

    def get_k_point_weights(self) -> np.ndarray:
        """Weights of ``get_ibz_k_points()`` (sum 1)."""
        return self._kpoint_array("weights")

    def get_bz_to_ibz_map(self) -> np.ndarray:
        """IBZ index of every k-point of ``get_bz_k_points()``."""
        return self._kpoint_array("bz_to_ibz")

    def band_structure(self, reference: float | None = None) -> BandStructure:
        """:class:`ase.spectrum.band_structure.BandStructure` at the calculator's
        k-points (set ``kpts={"path": "GMKG", "npoints": 60}`` or a ``BandPath``).
        ``reference`` (eV) defaults to the Fermi level from these k-points; along a
        path pass the Fermi level of a k-grid calculation instead."""
        atoms = self._sync()
        self._ensure("eigenvalues")
        return get_band_structure(atoms=atoms, calc=self, reference=reference)

    # -- exact states near an energy (any size, Gamma) ---------------------------------
    def _gamma_matrices(self, what: str):
        if not self._kpoints().gamma_only:
            raise PropertyUnavailableError(
                f"{what} are computed at Gamma only (real H and S); use kpts=None (a "
                f"large supercell) or dense diagonalisation of the k-sampled cell"
            )
        H, S = self._matrix("H", np.zeros(3)), self._matrix("S", np.zeros(3))
        _release_overlap_buffers(self.model)
        return H, S

    def exact_fermi(self, atoms: Atoms | None = None, guess: float | None = None) -> FermiStates:
        """Fermi level, HOMO and LUMO at Gamma from exact states near the level, for
        structures of any size (:func:`~ase_gearsh.electronic.window.fermi_states`:
        a sparse LDL^T factorisation of H - sigma S counts the states below sigma
        exactly, shift-invert iterations give the states around it).  Smearing
        ``width`` and ``charge`` as for ``get_fermi_level``; cached.  Costs about one
        Cholesky factorisation of S per shift tried.  The first shift is ``guess`` (eV;
        e.g. the level of a similar structure) or an estimate from the local DOS of small
        clusters around 256 sampled atoms (:func:`~ase_gearsh.electronic.window.local_guess`)."""
        self._sync(atoms)
        key = ("exact_fermi", float(self.parameters.width), float(self._n_electrons()))
        if key not in self._cache:
            H, S = self._gamma_matrices("exact states")
            self._cache[key] = fermi_states(
                H,
                S,
                self._n_electrons(),
                width=self.parameters.width,
                guess=guess,
                atom_of=self._labels().atom_of,
                progress=self.parameters.progress,
            )
        return self._cache[key]

    @_input_errors()
    def get_window_states(
        self,
        emin: float,
        emax: float,
        by: str = "species",
        atoms: Atoms | None = None,
        keep_factor: bool = True,
    ):
        """(energies, weights): every eigenvalue (eV) in [emin, emax] at Gamma, exactly,
        for structures of any size (:func:`~ase_gearsh.electronic.window.window_states`),
        and its Mulliken weights: ``by='species'`` a dict symbol -> (n_states,),
        ``by='atom'`` an (N_atoms, n_states) array, ``by=['W', 'Se']`` a dict
        ``'W+Se'`` -> (n_states,); a state's species or atom weights sum to 1.

        Energies relative to the Fermi level: ``ef = calc.exact_fermi().fermi_level``,
        then ``get_window_states(ef, ef + 0.2)``.  After ``exact_fermi``, a window that
        ends in the gap at a band edge (e.g. ``[homo - 0.2, homo]``) gets its own
        factorisation just beyond that edge, where its states converge fast; another
        window within 1 eV of the last shift of ``exact_fermi`` reuses that
        factorisation; a window farther away gets its own, at its centre.  Ask for
        narrow windows: the cost grows with the number of states in it.
        ``keep_factor=False`` frees ``exact_fermi``'s factorisation when the window needs
        its own (at device scale the peak memory of one factorisation instead of two;
        later windows then factorise anew)."""
        if not isinstance(keep_factor, bool):
            raise CalculatorInputError(f"keep_factor must be True or False, got {keep_factor!r}")
        for name, x in (("emin", emin), ("emax", emax)):
            if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
                raise CalculatorInputError(f"{name} must be a finite energy in eV, got {x!r}")
            if not math.isfinite(x):
                raise CalculatorInputError(f"{name} must be a finite energy in eV, got {x!r}")
        if not emax > emin:
            raise CalculatorInputError(f"expected emin < emax, got [{emin}, {emax}] eV")
        self._sync(atoms)
        by = check_projection(by, self.atoms.get_chemical_symbols())
        H, S = self._gamma_matrices("window states")
        # the factorisation behind exact_fermi serves windows near its shift, and its
        # HOMO and LUMO place a window at a band edge (window_states decides:
        # electronic.window.edge_shift, REUSE_REACH)
        factor, gap = None, None
        for key, fs in self._cache.items():
            if key[:1] == ("exact_fermi",) and getattr(fs, "factor", None) is not None:
                factor, gap = fs.factor, (fs.homo, fs.lumo)
        st = window_states(
            H,
            S,
            float(emin),
            float(emax),
            factor=factor,
            gap=gap,
            release=not keep_factor,
            progress=self.parameters.progress,
        )
        labels = self._labels()
        per_orbital = st.vectors * (S @ st.vectors)  # Mulliken weight of each orbital
        return st.eigenvalues.copy(), labels.from_atoms(labels.atom_matrix() @ per_orbital, by)

    @_input_errors()
    def get_dos(
        self,
        width: float = 0.1,
        npts: int = 2001,
        emin: float | None = None,
        emax: float | None = None,
        method: str = "auto",
    ):
        """(energies, dos): Gaussian-broadened DOS per spin channel (states/eV).

        ``method``: 'dense', 'kpm' or 'auto' (dense up to ``dense_limit`` orbitals).
        With KPM the broadening is the Jackson kernel's (about ``width``); the total
        alone takes half the Chebyshev steps of a projection, and a ``get_pdos`` at
        the same width made first serves it (when both are wanted, ask for the PDOS
        first).
        """
        check_dos_args(width, npts, emin, emax, method)
        return self._spectrum(method).dos(width, npts, emin, emax)

    @_input_errors()
    def get_pdos(
        self,
        width: float = 0.1,
        npts: int = 2001,
        emin: float | None = None,
        emax: float | None = None,
        by: str = "species",
        method: str = "auto",
    ):
        """(energies, pdos): Mulliken-projected DOS per spin channel (states/eV).

        ``by='species'``: dict symbol -> (npts,); ``by='atom'``: (N_atoms, npts)
        array; ``by=['W', 'Se']``: dict ``'W+Se'`` -> (npts,), those elements together
        (with KPM one group: two moments per Chebyshev step, about 0.75x the time of
        the species at device scale).  The species or atoms sum to the total DOS.
        """
        check_dos_args(width, npts, emin, emax, method)
        target = self._target(None) or self._sync()  # checked before any prediction
        by = check_projection(by, target.get_chemical_symbols())
        return self._spectrum(method).pdos(width, npts, emin, emax, by)
