"""The learning-rate schedule that fits a budget, and the moving average of the weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ase_gearsh.training.config import ConfigError, check_config
from ase_gearsh.training.train import (
    Schedule,
    StepFunctions,
    TrainState,
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


@pytest.mark.slow  # 1-2 min on 2 cores (compiles a training step): `make test-all`
def test_moving_average_follows_its_recursion_and_scale_scales_the_step(
    water_dataset, tmp_path, make_config
):
    cfg = check_config(
        make_config(
            water_dataset,
            tmp_path,
            data={"n_train": 2, "n_valid": 1},
            training={"ema_decay": 0.9, "n_epochs": 1},
        )
    )
    data = prepare_data(cfg, progress=False)
    model, params = build_model(cfg, data)
    steps = StepFunctions(cfg, model, data, log=lambda *a: None)
    state = TrainState(params, steps.tx.init(params))
    state.ema = jax.tree_util.tree_map(jnp.copy, params)
    batch = steps.batch(data.train[:1])
    flat = lambda tree: np.concatenate(  # noqa: E731
        [np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
    )
    seen = [flat(state.params)]
    expected = flat(state.ema)
    for t in range(4):
        state.params, state.opt_state, state.ema, loss = steps._step(
            state.params,
            state.opt_state,
            state.ema,
            steps.stats,
            batch,
            jnp.float32(1.0),
            jnp.int32(t),
        )
        seen.append(flat(state.params))
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * seen[-1]
        assert np.isfinite(float(loss))
    assert np.abs(seen[-1] - seen[0]).max() > 1e-4  # the weights moved
    np.testing.assert_allclose(flat(state.ema), expected, rtol=1e-5, atol=1e-7)
    assert np.abs(flat(state.ema) - seen[-1]).max() > 1e-6  # the average lags behind
    # a zero learning-rate factor leaves the weights where they are
    before = flat(state.params)
    state.params, state.opt_state, state.ema, _ = steps._step(
        state.params,
        state.opt_state,
        state.ema,
        steps.stats,
        batch,
        jnp.float32(0.0),
        jnp.int32(4),
    )
    np.testing.assert_array_equal(flat(state.params), before)
