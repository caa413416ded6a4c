"""Ground truth by real retraining: ``ground_truth(ctx, removed)`` returns the test-loss changes,
computing (and storing, chunk by chunk) only what the store does not hold yet."""

from __future__ import annotations

from influence_bench.groundtruth import engine, lds, shipped
from influence_bench.groundtruth.builder import build, data_fingerprint, ground_truth, lds_ground_truth, store_key
from influence_bench.groundtruth.store import (
           CorruptGroundTruth,
           CorruptGroundTruthWarning,
           Entries,
           GroundTruthStore,
           MissingColumns,
)

__all__ = ["ground_truth", "lds_ground_truth", "build", "store_key", "data_fingerprint", "GroundTruthStore",
           "CorruptGroundTruth", "CorruptGroundTruthWarning", "Entries", "MissingColumns", "engine", "lds", "shipped"]
