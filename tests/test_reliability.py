"""The reliability figure: invariant features, scores, storage, calculator, CLI."""

import json
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from ase.build import molecule

from ase_gearsh import GearsHCalculator
from ase_gearsh.cli import main as gearsh_main
from ase_gearsh.core.errors import GearsHError
from ase_gearsh.model.checkpoint import load_checkpoint, save_checkpoint
from ase_gearsh.model.coverage import ExtrapolationWarning
from ase_gearsh.model.engine import load_model
from ase_gearsh.model.inference import predictor_for
from ase_gearsh.model.reliability import (
    RELIABILITY_THRESHOLD,
    ReliabilityError,
    UnreliableWarning,
    atom_invariants,
    fit_reliability,
    missing_species,
    reference_of,
    reliability_scores,
)
from ase_gearsh.predict import predict_structure
from ase_gearsh.testing import random_rotation, wigner_d
from ase_gearsh.training.attach import attach_reliability

TRAIN_SEEDS = range(10, 40)  # geometry only: the reference needs no DFT


def squeezed(atoms, factor=0.6):
    """``atoms`` with every distance to the centre scaled by ``factor``."""
    a = atoms.copy()
    c = a.positions.mean(axis=0)
    a.positions = c + factor * (a.positions - c)
    return a


def scores(model, ref, atoms):
    x = predictor_for(model).atom_invariants(atoms)
    return reliability_scores(ref, atoms.get_chemical_symbols(), x)


@pytest.fixture(scope="module")
def waters(make_atoms):
    return [make_atoms.rattled_water(s) for s in TRAIN_SEEDS]


@pytest.fixture(scope="module")
def ref(small_model, waters):
    """A reference of the small model fitted on 30 rattled water molecules."""
    return fit_reliability(small_model, [small_model.graph(a) for a in waters])


@pytest.fixture(scope="module")
def old_ckpt(small_model, tmp_path_factory):
    """The small model as a checkpoint without a reliability reference (an older
    checkpoint), with basis functions for the exact S."""
    from gpaw_tools.overlap import basis_for_registry

    m = small_model
    basis = {k: v.to_dict() for k, v in basis_for_registry(m.registry, "PBE", "paw").items()}
    path = tmp_path_factory.mktemp("reliability") / "old.ckpt"
    save_checkpoint(
        path,
        config=m.config,
        settings=m.settings,
        registry=m.registry.to_dict(),
        stats={k: np.asarray(v) for k, v in m.stats.items()},
        params=jax.device_get(m.params),
        extra={"note": "kept"},
        basis=basis,
    )
    return path


@pytest.fixture(scope="module")
def ckpt(old_ckpt, waters):
    """The same checkpoint with a reference attached (attach_reliability)."""
    path = old_ckpt.with_name("model.ckpt")
    attach_reliability(old_ckpt, waters, output=path)
    return path


def test_invariants_are_exactly_rotation_invariant():
    rng = np.random.default_rng(0)
    L, F = 3, 5
    d = rng.normal(size=(7, 2, (L + 1) ** 2, F))
    for seed in range(3):
        D = wigner_d(random_rotation(seed), L, inversion=bool(seed % 2))
        turned = np.einsum("mn,apnf->apmf", D, d)
        assert np.abs(atom_invariants(turned) - atom_invariants(d)).max() < 1e-12
    assert atom_invariants(d).shape == (7, 2 * (L + 1) * F)
    with pytest.raises(ValueError, match="shape"):
        atom_invariants(d[:, :1])


def test_scores_invariant_under_rotation_and_permutation(small_model, ref, make_atoms):
    a = make_atoms.rattled_water(100)
    p = predictor_for(small_model)
    x = p.atom_invariants(a)
    b = a.copy()
    b.positions = b.positions @ random_rotation(5).T + [0.3, -1.0, 2.0]
    assert np.allclose(p.atom_invariants(b), x, rtol=1e-4, atol=1e-5)
    perm = [2, 0, 1]
    assert np.allclose(p.atom_invariants(a[perm]), x[perm], rtol=1e-4, atol=1e-5)
    s = scores(small_model, ref, a)
    assert np.allclose(scores(small_model, ref, b), s, rtol=1e-3)
    assert np.allclose(scores(small_model, ref, a[perm]), s[perm], rtol=1e-3)


def test_training_like_low_distorted_and_unseen_high(small_model, ref, make_atoms):
    assert ref["version"] == 1 and set(ref["species"]) == {"H", "C", "O"}
    assert ref["species"]["O"]["atoms"] == 30 and ref["species"]["H"]["atoms"] == 60
    held = [scores(small_model, ref, make_atoms.rattled_water(s)).max() for s in range(100, 110)]
    assert np.median(held) < 1.0 and max(held) < 1.5, held
    worst = max(held)
    for seed in (100, 101, 102):
        s = scores(small_model, ref, squeezed(make_atoms.rattled_water(seed), 0.6))
        assert s.max() > 3 * worst and s.max() > RELIABILITY_THRESHOLD, (s, worst)
    # carbon never occurred in the reference: inf, with a reason
    m = molecule("CH3OH")
    s = scores(small_model, ref, m)
    carbon = np.array(m.get_chemical_symbols()) == "C"
    assert np.isinf(s[carbon]).all() and np.isfinite(s[~carbon]).all()
    assert "no training atoms" in missing_species(ref, m.get_chemical_symbols())["C"]
    # hydrogen bonded to carbon is an environment water never had
    h = ~carbon & (np.array(m.get_chemical_symbols()) == "H")
    assert s[h].max() > RELIABILITY_THRESHOLD


