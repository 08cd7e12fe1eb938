"""Eigenvalue errors of `gearsh eval` aligned past spurious levels: a predicted H that puts
a level of S's near-null space far below the spectrum shifts the index of every level
above it, so levels compared by index are compared with their neighbours."""

import numpy as np
import pytest
from scipy.linalg import eigh

from ase_gearsh.core.blocks import assemble, orbital_offsets
from ase_gearsh.core.data import Dataset
from ase_gearsh.training import evaluate as ev
from ase_gearsh.training.evaluate import EvaluationError, aligned_window_errors


def test_offset_and_errors_of_inserted_and_lost_levels():
    rng = np.random.default_rng(0)
    ref = np.sort(rng.uniform(-20.0, 20.0, 200))
    window = np.abs(ref) <= 5.0
    noise = rng.normal(0.0, 1e-3, ref.size)
    # three spurious levels far below: every window level moves up by three places
    e = np.sort(np.r_[[-400.0, -300.0, -90.0], ref + noise])
    o, d = aligned_window_errors(e, ref, window)
    assert o == 3
    np.testing.assert_allclose(d, noise[window], atol=1e-12)
    # by index the same levels are off by the spacing of the spectrum
    assert np.abs(e[: ref.size][window] - ref[window]).mean() > 50 * np.abs(d).mean()
    # two levels lost below the window (pushed above the whole spectrum)
    e = np.sort(np.r_[ref[2:] + noise[2:], [300.0, 400.0]])
    o, d = aligned_window_errors(e, ref, window)
    assert o == -2
    np.testing.assert_allclose(d, noise[window], atol=1e-12)
    # a common shift is not mistaken for an offset; no window: nothing to align
    o, d = aligned_window_errors(ref + 1e-3, ref, window)
    assert o == 0 and np.allclose(d, 1e-3)
    assert aligned_window_errors(ref, ref, np.zeros(ref.size, bool))[0] == 0


def test_ties_prefer_no_offset_and_short_spectra_are_refused():
    ref = np.arange(10.0)  # equally spaced: offsets +-1 cost the same spacing
    o, d = aligned_window_errors(ref + 0.5, ref, ref >= 0)
    assert o == 0 and np.allclose(d, 0.5)
    with pytest.raises(EvaluationError, match="cannot hold"):
        aligned_window_errors(ref[:3], ref, ref >= 0)


def _blocks_of(M, s):
    """On-site and pair blocks of the dense Gamma-point matrix M in the dataset's order."""
    a = s.arrays
    counts = a["orbital_counts"]
    o = orbital_offsets(counts)
    on = np.concatenate([M[o[i] : o[i] + n, o[i] : o[i] + n].ravel() for i, n in enumerate(counts)])
    pr = np.zeros_like(a["pair_H"][0])
    for p, (i, j) in enumerate(a["pair_ij"]):
        blk = M[o[i] : o[i] + counts[i], o[j] : o[j] + counts[j]]
        pr[a["pair_offsets"][p] : a["pair_offsets"][p + 1]] = blk.ravel()
    return on, pr


def test_eval_aligns_gpaw_levels_past_a_spurious_level(water_dataset, small_model, monkeypatch):
    """GPAW's H plus -L (S c)(S c)^T for its highest state c moves that one level by -L
    and leaves every other eigenpair of (H, S) as GPAW's: moved below the spectrum, it
    is one spurious level under the window.  `gearsh eval` reports the offset 1 and
    GPAW's levels exactly once aligned."""
    ds = Dataset(water_dataset)

    def perturbed(model, s, info=None):
        H, S = s.hamiltonian(), s.overlap()
        e, C = eigh(H, S)
        u = S @ C[:, -1]
        Hp = H - (e[-1] - e[0] + 20.0) * np.outer(u, u)
        on, pr = _blocks_of(Hp, s)
        a = s.arrays
        back = assemble(a["orbital_counts"], on, a["pair_ij"], a["pair_shift"], pr)
        np.testing.assert_allclose(back, Hp, atol=1e-12)  # the blocks hold all of Hp
        return on, pr

    monkeypatch.setattr(ev, "predict_structure_blocks", perturbed)
    monkeypatch.setattr(
        "ase_gearsh.model.engine.Model.from_checkpoint", classmethod(lambda cls, p: small_model)
    )
    s = ev.evaluate("perturbed", ds, progress=False, limit=2)
    assert s["eig_level_offset_max"] == 1
    assert all(r["eig_level_offset"] == 1 for r in s["per_structure"])
    assert s["eig_mae_window_aligned_meV"] < 1e-6  # GPAW's levels, one place up
    assert s["eig_mae_window_meV"] > 100.0  # by index: each level against its neighbour
    # GPAW's own H: no offset, no error
    monkeypatch.setattr(
        ev,
        "predict_structure_blocks",
        lambda model, s, info=None: (s.arrays["onsite_H"][0], s.arrays["pair_H"][0]),
    )
    s = ev.evaluate("oracle", ds, progress=False, limit=2)
    assert s["eig_level_offset_max"] == 0 and s["eig_mae_window_aligned_meV"] < 1e-6


def test_a_level_brought_down_along_s_near_null_direction_is_counted(water_dataset):
    """GPAW's occupied levels of water have small |c|^2; H - (E / s) (S v)(S v)^T, with v
    S's eigenvector of smallest eigenvalue s, brings the level along v (|c|^2 ~ 1 / s)
    down among the occupied ones, and it is counted, without any reference."""
    from ase_gearsh.electronic.dense import coefficient_norms, fermi_level
    from ase_gearsh.electronic.spectrum import DenseSpectrum, OrbitalLabels

    s = Dataset(water_dataset)[0]
    H, S = s.hamiltonian(), s.overlap()
    lam, U = np.linalg.eigh(S)
    v, smin = U[:, 0], lam[0]
    threshold = 0.5 / smin  # between GPAW's occupied levels and the level along v
    e, norms, w = coefficient_norms(H, S)
    assert w is None
    np.testing.assert_allclose(e, eigh(H, S, eigvals_only=True), atol=1e-10)
    assert norms[:4].max() < 0.5 * threshold  # water: 8 electrons, 4 occupied levels
    labels = OrbitalLabels.from_counts(s.orbital_counts, s.atoms.get_chemical_symbols())

    def count(Hm):
        sp = DenseSpectrum(lambda k: Hm, lambda k: S, np.zeros((1, 3)), [1.0], labels)
        ef = sp.fermi_level(8.0, 0.01)
        return sp.near_null_levels(ef, threshold), ef, sp

    n, ef, sp = count(H)
    assert n.tolist() == [0] and ef == pytest.approx(fermi_level(e[None], [1.0], 8.0, 0.01))
    Hp = H - ((e[-1] - e[0] + 20.0) / smin) * np.outer(S @ v, S @ v)
    n, ef, sp = count(Hp)
    assert n.tolist() == [1]
    low = np.argmin(sp.eigenvalues()[0])
    assert sp.coefficient_norms()[0, low] > threshold and sp.eigenvalues()[0, low] < e[0]
    with pytest.raises(ValueError, match="threshold"):
        sp.near_null_levels(ef, 0.0)
