"""Which source concepts belong to the development part and which to the test part.

One deterministic rule shared by curation, classifier training and retrieval tuning, so nothing trained or tuned
on the development part can ever see a test source: a source concept is in the test part when a hash of
(seed, source key) falls below `test_share`. The key is the source concept_id for vocabulary ground truth, or
"vocab:code" for external sets.
"""

from __future__ import annotations

import hashlib

DEFAULT_SEED = 13
DEFAULT_TEST_SHARE = 0.5


def part_of(source_key: int | str, seed: int = DEFAULT_SEED, test_share: float = DEFAULT_TEST_SHARE) -> str:
    """'dev' or 'test' for a source concept (stable across runs, machines and Python versions)."""
    h = hashlib.sha256(f"{seed}:{source_key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "test" if u < test_share else "dev"


def is_test(source_key: int | str, seed: int = DEFAULT_SEED, test_share: float = DEFAULT_TEST_SHARE) -> bool:
    return part_of(source_key, seed, test_share) == "test"
