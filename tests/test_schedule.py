"""The learning-rate schedule that fits a budget, and the moving average of the weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ase_gearsh.training.config import ConfigError, check_config
from ase_gearsh.training.train import (
    ELEMENTWISE_OPTIMIZERS,
    FlatParameters,
    Schedule,
    StepFunctions,
    build_model,
    prepare_data,
)


def _cfg(**training):
    return check_config(
        {
            "data": {"train_data_path": "x"},
            "optimizer": {
                "schedule": {"name": "warmup_cosine", "warmup_fraction": 0.1, "final_scale": 0.02}
            },
            "training": dict({"n_epochs": 10}, **training),
        }
    )


def test_warmup_then_cosine_ends_with_the_epochs():
    sch = Schedule(_cfg(), steps_per_epoch=10)  # 100 steps in all
    assert sch(0, 0.0) == pytest.approx(1e-3)  # warm-up starts near zero
    assert sch(5, 0.0) == pytest.approx(0.5)  # linear over the first 10 % of the budget
    assert sch(10, 0.0) == pytest.approx(1.0)
    mid = 10 + 45  # half-way through the cosine
    assert sch(mid, 0.0) == pytest.approx(0.02 + 0.98 * 0.5)
    assert sch(100, 0.0) == pytest.approx(0.02)  # ends at final_scale with the budget
    values = [sch(k, 0.0) for k in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically


def test_time_budget_ends_the_decay_when_it_ends_first():
    sch = Schedule(_cfg(n_epochs=10_000, max_minutes=2), steps_per_epoch=10)
    assert sch.progress(50, 60.0) == pytest.approx(0.5)  # time, not steps, decides
    assert sch(50, 120.0) == pytest.approx(0.02)
    assert sch(50, 1e6) == pytest.approx(0.02)  # past the budget: stays at the end
    # a few steps into a long n_epochs run with an ample budget: still warming up
    assert sch(5, 1.0) < 0.1


def test_other_schedules_leave_the_rate_alone():
    cfg = _cfg()
    cfg["optimizer"]["schedule"]["name"] = "reduce_on_plateau"
    assert Schedule(cfg, 10)(3, 1.0) == 1.0


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"optimizer": {"lr": -0.01}}, "optimizer.lr"),
        ({"optimizer": {"lr": math.nan}}, "optimizer.lr"),
        ({"optimizer": {"schedule": {"warmup_fraction": 1.0}}}, "warmup_fraction"),
        ({"optimizer": {"schedule": {"final_scale": 2.0}}}, "final_scale"),
        ({"training": {"ema_decay": 1.0}}, "ema_decay"),
        ({"training": {"n_epochs": 0}}, "n_epochs"),
        ({"training": {"max_minutes": -5}}, "max_minutes"),
        ({"optimizer": {"schedule": {"name": "cosine"}}}, "schedule.name"),
    ],
)
def test_out_of_range_values_are_refused_before_work(patch, message):
    with pytest.raises(ConfigError, match=message):
        check_config(dict(patch, data={"train_data_path": "x"}))


def _water_model(water_dataset, tmp_path, make_config):
    """(config, data, model, initial parameters) of the small test model on two water
    molecules, moving average 0.9."""
    cfg = check_config(
        make_config(
            water_dataset,
            tmp_path,
            data={"n_train": 2, "n_valid": 1},
            training={"ema_decay": 0.9, "n_epochs": 1},
        )
    )
    data = prepare_data(cfg, progress=False)
    return (cfg, data, *build_model(cfg, data))


def _advance(steps, state, batch, t: int, scale: float = 1.0):
    """One training step ``t`` of ``state`` in place; returns the loss."""
    state.params, state.opt_state, state.ema, loss = steps._step(
        state.params,
        state.opt_state,
        state.ema,
        steps.stats,
        batch,
        jnp.float32(scale),
        jnp.int32(t),
    )
    return loss


@pytest.mark.slow  # 1-2 min on 2 cores (compiles a training step): `make test-all`
def test_moving_average_follows_its_recursion_and_scale_scales_the_step(
    water_dataset, tmp_path, make_config
):
    cfg, data, model, params = _water_model(water_dataset, tmp_path, make_config)
    steps = StepFunctions(cfg, model, data, log=lambda *a: None)
    state = steps.init_state(params)
    batch = steps.batch(data.train[:1])
    flat = lambda tree: np.concatenate(  # noqa: E731
        [np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
    )
    seen = [flat(state.params)]
    expected = flat(state.ema)
    for t in range(4):
        loss = _advance(steps, state, batch, t)
        seen.append(flat(state.params))
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * seen[-1]
        assert np.isfinite(float(loss))
    assert np.abs(seen[-1] - seen[0]).max() > 1e-4  # the weights moved
    np.testing.assert_allclose(flat(state.ema), expected, rtol=1e-5, atol=1e-7)
    assert np.abs(flat(state.ema) - seen[-1]).max() > 1e-6  # the average lags behind
    # a zero learning-rate factor leaves the weights where they are
    before = flat(state.params)
    _advance(steps, state, batch, 4, scale=0.0)
    np.testing.assert_array_equal(flat(state.params), before)


def test_flat_parameters_give_the_tree_optimiser_s_updates_and_checkpoint_form():
    """One flat vector through an element-wise optimiser (clipping, Adan with weight
    decay) takes the same steps as the parameter tree, and its state converts to the
    tree state's form (what checkpoints store) and back exactly."""
    import optax

    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
        "scale": rng.normal(size=(2, 1, 3)),
    }
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    fp = FlatParameters.of(params)
    assert fp.size == 12 + 4 + 6
    flat = fp.ravel(params)
    assert flat.shape == (22,)
    for a, b in zip(jax.tree_util.tree_leaves(fp.unravel(flat)), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adan(0.01, weight_decay=0.001))
    tree_state, flat_state = tx.init(params), tx.init(flat)
    p_tree, p_flat = params, flat
    for _ in range(5):
        g = jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
        )
        u, tree_state = tx.update(g, tree_state, p_tree)
        p_tree = optax.apply_updates(p_tree, u)
        u, flat_state = tx.update(fp.ravel(g), flat_state, p_flat)
        p_flat = optax.apply_updates(p_flat, u)
    moved = np.abs(np.asarray(p_flat) - np.asarray(flat)).max()
    assert moved > 1e-3
    np.testing.assert_allclose(p_flat, fp.ravel(p_tree), rtol=1e-5, atol=1e-6)
    # the checkpoint form: the tree optimiser's state, structure and values
    as_tree = fp.trees(jax.device_get(flat_state))
    assert jax.tree_util.tree_structure(as_tree) == jax.tree_util.tree_structure(tree_state)
    for a, b in zip(jax.tree_util.tree_leaves(as_tree), jax.tree_util.tree_leaves(tree_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    back = fp.flats(as_tree)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(flat_state)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(flat_state)):
        np.testing.assert_array_equal(a, b)
    # arrays of two dtypes keep the tree
    assert FlatParameters.of({"a": np.zeros(2, np.float32), "b": np.zeros(2)}) is None


def test_only_element_wise_optimisers_are_flattened():
    import optax

    for name in ELEMENTWISE_OPTIMIZERS:
        assert callable(getattr(optax, name)), name
    # per-array norms (trust ratios) or factored moments: the tree stays
    for name in ("lamb", "lars", "adafactor", "novograd"):
        assert name not in ELEMENTWISE_OPTIMIZERS


@pytest.mark.slow  # 1-2 min on 2 cores (compiles two training steps): `make test-all`
def test_flat_training_step_follows_the_tree_step(water_dataset, tmp_path, make_config):
    cfg, data, model, params = _water_model(water_dataset, tmp_path, make_config)
    runs = []
    for flat in (True, False):
        steps = StepFunctions(cfg, model, data, log=lambda *a: None)
        steps.elementwise = flat
        state = steps.init_state(params)
        assert (steps.flat is not None) == flat
        batch = steps.batch(data.train[:1])
        for t in range(3):
            loss = _advance(steps, state, batch, t)
        runs.append((steps.trees(state.params), steps.trees(state.ema), float(loss)))
        assert steps.validate(state.weights, data.valid)[3] > 0
    (p1, e1, l1), (p0, e0, l0) = runs
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((p1, e1)), jax.tree_util.tree_leaves((p0, e0))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
