"""ASE calculator: predicted H, exact S, eigenvalues, Fermi level, DOS and PDOS.

>>> from ase_gearsh import GearsHCalculator
>>> atoms.calc = GearsHCalculator("model.ckpt", kpts={"size": (4, 4, 1), "gamma": True})
>>> H = atoms.calc.get_hamiltonian()           # scipy.sparse CSR, eV, GPAW order, Gamma
>>> e, dos = atoms.calc.get_dos(width=0.1)
>>> e, pdos = atoms.calc.get_pdos(by="species")

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
  systems it is placed mid-gap.
* k-points: ``kpts=None`` (Gamma), a Monkhorst-Pack size ``(n1, n2, n3)``,
  a dict ``{"size": ..., "gamma": True}`` or ``{"path": "GMKG", "npoints": 60}``,
  a :class:`ase.dft.kpoints.BandPath`, or an explicit (n, 3) list.  Grids are
  reduced by time reversal (k ~ -k); paths and lists are kept as given.
* Large systems: dense diagonalisation is used up to ``dense_limit``
  orbitals; beyond it ``get_dos``/``get_pdos`` use the kernel polynomial
  method (:mod:`ase_gearsh.kpm`) at Gamma and eigenvalues are not available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import (Calculator, CalculatorSetupError, PropertyNotPresent,
                                        all_changes, kpts2ndarray)

from .coverage import coverage_messages, warn_extrapolation
from .electronic import (fermi_level, gaussian_dos, group_matrix, solve_dense,
                         time_reversal_reduce)

__all__ = ["GearsHCalculator"]


class GearsHCalculator(Calculator):
    """Machine-learned LCAO Hamiltonian calculator (see module docstring)."""

    implemented_properties = ["hamiltonian", "overlap", "eigenvalues", "fermi_level"]
    default_parameters = {
        "kpts": None,
        "width": 0.01,           # Fermi-Dirac smearing for the Fermi level, eV
        "charge": 0.0,
        "dense_limit": 20000,    # orbitals; above: KPM for DOS/PDOS
        "kpm": {"n_moments": None, "n_random": 16, "seed": 0},
        "edge_chunk": 65536,
        "pair_chunk": 1024,       # bonds per network call (small chunks are cache-friendly)
        "warn_extrapolation": True,
        "progress": False,
    }

    def __init__(self, model, atoms=None, **kwargs):
        """``model``: path of a ``model.ckpt`` or a loaded :class:`~ase_gearsh.engine.Model`."""
        from .engine import Model
        if isinstance(model, (str, Path)):
            model = Model.from_checkpoint(model)
        elif not isinstance(model, Model):
            raise TypeError(f"model must be a checkpoint path or an ase_gearsh Model, got "
                            f"{type(model).__name__}")
        self.model = model
        self._predictor = None
        self._overlap_calc = None
        self._cache: dict = {}
        unknown = set(kwargs) - set(self.default_parameters) - {"label", "directory"}
        if unknown:
            raise CalculatorSetupError(f"unknown parameter(s) {sorted(unknown)}; expected "
                                       f"some of {sorted(self.default_parameters)}")
        super().__init__(atoms=atoms, **kwargs)

    # -- ASE plumbing ---------------------------------------------------------
    def set(self, **kwargs):
        changed = super().set(**kwargs)
        if set(changed) <= {"kpm", "progress", "warn_extrapolation"}:
            for key in [k for k in self._cache if isinstance(k, tuple) and k[0] == "kpm"]:
                del self._cache[key]
        else:  # k-points, smearing, charge, chunks: start over
            self._cache.clear()
            self._predictor = None
            self.results = {}
        return changed

    def reset(self):
        super().reset()
        self._cache = {}

    def set_atoms(self, atoms):
        """Called by ASE on ``atoms.calc = calc``: results then follow these atoms and
        are recomputed when they change (``check_state``)."""
        self._attached = atoms

    def _atoms(self, atoms=None):
        if atoms is None:
            atoms = getattr(self, "_attached", None)
        if atoms is not None and self.atoms is not None and self.check_state(atoms):
            self.reset()
        if atoms is not None and self.atoms is None:
            self.atoms = atoms.copy()
        if self.atoms is None:
            raise CalculatorSetupError("no atoms: attach the calculator (atoms.calc = calc) "
                                       "or pass atoms")
        return self.atoms

    def calculate(self, atoms=None, properties=("eigenvalues",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "hamiltonian" in properties:
            self.results["hamiltonian"] = self.get_hamiltonian()
        if "overlap" in properties:
            self.results["overlap"] = self.get_overlap()
        if "eigenvalues" in properties or "fermi_level" in properties:
            self._spectrum()

    # -- pieces, cached until the atoms change --------------------------------
    @property
    def predictor(self):
        if self._predictor is None:
            # one Predictor (and its compiled stages) per model and chunk sizes, shared
            # by every calculator of that model
            from .inference import Predictor
            cache = self.model.__dict__.setdefault("_predictors", {})
            key = (self.parameters.edge_chunk, self.parameters.pair_chunk)
            if key not in cache:
                cache[key] = Predictor(self.model, edge_chunk=key[0], pair_chunk=key[1])
            self._predictor = cache[key]
        return self._predictor

    def blocks(self, atoms=None):
        """Predicted real-space blocks (:class:`~ase_gearsh.inference.PredictedBlocks`)."""
        atoms = self._atoms(atoms)
        if "blocks" not in self._cache:
            pb = self.predictor(atoms, progress=self.parameters.progress)
            if self.parameters.warn_extrapolation:
                self._check_coverage(atoms, pb)
            self._cache["blocks"] = pb
        return self._cache["blocks"]

    def _check_coverage(self, atoms, pb):
        model = self.model
        species = model.registry.species_index(atoms.numbers)
        warn_extrapolation(coverage_messages(
            getattr(model, "coverage", None), model.registry.symbols, species, pb.pair_i,
            pb.pair_j, pb.pair_distance, pb.neighbours))

    @property
    def overlap_calculator(self):
        if self._overlap_calc is None:
            from gpaw_tools.overlap import OverlapCalculator
            data = getattr(self.model, "basis_data", None)
            if not data:
                raise PropertyNotPresent(
                    f"the model {getattr(self.model, 'path', '')} stores no basis functions, "
                    f"so S cannot be computed; add them with `gearsh attach-basis MODEL "
                    f"--xc XC` (the functional of the training data)")
            self._overlap_calc = OverlapCalculator(data)
        return self._overlap_calc

    def _kvec(self, kpt):
        if kpt is None:
            return np.zeros(3)
        if np.ndim(kpt) == 0:
            kp = self.get_ibz_k_points()
            if not 0 <= int(kpt) < len(kp):
                raise IndexError(f"k-point index {kpt} out of range: there are {len(kp)} "
                                 f"k-points")
            return kp[int(kpt)]
        k = np.asarray(kpt, float)
        if k.shape != (3,):
            raise ValueError(f"kpt must be an index or a scaled k-point of shape (3,), got "
                             f"shape {k.shape}")
        nonper = ~np.asarray(self.atoms.pbc)
        if np.any(np.abs(k[nonper]) > 1e-12):
            raise ValueError(f"k-point {k.tolist()} has components along non-periodic "
                             f"directions (pbc={self.atoms.pbc.tolist()})")
        return k

    def get_hamiltonian(self, kpt=None, atoms=None):
        """Predicted H(k) as scipy.sparse CSR (eV, GPAW orbital order)."""
        pb = self.blocks(atoms)
        k = self._kvec(kpt)
        key = ("H", tuple(np.round(k, 12)))
        if key not in self._cache:
            self._cache[key] = pb.matrix(None if not k.any() else k)
        if not k.any():
            self.results["hamiltonian"] = self._cache[key]
        return self._cache[key]

    def get_overlap(self, kpt=None, atoms=None):
        """Exact S(k) as scipy.sparse CSR (GPAW orbital order)."""
        atoms = self._atoms(atoms)
        k = self._kvec(kpt)
        key = ("S", tuple(np.round(k, 12)))
        if key not in self._cache:
            oc = self.overlap_calculator
            self._cache[key] = oc.overlap(atoms) if not k.any() else \
                oc.overlap(atoms, kpts=[k])[0]
        if not k.any():
            self.results["overlap"] = self._cache[key]
        return self._cache[key]

    # -- k-points -------------------------------------------------------------
    def _kpoints(self):
        atoms = self._atoms()
        if "kpts" not in self._cache:
            kp = self.parameters.kpts
            if kp is None:
                k, w = np.zeros((1, 3)), np.ones(1)
            else:
                k = kpts2ndarray(kp, atoms)
                grid = (isinstance(kp, dict) and "path" not in kp) or \
                    (np.ndim(kp) == 1 and len(kp) == 3)
                if grid:
                    k, w = time_reversal_reduce(k)
                else:
                    w = np.full(len(k), 1.0 / len(k))
            nonper = ~np.asarray(atoms.pbc)
            if np.any(np.abs(k[:, nonper]) > 1e-12):
                raise CalculatorSetupError(f"kpts={kp!r} samples non-periodic directions "
                                           f"(pbc={atoms.pbc.tolist()})")
            self._cache["kpts"] = (k, w)
        return self._cache["kpts"]

    def get_ibz_k_points(self):
        return self._kpoints()[0].copy()

    def get_bz_k_points(self):
        return self.get_ibz_k_points()

    def get_k_point_weights(self):
        return self._kpoints()[1].copy()

    def get_number_of_spins(self):
        return 1

    def get_spin_polarized(self):
        return False

    def get_number_of_electrons(self):
        atoms = self._atoms()
        data = getattr(self.model, "basis_data", None) or {}
        missing = sorted(set(atoms.get_chemical_symbols()) - set(data))
        if missing:
            raise PropertyNotPresent(f"no valence electron count for {missing}: the model "
                                     f"stores no basis data (gearsh attach-basis)")
        val = {s: float(d["valence"]) for s, d in data.items()}
        return sum(val[s] for s in atoms.get_chemical_symbols()) - float(self.parameters.charge)

    def get_number_of_bands(self):
        return self.blocks().n_orbitals

    # -- spectrum -------------------------------------------------------------
    def _groups(self):
        """Orbital -> atom index matrix (for per-atom and per-species PDOS)."""
        counts = self.blocks().orbital_counts
        return group_matrix(np.repeat(np.arange(len(counts)), counts), len(counts))

    def _spectrum(self, with_weights: bool = False):
        """Dense eigenvalues (and per-atom Mulliken weights) at every k-point."""
        self._atoms()
        if "eigenvalues" in self._cache and (not with_weights or "weights" in self._cache):
            return
        n = self.blocks().n_orbitals
        if n > self.parameters.dense_limit:
            raise PropertyNotPresent(
                f"{n} orbitals exceed dense_limit={self.parameters.dense_limit}: dense "
                f"eigenvalues would need {8 * n * n / 2**30:.1f} GiB per matrix; use "
                f"get_dos()/get_pdos() (kernel polynomial method) or raise dense_limit")
        k, w = self._kpoints()
        groups = self._groups() if with_weights else None
        eps, wts = [], []
        it = range(len(k))
        if self.parameters.progress and len(k) > 1:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="eigh", unit="k-point", leave=False)
        for q in it:
            H = self.get_hamiltonian(k[q])
            S = self.get_overlap(k[q])
            e, m = solve_dense(H, S, groups)
            eps.append(e)
            wts.append(m)
        eps = np.array(eps)
        self._cache["eigenvalues"] = eps
        if with_weights:
            self._cache["weights"] = np.array(wts)  # (nk, N_atoms, n_states)
        self.results["eigenvalues"] = eps[None]
        self.results["fermi_level"] = fermi_level(eps, w, self.get_number_of_electrons(),
                                                  self.parameters.width)

    def get_eigenvalues(self, kpt=0, spin=0):
        """Eigenvalues (eV) at IBZ k-point index ``kpt``."""
        if spin != 0:
            raise IndexError(f"spin {spin}: this calculator is spin-paired (one channel)")
        self._spectrum()
        eps = self._cache["eigenvalues"]
        if not 0 <= kpt < len(eps):
            raise IndexError(f"k-point index {kpt} out of range: there are {len(eps)}")
        return eps[kpt].copy()

    def band_structure(self, reference=None):
        """:class:`ase.spectrum.band_structure.BandStructure` at the calculator's
        k-points (set ``kpts={"path": "GMKG", "npoints": 60}`` or a ``BandPath``).
        ``reference`` (eV) defaults to the Fermi level from these k-points; along a
        path pass the Fermi level of a k-grid calculation instead."""
        from ase.spectrum.band_structure import get_band_structure
        self._spectrum()
        return get_band_structure(atoms=self.atoms, calc=self, reference=reference)

    def get_fermi_level(self):
        self._atoms()
        if "fermi_level" not in self.results or "eigenvalues" not in self._cache:
            if self.blocks().n_orbitals > self.parameters.dense_limit:
                done = [v for k, v in self._cache.items() if isinstance(k, tuple) and
                        k[0] == "kpm"]  # any KPM run already done serves
                return (done[0] if done else self._kpm())["fermi_level"]
            self._spectrum()
        return self.results["fermi_level"]

    def _energies(self, emin, emax, npts, width, lo, hi):
        emin = lo - 5 * width if emin is None else emin
        emax = hi + 5 * width if emax is None else emax
        if not emax > emin or npts < 2:
            raise ValueError(f"need emin < emax and npts >= 2, got emin={emin}, emax={emax}, "
                             f"npts={npts}")
        return np.linspace(emin, emax, int(npts))

    def get_dos(self, width=0.1, npts=2001, emin=None, emax=None, method="auto"):
        """(energies, dos): Gaussian-broadened DOS per spin channel (states/eV).

        ``method``: 'dense', 'kpm' or 'auto' (dense up to ``dense_limit`` orbitals).
        With KPM the broadening is the Jackson kernel's (about ``width``).
        """
        self._atoms()
        if self._use_kpm(method):
            e, out = self._kpm_density(width, npts, emin, emax)
            return e, out["total"]
        self._spectrum()
        eps, w = self._cache["eigenvalues"], self._kpoints()[1]
        e = self._energies(emin, emax, npts, width, eps.min(), eps.max())
        return e, gaussian_dos(eps, w, e, width)

    def get_pdos(self, width=0.1, npts=2001, emin=None, emax=None, by="species",
                 method="auto"):
        """(energies, pdos): Mulliken-projected DOS per spin channel (states/eV).

        ``by='species'``: dict symbol -> (npts,); ``by='atom'``: (N_atoms, npts)
        array.  The projections sum to the total DOS.
        """
        if by not in ("species", "atom"):
            raise ValueError(f"by must be 'species' or 'atom', got {by!r}")
        atoms = self._atoms()
        symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
        if self._use_kpm(method):
            groups = None if by == "species" else "atom"
            e, out = self._kpm_density(width, npts, emin, emax, groups=groups)
            if by == "species":
                return e, {s: out[s] for s in dict.fromkeys(symbols)}
            return e, np.array([out[f"atom{a}"] for a in range(len(atoms))])
        self._spectrum(with_weights=True)
        eps, w = self._cache["eigenvalues"], self._kpoints()[1]
        e = self._energies(emin, emax, npts, width, eps.min(), eps.max())
        per_atom = gaussian_dos(eps, w, e, width, spectral=self._cache["weights"])
        if by == "atom":
            return e, per_atom
        return e, {s: per_atom[symbols == s].sum(0) for s in dict.fromkeys(symbols)}

    # -- kernel polynomial method ---------------------------------------------
    def _use_kpm(self, method):
        if method not in ("auto", "dense", "kpm"):
            raise ValueError(f"method must be 'auto', 'dense' or 'kpm', got {method!r}")
        if method == "auto":
            return self.blocks().n_orbitals > self.parameters.dense_limit
        return method == "kpm"

    def _kpm(self, width=0.1, groups=None):
        """Chebyshev moments at Gamma (cached per resolution and grouping)."""
        from .kpm import chebyshev_moments, kpm_density, spectral_bounds
        k, _ = self._kpoints()
        if len(k) > 1 or np.any(k):
            raise PropertyNotPresent("the kernel polynomial method is implemented at Gamma "
                                     "only; use kpts=None (a large supercell) or dense "
                                     "diagonalisation")
        atoms = self._atoms()
        H, S = self.get_hamiltonian(), self.get_overlap()
        key = ("kpm", width, groups)
        if key not in self._cache:
            opts = dict(self.parameters.kpm or {})
            lo, hi = self._cache.get("bounds") or spectral_bounds(H, S)
            self._cache["bounds"] = (lo, hi)
            a = 0.5 * (hi - lo)
            M = opts.get("n_moments") or int(np.clip(np.ceil(np.pi * a / width), 64, 8192))
            counts = self.blocks().orbital_counts
            atom_of = np.repeat(np.arange(len(atoms)), counts)
            symbols = np.array(atoms.get_chemical_symbols())
            if groups == "atom":
                g = {f"atom{i}": np.flatnonzero(atom_of == i) for i in range(len(atoms))}
            else:
                g = {s: np.flatnonzero(symbols[atom_of] == s) for s in dict.fromkeys(symbols)}
            mom = chebyshev_moments(H, S, n_moments=M, n_random=opts.get("n_random", 16),
                                    groups=g, bounds=(lo, hi), seed=opts.get("seed", 0),
                                    progress=self.parameters.progress)
            # Fermi level from the integrated KPM DOS (zero-temperature filling)
            e = np.linspace(lo, hi, 20001)
            dos = kpm_density(mom, e)["total"]
            cum = np.concatenate([[0], np.cumsum(0.5 * (dos[1:] + dos[:-1]) * np.diff(e))])
            n_el = self.get_number_of_electrons() / 2.0  # spin-paired
            ef = float(np.interp(n_el, cum, e))
            self._cache[key] = {"moments": mom, "fermi_level": ef}
            self.results.setdefault("fermi_level", ef)
        return self._cache[key]

    def _kpm_density(self, width, npts, emin, emax, groups=None):
        from .kpm import kpm_density
        r = self._kpm(width, groups)
        lo, hi = self._cache["bounds"]
        e = self._energies(emin, emax, npts, 0.0, lo, hi)
        return e, kpm_density(r["moments"], e)
