"""Metrics against hand-computed values and against Avalanche's own metric classes."""

from __future__ import annotations

import numpy as np
import pytest
from avalanche.evaluation.metrics.forgetting_bwt import BWT, Forgetting

from cl_ema.metrics import final_metrics, metrics_after, task_forgetting

# R[i, j]: accuracy on task j after training task i
R = np.array(
    [
        [0.90, 0.10, 0.00],
        [0.60, 0.80, 0.05],
        [0.30, 0.70, 0.95],
    ]
)


def test_final_metrics_by_hand():
    m = final_metrics(R, baseline=[0.1, 0.2, 0.0])
    assert m["avg_acc"] == pytest.approx((0.30 + 0.70 + 0.95) / 3)
    # forgetting of task 0: 0.90 − 0.30 = 0.60; task 1: 0.80 − 0.70 = 0.10
    assert m["avg_forgetting"] == pytest.approx((0.60 + 0.10) / 2)
    # max over earlier rows: task 0 max(0.90, 0.60) − 0.30 = 0.60; task 1: 0.80 − 0.70 = 0.10
    assert m["max_forgetting"] == pytest.approx(0.35)
    assert m["bwt"] == pytest.approx(-0.35)
    assert m["learning_acc"] == pytest.approx((0.90 + 0.80 + 0.95) / 3)
    # FWT: (R[0,1] − b1 + R[1,2] − b2) / 2 = (0.10 − 0.2 + 0.05 − 0.0) / 2
    assert m["fwt"] == pytest.approx(-0.025)


def test_max_forgetting_differs_from_forgetting_when_accuracy_peaks_later():
    r = np.array([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.4, 0.8, 0.9]])
    m = final_metrics(r)
    assert m["avg_forgetting"] == pytest.approx(((0.5 - 0.4) + 0.0) / 2)
    assert m["max_forgetting"] == pytest.approx(((0.9 - 0.4) + 0.0) / 2)


def test_metrics_after_an_intermediate_task_use_the_leading_block():
    m = metrics_after(R, 1)
    assert m["avg_acc"] == pytest.approx((0.60 + 0.80) / 2)
    assert m["avg_forgetting"] == pytest.approx(0.30)
    assert task_forgetting(R, 1) == [pytest.approx(0.30)]


def test_first_task_has_nothing_to_forget():
    m = metrics_after(R, 0)
    assert m["avg_acc"] == pytest.approx(0.90)
    assert m["avg_forgetting"] is None and m["bwt"] is None and m["max_forgetting"] is None


def test_bad_matrix_is_rejected():
    with pytest.raises(ValueError):
        metrics_after(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError):
        metrics_after(R, 3)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_avalanche_forgetting_and_bwt(seed):
    rng = np.random.default_rng(seed)
    r = rng.uniform(size=(6, 6))
    last = len(r) - 1
    forgetting, bwt = Forgetting(), BWT()
    for j in range(len(r)):
        # Avalanche: the first value recorded for a task is its accuracy right after training it
        forgetting.update(j, r[j, j], initial=True)
        bwt.update(j, r[j, j], initial=True)
        forgetting.update(j, r[last, j])
        bwt.update(j, r[last, j])
    ours = final_metrics(r)
    theirs_f = [v for k, v in forgetting.result().items() if k < last]
    theirs_b = [v for k, v in bwt.result().items() if k < last]
    assert ours["avg_forgetting"] == pytest.approx(np.mean(theirs_f))
    assert ours["bwt"] == pytest.approx(np.mean(theirs_b))
