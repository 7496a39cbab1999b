"""Ranking metrics against a set of correct targets."""

from __future__ import annotations

import pytest

from harmonia.metrics import aggregate, aggregate_by, score_row


def test_metrics_on_hand_made_rankings() -> None:
    cases = [  # (ranked top-5, all retrieved, targets)
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [1]),        # rank 1
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [3, 99]),    # rank 3
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [6]),        # retrieved at 6, not ranked
        ([1, 2], [1, 2], [42]),                              # not retrieved
        ([], [], [1]),                                       # nothing
        ([9, 8, 7, 6, 5], list(range(1, 51)), [5, 8]),     # rank 2 (any target)
    ]
    scores = [score_row(r, c, t) for r, c, t in cases]
    assert [s.rank for s in scores] == [1, 3, None, None, None, 2]
    assert [s.hit1 for s in scores] == [True, False, False, False, False, False]
    assert [s.hit5 for s in scores] == [True, True, False, False, False, True]
    assert [s.recall for s in scores] == [True, True, True, False, False, True]
    a = aggregate(scores)
    assert a.n == 6
    assert a.top1 == pytest.approx(1 / 6)
    assert a.top5 == pytest.approx(3 / 6)
    assert a.mrr == pytest.approx((1 + 1 / 3 + 1 / 2) / 6)
    assert a.recall == pytest.approx(4 / 6)
    groups = aggregate_by(list(zip("aabbbc", scores, strict=True)), key=lambda g: g)
    assert groups["a"].top5 == 1.0 and groups["b"].top5 == 0.0 and groups["c"].mrr == 0.5
    assert aggregate([]).n == 0
