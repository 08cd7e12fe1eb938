"""The Jackson kernel's resolution across the interval, and KPM resolved at E_F."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
from test_deflation import solid
from test_kpm import atom_groups, chain

from ase_gearsh.electronic.checks import ArgumentError
from ase_gearsh.electronic.kpm import (
    KPMError,
    chebyshev_moments,
    jackson_kernel,
    kpm_n_moments,
    kpm_resolution,
    spectral_bounds,
)
from ase_gearsh.electronic.spectrum import (
    FERMI_SPAN,
    KPMSpectrum,
    OrbitalLabels,
    check_kpm_options,
)


def kernel_std(M, x0, npts=200_001):
    """Standard deviation (in x) of the Jackson-damped delta at x0, from its series
    integrated in t = arccos x (the density times dx is the series over pi, in dt)."""
    t = np.linspace(0.0, np.pi, npts)
    c = jackson_kernel(M) * np.cos(np.arange(M) * np.arccos(x0))
    c[1:] *= 2.0
    f = np.cos(np.outer(t, np.arange(M))) @ c / np.pi
    x = np.cos(t)
    near = np.abs(x - x0) < 25.0 * np.pi / M  # the peak, not the far ripples
    w = f[near]
    mean = (w * x[near]).sum() / w.sum()
    return np.sqrt((w * (x[near] - mean) ** 2).sum() / w.sum())


@pytest.mark.parametrize("x0", [0.0, -0.5, 0.8, -0.95])
def test_resolution_at_an_energy_is_the_kernel_width_there(x0):
    """kpm_resolution(bounds, M, E) is the Jackson kernel's own width at E: the standard
    deviation of a broadened level, narrower away from the centre as sqrt(1 - x^2)."""
    bounds, M = (-10.0, 30.0), 300
    a = 0.5 * (bounds[1] - bounds[0]) / 0.99  # the mapping's half-width (1 % edges)
    energy = 10.0 + a * x0
    measured = a * kernel_std(M, x0)
    assert kpm_resolution(bounds, M, energy) == pytest.approx(measured, rel=0.03)
    assert kpm_resolution(bounds, M, energy) <= kpm_resolution(bounds, M) * (1 + 1e-12)
    if x0:
        ratio = kpm_resolution(bounds, M, energy) / kpm_resolution(bounds, M)
        assert ratio == pytest.approx(np.sqrt(1 - x0**2), rel=0.02)


def test_moments_for_a_resolution_in_an_energy_range():
    bounds = (-17.0, 65.0)
    everywhere = kpm_n_moments(bounds, 0.1)
    near = kpm_n_moments(bounds, 0.1, energies=(2.5, 5.5))  # x from -0.52 to -0.45: ~0.9x
    assert 0.85 * everywhere < near < 0.92 * everywhere
    # the fewest: the resolution holds over the range with them, not with one fewer
    for e in np.linspace(2.5, 5.5, 7):
        assert kpm_resolution(bounds, near, e) <= 0.1
    assert max(kpm_resolution(bounds, near - 1, e) for e in (2.5, 5.5)) > 0.1
    # a range over the centre needs the centre's count (up to the 1 % edges)
    assert kpm_n_moments(bounds, 0.1, energies=(0.0, 40.0)) == pytest.approx(everywhere, rel=0.02)
    with pytest.raises(KPMError, match="lo <= hi"):
        kpm_n_moments(bounds, 0.1, energies=(3.0, 2.0))


@pytest.mark.parametrize("groups, doubling", [(None, None), ("atoms", None), ("atoms", False)])
def test_probe_extends_the_recursion_to_the_same_moments(groups, doubling):
    """With a probe the recursion stops, ``choose`` sees the first moments, and the
    moments it then asks for are the same numbers as a run of that length, in as many
    steps (the probe costs none)."""
    H, S = chain(60, seed=3)
    g = None if groups is None else atom_groups(60)
    bounds = spectral_bounds(H, S)
    kw = dict(groups=g, bounds=bounds, seed=4, doubling=doubling)
    direct = chebyshev_moments(H, S, 77, 8, **kw)
    seen = []

    def choose(first):
        seen.append(first)
        return 77

    probed = chebyshev_moments(H, S, 120, 8, probe=(30, choose), **kw)
    assert probed.moments.shape == direct.moments.shape
    assert np.abs(probed.moments - direct.moments).max() < 1e-10 * H.shape[0]
    assert np.abs(probed.per_vector - direct.per_vector).max() < 1e-10 * H.shape[0]
    (first,) = seen
    assert first.moments.shape[1] == 30
    assert np.abs(first.moments - direct.moments[:, :30]).max() < 1e-10 * H.shape[0]
    # fewer than the probe's: the first moments, cut
    short = chebyshev_moments(H, S, 120, 8, probe=(30, lambda m: 12), **kw)
    assert np.abs(short.moments - direct.moments[:, :12]).max() < 1e-10 * H.shape[0]


def test_probe_errors():
    H, S = chain(30)
    with pytest.raises(KPMError, match="stochastic"):
        chebyshev_moments(H, S, 40, exact=True, probe=(10, lambda m: 20))
    with pytest.raises(KPMError, match="2 <= m_probe <= n_moments"):
        chebyshev_moments(H, S, 40, probe=(50, lambda m: 20))
    with pytest.raises(KPMError, match="choose callable"):
        chebyshev_moments(H, S, 40, probe=(10, 20))
    with pytest.raises(KPMError, match="integer >= 2"):
        chebyshev_moments(H, S, 40, probe=(10, lambda m: 1))


def test_spectrum_resolved_at_the_fermi_level():
    """resolution_at='fermi': E_F lies near the top of this spectrum (x ~ 0.7), so the
    width holds there with about 0.7x the moments; the Fermi level, the DOS near it and a
    window count match the dense solution as the full count does."""
    H, S, atom_of = solid()
    labels = OrbitalLabels(atom_of, tuple("AB"[i % 2] for i in range(40)))
    n_el = 2 * (40 + 50)
    width = 0.2
    opts = {"n_random": 32, "deep_below": None, "fermi_width": width}
    full = KPMSpectrum(H, S, labels, opts, n_electrons=n_el)
    at_ef = KPMSpectrum(H, S, labels, {**opts, "resolution_at": "fermi"}, n_electrons=n_el)
    m_full = full.n_moments(width)
    assert at_ef.n_moments(width) == m_full  # before the probe: everywhere
    ef = at_ef.fermi_level(n_el)  # the probe, then the moments at E_F
    m_ef = at_ef.n_moments(width)
    span = (at_ef._fermi_guess - FERMI_SPAN, at_ef._fermi_guess + FERMI_SPAN)
    assert m_ef == kpm_n_moments(at_ef.bounds, width, energies=span) < 0.8 * m_full
    assert kpm_resolution(at_ef.bounds, m_ef, ef) <= width
    assert abs(at_ef._fermi_guess - ef) < 0.5  # the probe's level, 0.5 eV resolution
    E, C = la.eigh(H.toarray(), S.toarray())
    n_occ = n_el // 2
    assert E[n_occ - 1] - 2 * width <= ef <= E[n_occ] + 2 * width
    assert abs(ef - full.fermi_level(n_el)) < width
    # the DOS within 1 eV of E_F: as close to the dense one broadened by the same width
    # as the full count's (both resolve it to the width)
    e = np.linspace(ef - 1.0, ef + 1.0, 201)
    gauss = np.exp(-0.5 * ((e[:, None] - E) / width) ** 2).sum(axis=1)
    gauss /= width * np.sqrt(2 * np.pi)
    err_ef = np.abs(at_ef.dos(width, emin=e[0], emax=e[-1], npts=201)[1] - gauss).mean()
    err_full = np.abs(full.dos(width, emin=e[0], emax=e[-1], npts=201)[1] - gauss).mean()
    assert err_ef < 0.25 * gauss.mean() and err_full < 0.25 * gauss.mean()
    # the projection reuses the count found by the probe; the total row is shared
    pdos_moments = at_ef.moments(width, "species")
    assert pdos_moments.moments.shape[1] == m_ef
    np.testing.assert_allclose(
        pdos_moments.moments[0], at_ef.moments(width, None).moments[0], atol=1e-9 * len(E)
    )
    # without the electron count there is no Fermi level to resolve at
    no_n = KPMSpectrum(H, S, labels, {**opts, "resolution_at": "fermi"})
    with pytest.raises(KPMError, match="needs the number of electrons"):
        no_n.moments(width, None)
    with pytest.raises(ArgumentError, match="resolution_at"):
        check_kpm_options({"resolution_at": "centre"})


@pytest.fixture(scope="module")
def model(small_model):
    """The small random model with its basis functions (for the exact S)."""
    from gpaw_tools.overlap import basis_for_registry

    basis = basis_for_registry(small_model.registry, "PBE", "paw")
    small_model.basis_data = {k: v.to_dict() for k, v in basis.items()}
    return small_model


def test_predict_resolves_the_hole_count_at_the_fermi_level(model, make_atoms, tmp_path):
    """``gearsh predict --resolution-at fermi`` (predict_structure): the KPM option reaches
    the calculator, which gives KPM its electron count, and the summary; an unknown value
    is refused before anything is written."""
    from ase_gearsh.predict import PredictError, predict_structure

    atoms = make_atoms.chain().repeat((1, 1, 4))
    atoms.rattle(0.02, seed=1)
    kw = dict(method="kpm", holes=["C", "H"], hole_window=1.0, progress=False, log=lambda s: 0)
    s = predict_structure(atoms, model, tmp_path / "fermi", resolution_at="fermi", **kw)
    assert s["method"] == "kpm" and s["kpm"]["resolution_at"] == "fermi"
    assert 2 <= s["kpm"]["moments"] and s["holes"]["holes_stderr"] is not None
    with pytest.raises(PredictError, match="--resolution-at must be 'interval' or 'fermi'"):
        predict_structure(atoms, model, tmp_path / "bad", resolution_at="centre", **kw)
    assert not (tmp_path / "bad").exists()
