"""The held-out eval split: which filtered rows a dataset keeps out of its training shards.

A row is eval when ``splitmix64(row_id ^ EVAL_SALT) / 2**64 < eval_fraction`` (then only the
``eval_max_rows`` smallest such values): the subset rule of filters.py under another salt,
so the split does not follow the subset selection, a larger fraction holds a smaller one, and
a row's side never depends on which other rows downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVAL_SALT = 0x6576616C5F73706C  # b"eval_spl"


@dataclass(frozen=True)
class Holdout:
    """The eval split's size: a fraction of the filtered rows, at most ``max_rows``."""

    fraction: float = 0.001
    max_rows: int | None = 10_000

    def record(self) -> dict[str, object]:
        return {
            "rule": "eval when splitmix64(row_id ^ salt) / 2**64 < fraction; with max_rows, "
            "only the max_rows smallest such values",
            "salt": f"{EVAL_SALT:#018x}",
            "fraction": self.fraction,
            "max_rows": self.max_rows,
        }


def eval_mask(row_ids: np.ndarray, holdout: Holdout) -> np.ndarray:
    """True for the rows of ``row_ids`` that belong to the eval split."""
    # Imported here: finalize's hashing processes import this module and need none of
    # the caption filters' dependencies (pandas, ftfy).
    from dalle_data.pipeline.filters import choose_subset, splitmix64

    row_ids = np.asarray(row_ids, dtype=np.int64)
    if holdout.fraction <= 0 or holdout.max_rows == 0 or not row_ids.size:
        return np.zeros(row_ids.size, dtype=bool)
    salted = row_ids.view(np.uint64) ^ np.uint64(EVAL_SALT)
    subset = choose_subset(salted, holdout.fraction, holdout.max_rows)
    if subset.limit is None or subset.limit >= 1 << 64:
        return np.ones(row_ids.size, dtype=bool)
    return splitmix64(salted) < np.uint64(subset.limit)
