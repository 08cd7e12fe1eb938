"""Spectra of H(k) c = E S(k) c: eigenvalues, Fermi level, DOS and projected DOS.

Two interchangeable objects with the same ``fermi_level``/``dos``/``pdos`` methods:

* :class:`DenseSpectrum`: dense diagonalisation at every k-point (weights from
  :class:`~ase_gearsh.electronic.kpoints.KPoints`), Fermi-Dirac Fermi level,
  Gaussian-broadened DOS and Mulliken PDOS (:mod:`ase_gearsh.electronic.dense`);
* :class:`KPMSpectrum`: the kernel polynomial method at Gamma for large sparse
  matrices (:mod:`ase_gearsh.electronic.kpm`), moments cached per resolution.

Inputs are plain: functions k -> sparse H(k), S(k) (or the Gamma matrices), the
k-points, the atom of every orbital and the symbol of every atom
(:class:`OrbitalLabels`).  Energies in eV; DOS per spin channel (states/eV,
integrating to the number of orbitals); projections sum to the total DOS.
Results are computed on first use and cached; ``progress`` may be switched at
any time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .checks import ArgumentError, check_choice, check_positive
from .deflation import DeepStates, DeflationError, deep_states
from .dense import (
    NEAR_NULL_NORM,
    check_overlap_cutoff,
    coefficient_norms,
    energy_grid,
    fermi_level,
    gaussian_dos,
    group_matrix,
    solve_dense,
)
from .kpm import (
    PRECISIONS,
    CholeskyFactor,
    KPMError,
    KPMMoments,
    KPMResolutionWarning,
    chebyshev_moments,
    kpm_density,
    kpm_fermi_level,
    kpm_n_moments,
    kpm_resolution,
    spectral_bounds,
)

__all__ = [
    "DenseSpectrum",
    "KPMSpectrum",
    "KPMOptions",
    "OrbitalLabels",
    "KPM_DEFAULTS",
    "METHODS",
    "PROJECTIONS",
    "RESOLUTION_AT",
    "check_dos_args",
    "check_kpm_options",
    "check_projection",
]

METHODS = ("auto", "dense", "kpm")
RESOLUTION_AT = ("interval", "fermi")
FERMI_SPAN = 1.5  # eV either side of the probe's E_F where resolution_at='fermi' holds
PROBE_RESOLUTION = 0.5  # eV at the centre of the interval: the probe that finds E_F
PROJECTIONS = ("species", "atom")
MatrixFunction = Callable[[np.ndarray], Any]  # scaled k-point (3,) -> sparse matrix


@dataclass(frozen=True)
class KPMOptions:
    """Options of the kernel polynomial method.

    n_moments: fixed number of Chebyshev moments, or None for the number whose
    Jackson resolution matches the requested width; n_random: random vectors;
    seed: of the random vectors; fermi_width: resolution (eV) of the total DOS
    from which the Fermi level is taken (fixed, so that the level does not
    depend on which DOS was asked for first); deep_below: the states of atomic levels
    below this energy (eV; semicore s and p such as W 5s/5p, Hf 5s/5p, Ni 3p) leave the
    Chebyshev interval and are added back exactly
    (:mod:`ase_gearsh.electronic.deflation`), so that a resolution needs fewer moments
    (0.6x for the WSe2/HfO2:Ni device's basis); 'auto' (default): the threshold of
    :func:`~ase_gearsh.electronic.deflation.auto_threshold`, a wide gap in the atomic
    levels well below their median, if any (a structure whose deep levels turn out not
    to be separated then runs without, with a warning); None: never.
    precision: of the triangular solves with S's Cholesky factor
    (:class:`~ase_gearsh.electronic.kpm.CholeskyFactor`): 'double', 'single' (twice as
    fast at device scale; the vectors stay in double precision), or 'auto' (default):
    single for a real S of at least 20,000 orbitals, double otherwise.
    resolution_at: where a DOS of width w has the resolution w.  'interval' (default):
    everywhere, the moments that the centre of the Chebyshev interval needs (pi a / w,
    a its half-width).  'fermi': within FERMI_SPAN (1.5 eV) of the Fermi level, where
    hole counts and band edges are read; the Jackson kernel is narrower away from the
    centre (:func:`~ase_gearsh.electronic.kpm.kpm_resolution`), so when E_F lies far from
    it fewer moments suffice (0.77x for the WSe2/HfO2:Ni device), and the DOS is coarser
    towards the centre (at most w / sqrt(1 - x_F^2)).  E_F comes from the first moments
    (a probe of resolution PROBE_RESOLUTION = 0.5 eV at the centre, or 4 w), which the
    recursion then extends: the probe costs no extra steps.  Needs the number of
    electrons (the calculator sets it).
    """

    n_moments: int | None = None
    n_random: int = 16
    seed: Any = 0
    fermi_width: float = 0.1
    deep_below: float | str | None = "auto"
    precision: str = "auto"
    resolution_at: str = "interval"

    @classmethod
    def from_parameter(cls, kpm: dict | None) -> KPMOptions:
        """From a (partial) dict of options, checked by :func:`check_kpm_options`."""
        check_kpm_options(kpm)
        return cls(**(kpm or {}))


KPM_DEFAULTS = {f.name: f.default for f in fields(KPMOptions)}


def check_kpm_options(kpm: dict | None) -> None:
    """Require None or a dict with some of the keys of :data:`KPM_DEFAULTS`, valid values."""
    if kpm is None:
        return
    if not isinstance(kpm, dict):
        raise ArgumentError(
            f"kpm must be a dict with keys {sorted(KPM_DEFAULTS)}, got {type(kpm).__name__}"
        )
    unknown = sorted(set(kpm) - set(KPM_DEFAULTS))
    if unknown:
        raise ArgumentError(
            f"kpm: unknown key(s) {unknown}; expected some of {sorted(KPM_DEFAULTS)}"
        )
    if kpm.get("n_moments") is not None:
        check_positive("kpm['n_moments']", kpm["n_moments"], integer=True)
        if kpm["n_moments"] < 2:
            raise ArgumentError(f"kpm['n_moments'] must be >= 2, got {kpm['n_moments']}")
    if "n_random" in kpm:
        check_positive("kpm['n_random']", kpm["n_random"], integer=True)
    if "fermi_width" in kpm:
        check_positive("kpm['fermi_width']", kpm["fermi_width"])
    if "precision" in kpm:
        check_choice("kpm['precision']", kpm["precision"], PRECISIONS)
    if "resolution_at" in kpm:
        check_choice("kpm['resolution_at']", kpm["resolution_at"], RESOLUTION_AT)
    below = kpm.get("deep_below")
    if (
        below is not None
        and not (isinstance(below, str) and below == "auto")
        and (
            isinstance(below, bool)
            or not isinstance(below, (int, float, np.integer, np.floating))
            or not np.isfinite(below)
        )
    ):
        raise ArgumentError(
            f"kpm['deep_below'] must be 'auto', None or a finite energy in eV, got {below!r}"
        )


def check_dos_args(width, npts, emin, emax, method: str = "auto") -> None:
    """Require a DOS broadening > 0, ``npts`` >= 2, ``emin < emax`` (when both are
    given) and a method from :data:`METHODS`."""
    check_positive("width (DOS broadening, eV)", width)
    if isinstance(npts, bool) or not isinstance(npts, (int, np.integer)) or npts < 2:
        raise ArgumentError(f"npts must be an integer >= 2, got {npts!r}")
    if emin is not None and emax is not None and not emax > emin:
        raise ArgumentError(f"need emin < emax, got emin={emin}, emax={emax}")
    check_choice("method", method, METHODS)


def check_projection(by, symbols: Sequence[str]):
    """A PDOS projection: ``'species'`` or ``'atom'`` (returned as is), or elements of the
    structure with chemical ``symbols`` taken together (a list, tuple or array such as
    ``['W', 'Se']``: one row keyed ``'W+Se'``, e.g. the paper's hole count), returned as
    a tuple in the structure's order of first appearance (so that ``['Se', 'W']`` is the
    same row and the same cached moments)."""
    if isinstance(by, str):
        if by not in PROJECTIONS and by in symbols:
            raise ArgumentError(
                f"by must be 'species', 'atom' or a list of element symbols; got {by!r} "
                f"(for that element alone: by=[{by!r}])"
            )
        check_choice("by", by, PROJECTIONS)
        return by
    if isinstance(by, np.ndarray) and by.ndim == 1:
        by = by.tolist()
    if not isinstance(by, (list, tuple)) or not by or not all(isinstance(x, str) for x in by):
        raise ArgumentError(
            f"by must be 'species', 'atom' or a non-empty list of element symbols "
            f"(e.g. ['W', 'Se']), got {by!r}"
        )
    species = list(dict.fromkeys(symbols))
    if len(set(by)) != len(by):
        raise ArgumentError(f"by lists an element twice: {list(by)}; its elements are {species}")
    missing = [x for x in by if x not in species]
    if missing:
        raise ArgumentError(f"by: {missing} not in this structure; its elements are {species}")
    return tuple(x for x in species if x in by)


@dataclass(frozen=True, eq=False)
class OrbitalLabels:
    """Which atom every orbital belongs to (``atom_of``, (n_orbitals,)) and the
    chemical symbol of every atom (``symbols``); defines the projections."""

    atom_of: np.ndarray
    symbols: tuple[str, ...]

    @classmethod
    def from_counts(cls, orbital_counts: Sequence[int], symbols: Sequence[str]) -> OrbitalLabels:
        """From the number of orbitals of every atom (atoms in orbital order)."""
        counts = np.asarray(orbital_counts, int)
        return cls(np.repeat(np.arange(len(counts)), counts), tuple(symbols))

    @property
    def species(self) -> list[str]:
        """Distinct symbols in order of first appearance."""
        return list(dict.fromkeys(self.symbols))

    def atom_matrix(self):
        """Sparse (n_atoms, n_orbitals) 0/1 matrix: orbital -> atom."""
        return group_matrix(self.atom_of, len(self.symbols))

    def projection(self, by):
        """``by`` checked against this structure (:func:`check_projection`)."""
        return check_projection(by, self.symbols)

    def groups(self, by="species") -> dict[str, np.ndarray]:
        """Orbital indices per species (``by='species'``, keyed by symbol), per atom
        (``'atom'``, keyed ``'atom0'``, ``'atom1'``...) or of a list of elements together
        (keyed ``'W+Se'``)."""
        by = self.projection(by)
        if by == "atom":
            return {f"atom{i}": np.flatnonzero(self.atom_of == i) for i in range(len(self.symbols))}
        symbols = np.array(self.symbols, dtype=object)[self.atom_of]
        if isinstance(by, tuple):
            return {"+".join(by): np.flatnonzero(np.isin(symbols, by))}
        return {s: np.flatnonzero(symbols == s) for s in dict.fromkeys(symbols)}

    def from_atoms(self, per_atom: np.ndarray, by="species"):
        """Per-atom rows (n_atoms, ...) as returned by ``pdos``: the array itself
        (``by='atom'``), a dict symbol -> sum over that species' atoms, or for a list of
        elements a dict ``'W+Se'`` -> sum over their atoms."""
        by = self.projection(by)
        if by == "atom":
            return per_atom
        symbols = np.array(self.symbols, dtype=object)
        if isinstance(by, tuple):
            return {"+".join(by): per_atom[np.isin(symbols, by)].sum(0)}
        return {s: per_atom[symbols == s].sum(0) for s in self.species}

    def from_groups(self, density: dict[str, np.ndarray], by="species"):
        """:meth:`groups`-keyed rows as returned by ``pdos``: (n_atoms, ...) array
        (``by='atom'``) or a dict symbol (or ``'W+Se'``) -> row."""
        by = self.projection(by)
        if by == "atom":
            return np.array([density[f"atom{a}"] for a in range(len(self.symbols))])
        if isinstance(by, tuple):
            return {"+".join(by): density["+".join(by)]}
        return {s: density[s] for s in self.species}


class DenseSpectrum:
    """Dense eigenvalues and Mulliken weights at k-points with weights.

    ``hamiltonian``/``overlap``: functions of a scaled k-point returning H(k),
    S(k) (sparse or dense, eV); ``kpts`` (nk, 3) scaled and ``weights`` (nk,)
    summing to 1 (e.g. the IBZ of :class:`~ase_gearsh.electronic.kpoints.KPoints`).
    ``overlap_cutoff`` > 0: canonical orthogonalisation at every k-point
    (:func:`~ase_gearsh.electronic.dense.solve_dense`); every k-point then keeps the
    number of bands of the k-point that keeps fewest (the highest states go).
    """

    def __init__(
        self,
        hamiltonian: MatrixFunction,
        overlap: MatrixFunction,
        kpts,
        weights,
        labels: OrbitalLabels,
        progress: bool = False,
        overlap_cutoff: float = 0.0,
    ):
        self.hamiltonian, self.overlap, self.labels = hamiltonian, overlap, labels
        self.overlap_cutoff = check_overlap_cutoff(overlap_cutoff)
        self.kpts = np.asarray(kpts, float).reshape(-1, 3)
        self.weights = np.asarray(weights, float)
        self.progress = progress
        self._eigenvalues: np.ndarray | None = None
        self._mulliken: tuple[np.ndarray, np.ndarray] | None = None
        self._norms: np.ndarray | None = None

    def _kpoints(self, desc: str):
        it = range(len(self.kpts))
        if self.progress and len(it) > 1:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=desc, unit="k-point", leave=False)
        return it

    def _solve(self, desc: str, groups=None) -> list:
        out = [
            solve_dense(
                self.hamiltonian(self.kpts[q]),
                self.overlap(self.kpts[q]),
                groups,
                overlap_cutoff=self.overlap_cutoff,
            )
            for q in self._kpoints(desc)
        ]
        nb = min(len(e) for e, _ in out)  # canonical orthogonalisation: equal band counts
        return [(e[:nb], None if m is None else m[:, :nb]) for e, m in out]

    def _solve_vectors(self) -> None:
        """Eigenvectors at every k-point: Mulliken weights and |c|^2 in one pass."""
        out = [
            coefficient_norms(
                self.hamiltonian(self.kpts[q]),
                self.overlap(self.kpts[q]),
                self.overlap_cutoff,
                self.labels.atom_matrix(),
            )
            for q in self._kpoints("eigh")
        ]
        nb = min(len(e) for e, _, _ in out)  # canonical orthogonalisation: equal band counts
        self._mulliken = (
            np.array([e[:nb] for e, _, _ in out]),
            np.array([w[:, :nb] for _, _, w in out]),
        )
        self._norms = np.array([n[:nb] for _, n, _ in out])

    def eigenvalues(self) -> np.ndarray:
        """(nk, n_bands) eigenvalues (eV) at every k-point (cached; not a copy)."""
        if self._eigenvalues is None:
            self._eigenvalues = np.array([e for e, _ in self._solve("eigh")])
        return self._eigenvalues

    def mulliken(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues (nk, nb), per-atom Mulliken weights (nk, n_atoms, nb)), cached."""
        if self._mulliken is None:
            self._solve_vectors()
        return self._mulliken

    def coefficient_norms(self) -> np.ndarray:
        """(nk, n_bands) |c|^2 of the S-normalised eigenvectors (cached;
        :func:`~ase_gearsh.electronic.dense.coefficient_norms`)."""
        if self._norms is None:
            self._solve_vectors()
        return self._norms

    def near_null_levels(self, fermi_level: float, threshold: float = NEAR_NULL_NORM) -> np.ndarray:
        """Per k-point, the number of levels below ``fermi_level`` whose S-normalised
        eigenvector has |c|^2 > ``threshold``: occupied levels along S's near-null
        directions, spurious in a predicted H (each one moves E_F by one state)."""
        if not threshold > 0:
            raise ArgumentError(f"threshold must be > 0; got {threshold}")
        eps, norms = self.eigenvalues(), self.coefficient_norms()
        return ((eps[:, : norms.shape[1]] < fermi_level) & (norms > threshold)).sum(axis=1)

    def fermi_level(self, n_electrons: float, width: float) -> float:
        """Fermi-Dirac (``width`` eV) Fermi level holding ``n_electrons`` (spin-paired);
        mid-gap for insulators (:func:`~ase_gearsh.electronic.dense.fermi_level`)."""
        return fermi_level(self.eigenvalues(), self.weights, n_electrons, width)

    def dos(
        self,
        width: float = 0.1,
        npts: int = 2001,
        emin: float | None = None,
        emax: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(energies, DOS): Gaussians of ``width`` eV; the grid defaults to the
        spectrum widened by 5 ``width``."""
        eps = self.eigenvalues()
        e = energy_grid(emin, emax, npts, eps.min(), eps.max(), 5 * width)
        return e, gaussian_dos(eps, self.weights, e, width)

    def pdos(
        self,
        width: float = 0.1,
        npts: int = 2001,
        emin: float | None = None,
        emax: float | None = None,
        by: str = "species",
    ):
        """(energies, PDOS): Mulliken-projected :meth:`dos`, a dict symbol -> (npts,)
        (``by='species'``), an (n_atoms, npts) array (``by='atom'``) or a dict
        ``'W+Se'`` -> (npts,) (``by=['W', 'Se']``)."""
        by = self.labels.projection(by)
        eps, weights = self.mulliken()
        e = energy_grid(emin, emax, npts, eps.min(), eps.max(), 5 * width)
        per_atom = gaussian_dos(eps, self.weights, e, width, spectral=weights)
        return e, self.labels.from_atoms(per_atom, by)


class KPMSpectrum:
    """Kernel polynomial DOS/PDOS and Fermi level of sparse ``hamiltonian`` and
    ``overlap`` (at Gamma), with :class:`KPMOptions` (or a partial dict of them).

    The spectral bounds are computed once; the moments once per (number of
    moments, projection): every width with the same number of moments shares them.
    """

    def __init__(
        self,
        hamiltonian,
        overlap,
        labels: OrbitalLabels,
        options: KPMOptions | dict | None = None,
        progress: bool = False,
        bounds: tuple[float, float] | None = None,
        n_electrons: float | None = None,
    ):
        self.hamiltonian, self.overlap, self.labels = hamiltonian, overlap, labels
        self.n_electrons = n_electrons  # for resolution_at='fermi'
        self.options = (
            options if isinstance(options, KPMOptions) else KPMOptions.from_parameter(options)
        )
        self.progress = progress
        self._bounds = bounds
        self._factor: CholeskyFactor | None = None
        self._deep: DeepStates | None | bool = False  # False: not yet looked for
        self._moments: dict[tuple[int, str | None], KPMMoments] = {}
        self._counts: dict[float, int] = {}  # width -> moments chosen by a probe
        self._fermi_guess: float | None = None  # E_F of the last probe

    def with_options(self, options: KPMOptions | dict | None) -> KPMSpectrum:
        """The same matrices, factor and bounds with other options (moments recomputed;
        the bounds and deep states too when ``deep_below`` changes, the factor when
        ``precision`` changes)."""
        other = KPMSpectrum(
            self.hamiltonian,
            self.overlap,
            self.labels,
            options,
            self.progress,
            n_electrons=self.n_electrons,
        )
        if other.options.precision == self.options.precision:
            other._factor = self._factor
        if other.options.deep_below == self.options.deep_below:
            other._bounds, other._deep = self._bounds, self._deep
        return other

    @property
    def deep(self) -> DeepStates | None:
        """The deep states below ``options.deep_below`` (:func:`deep_states`), found once;
        None when that option is None or no atomic level lies below it."""
        if self._deep is False:
            below = self.options.deep_below
            self._deep = None
            if below is not None:
                try:
                    self._deep = deep_states(
                        self.hamiltonian, self.overlap, self.labels.atom_of, below
                    )
                except DeflationError as err:
                    if below != "auto":
                        raise
                    warnings.warn(
                        f"KPM runs without taking deep states out of its interval: {err}",
                        stacklevel=3,
                    )
        return self._deep

    @property
    def plot_bounds(self) -> tuple[float, float]:
        """The spectral bounds, widened down to 1 eV below the lowest deep state."""
        lo, hi = self.bounds
        if self.deep is not None:
            lo = min(lo, float(self.deep.energies.min()) - 1.0)
        return lo, hi

    @property
    def factor(self) -> CholeskyFactor:
        """The sparse Cholesky factor of S, made once and shared by every KPM call."""
        if self._factor is None:
            self._factor = CholeskyFactor(self.overlap, precision=self.options.precision)
        return self._factor

    @property
    def bounds(self) -> tuple[float, float]:
        """(emin, emax) eV enclosing the spectrum (:func:`spectral_bounds`), cached."""
        if self._bounds is None:
            self._bounds = spectral_bounds(
                self.hamiltonian, self.overlap, factor=self.factor, deep=self.deep
            )
        return self._bounds

    def n_moments(self, width: float, warn: bool = False) -> int:
        """``options.n_moments``, or the number whose resolution is about ``width`` eV
        (with ``resolution_at='fermi'``, once the probe of :meth:`moments` has found E_F:
        there; before it, everywhere; at most 8192; with ``warn`` a
        :class:`KPMResolutionWarning` states the resolution reached when that is coarser
        than ``width``)."""
        bounds = self.bounds
        m = self.options.n_moments or self._counts.get(width) or kpm_n_moments(bounds, width)
        reached = kpm_resolution(bounds, m, self._fermi_guess if width in self._counts else None)
        if warn and reached > 1.5 * width:
            warnings.warn(
                f"KPM DOS resolution is {reached:.3g} eV with {m} moments over the spectrum "
                f"({bounds[0]:.1f}, {bounds[1]:.1f}) eV, coarser than width={width:g} eV: "
                f"peaks are broader and lower than asked; use method='dense' (up to "
                f"dense_limit orbitals) or a larger width",
                KPMResolutionWarning,
                stacklevel=4,
            )
        return m

    def moments(self, width: float = 0.1, by: str | None = "species") -> KPMMoments:
        """Chebyshev moments for a resolution of about ``width`` eV, projected on species
        or atoms (cached; the total row is the same for either).  ``by=None``: the
        total alone, two moments per Chebyshev step (half the steps of a projection on
        several groups; a list of elements is one group and doubles too),
        or the total row of a projection already computed at this resolution."""
        if by is not None:
            by = self.labels.projection(by)
        m = self.n_moments(width)
        key = (m, by)
        if by is None and key not in self._moments:
            done = next((v for (k, _), v in self._moments.items() if k == m), None)
            if done is not None:  # the total row of a projection: the same random vectors
                self._moments[key] = done.rows(done.names[:1])
        if key not in self._moments:
            opts = self.options
            probe = None
            if opts.resolution_at == "fermi" and not opts.n_moments and width not in self._counts:
                probe = self._fermi_probe(width, m)
            mom = chebyshev_moments(
                self.hamiltonian,
                self.overlap,
                n_moments=m,
                n_random=opts.n_random,
                groups=None if by is None else self.labels.groups(by),
                bounds=self.bounds,
                seed=opts.seed,
                progress=self.progress,
                factor=self.factor,
                deep=self.deep,
                probe=probe,
            )
            self._counts[width] = mom.moments.shape[1]
            key = (mom.moments.shape[1], by)
            self._moments[key] = mom
        return self._moments[key]

    def _fermi_probe(self, width: float, m_max: int):
        """(m_probe, choose) for :func:`chebyshev_moments`: E_F from the first moments,
        then the fewest moments with the resolution ``width`` within FERMI_SPAN of it."""
        if self.n_electrons is None:
            raise KPMError(
                "kpm['resolution_at'] = 'fermi' needs the number of electrons: "
                "KPMSpectrum(..., n_electrons=N) (the calculator sets it)"
            )
        bounds = self.bounds
        m_probe = min(m_max, kpm_n_moments(bounds, max(PROBE_RESOLUTION, 4.0 * width)))

        def choose(first: KPMMoments) -> int:
            ef = kpm_fermi_level(first.rows(first.names[:1]), self.n_electrons)
            self._fermi_guess = ef
            span = (ef - FERMI_SPAN, ef + FERMI_SPAN)
            return max(m_probe, kpm_n_moments(bounds, width, energies=span))

        return m_probe, choose

    def fermi_level(self, n_electrons: float) -> float:
        """From the integrated total DOS at the fixed resolution ``options.fermi_width``."""
        return kpm_fermi_level(self.moments(self.options.fermi_width, None), n_electrons)

    def _density(self, width, npts, emin, emax, by) -> tuple[np.ndarray, dict]:
        self.n_moments(width, warn=True)  # the DOS asked for: say if it is coarser
        mom = self.moments(width, by)
        e = energy_grid(emin, emax, npts, *self.plot_bounds)
        return e, kpm_density(mom, e)

    def dos(
        self,
        width: float = 0.1,
        npts: int = 2001,
        emin: float | None = None,
        emax: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(energies, DOS), Jackson kernel of resolution about ``width`` eV; the grid
        defaults to the spectral bounds."""
        e, density = self._density(width, npts, emin, emax, None)
        return e, density["total"]

    def pdos(
        self,
        width: float = 0.1,
        npts: int = 2001,
        emin: float | None = None,
        emax: float | None = None,
        by: str = "species",
    ):
        """(energies, PDOS) as :meth:`DenseSpectrum.pdos`, from the projected moments
        (a list of elements is one group: two moments per Chebyshev step, see
        :func:`~ase_gearsh.electronic.kpm.chebyshev_moments`)."""
        by = self.labels.projection(by)
        e, density = self._density(width, npts, emin, emax, by)
        return e, self.labels.from_groups(density, by)