def test_reference_is_small_json_and_checked(ref):
    text = json.dumps(ref)
    assert json.loads(text) == ref
    assert len(text) < 60_000  # tens of KB
    with pytest.raises(ReliabilityError, match="version"):
        reliability_scores(dict(ref, version=99), ["O"], np.zeros((1, ref["n_features"])))
    with pytest.raises(ReliabilityError, match="another model"):
        reliability_scores(ref, ["O"], np.zeros((1, ref["n_features"] + 1)))
    with pytest.raises(GearsHError, match="max_reference"):
        fit_reliability(None, [], max_reference=0)


def test_checkpoint_round_trip(ckpt, ref, small_model, make_atoms):
    ck = load_checkpoint(ckpt)
    stored = ck["extra"]["reliability"]
    assert stored == json.loads(json.dumps(ref))  # same data, same seed
    assert ck["extra"]["note"] == "kept" and ck["basis"]
    model = load_model(ckpt)
    assert reference_of(model) == stored
    a = make_atoms.rattled_water(103)
    assert np.allclose(scores(model, stored, a), scores(small_model, ref, a), rtol=1e-4)


def test_calculator_reports_and_warns(ckpt, make_atoms):
    calc = GearsHCalculator(ckpt)
    a = make_atoms.rattled_water(104)
    a.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreliableWarning)
        a.calc.get_hamiltonian()
    fig = calc.results["reliability"]
    assert 0 < fig < RELIABILITY_THRESHOLD and fig == calc.get_reliability()
    per_atom = calc.results["atom_reliability"]
    assert per_atom.shape == (3,) and per_atom.max() == fig
    assert np.array_equal(calc.get_reliability(per_atom=True), per_atom)
    # the prediction carries the invariants it scored (no second network run)
    x = predictor_for(calc.model).atom_invariants(a)
    assert np.allclose(calc.blocks().atom_invariants, x, rtol=1e-5, atol=1e-6)
    assert calc.get_property("reliability") == fig
    # the figure is kept while only the k-points change
    calc.set(kpts=(1, 1, 1))
    assert calc.results["reliability"] == fig
    b = squeezed(a, 0.6)
    with pytest.warns(UnreliableWarning, match=r"worst atoms: \d \([OH]\)") as rec:
        high = calc.get_property("reliability", b)  # ASE's way, for any atoms
    ours = [w for w in rec if issubclass(w.category, UnreliableWarning)]
    assert len(ours) == 1 and isinstance(ours[0].message, ExtrapolationWarning)
    assert high > RELIABILITY_THRESHOLD and calc.results["reliability"] == high
    # no warning when switched off; the figure is still there
    quiet = GearsHCalculator(ckpt, reliability_threshold=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreliableWarning)
        assert quiet.get_reliability(b) == pytest.approx(high)
    with pytest.raises(GearsHError, match="reliability_threshold"):
        GearsHCalculator(ckpt, reliability_threshold=-1.0)


def test_old_checkpoints_report_none(old_ckpt, make_atoms):
    calc = GearsHCalculator(old_ckpt)
    a = make_atoms.rattled_water(105)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreliableWarning)
        calc.get_hamiltonian(atoms=a)
    assert calc.results["reliability"] is None and calc.results["atom_reliability"] is None
    assert calc.get_reliability() is None and calc.get_reliability(per_atom=True) is None
    # the shipped model was trained with the reference (training.reliability)
    shipped = load_checkpoint("models/molecules.ckpt")
    assert reference_of(SimpleNamespace(extra=shipped["extra"])) is not None


def test_predict_writes_the_figure(ckpt, old_ckpt, make_atoms, tmp_path):
    a = make_atoms.rattled_water(106)
    lines = []
    s = predict_structure(a, ckpt, tmp_path / "new", progress=False, log=lines.append)
    stored = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert stored["reliability"] == pytest.approx(s["reliability"]) and s["reliability"] > 0
    assert stored["reliability_detail"]["worst_atoms"][0]["symbol"] in ("O", "H")
    assert any(line.startswith("reliability figure") for line in lines)
    s = predict_structure(a, old_ckpt, tmp_path / "old", progress=False, log=lines.append)
    assert s["reliability"] is None and any("no reference" in line for line in lines)


def test_cli_attach_reliability(old_ckpt, water_dataset, tmp_path, capsys):
    out = tmp_path / "with.ckpt"
    argv = ["attach-reliability", str(old_ckpt), str(water_dataset), "-o", str(out), "-q"]
    assert gearsh_main(argv) == 0
    assert "every structure" in capsys.readouterr().out
    ref = load_checkpoint(out)["extra"]["reliability"]
    assert ref["structures"] == 4 and ref["species"]["O"]["atoms"] == 4
    assert gearsh_main(["attach-reliability", str(old_ckpt), str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a checkpoint that records its training structures uses only those
    ck = load_checkpoint(out)
    named = tmp_path / "named.ckpt"
    save_checkpoint(
        named,
        config=ck["config"],
        settings=ck["settings"],
        registry=ck["registry"],
        stats=ck["stats"],
        params=ck["params"],
        extra={"train_names": ["elsewhere.gpw"]},
    )
    assert gearsh_main(["attach-reliability", str(named), str(water_dataset)]) == 2
    err = capsys.readouterr().err
    assert "none of the 4 structures" in err and "--all-structures" in err
