"""Ranking metrics against a set of correct targets (any target counts), and their aggregation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RowScore:
    hit1: bool
    hit5: bool
    rr: float      # reciprocal rank of the first correct one in the reranked top-N; 0 if absent
    recall: bool   # any target among all retrieved candidates (recall@K, K = retrieval_top_k)
    rank: int | None


def score_row(ranked: Sequence[int], retrieved: Iterable[int], targets: Iterable[int]) -> RowScore:
    t = set(targets)
    rank = next((i for i, c in enumerate(ranked, 1) if c in t), None)
    return RowScore(hit1=rank == 1, hit5=rank is not None and rank <= 5, rr=1.0 / rank if rank else 0.0,
                    recall=any(c in t for c in retrieved), rank=rank)


@dataclass
class Aggregate:
    n: int = 0
    top1: float = 0.0
    top5: float = 0.0
    mrr: float = 0.0
    recall: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate(scores: Sequence[RowScore]) -> Aggregate:
    n = len(scores)
    if not n:
        return Aggregate()
    return Aggregate(n=n, top1=sum(s.hit1 for s in scores) / n, top5=sum(s.hit5 for s in scores) / n,
                     mrr=sum(s.rr for s in scores) / n, recall=sum(s.recall for s in scores) / n)


def aggregate_by(items: Sequence[tuple[Any, RowScore]], key: Callable[[Any], str]) -> dict[str, Aggregate]:
    groups: dict[str, list[RowScore]] = defaultdict(list)
    for item, score in items:
        groups[key(item)].append(score)
    return {k: aggregate(v) for k, v in sorted(groups.items())}
