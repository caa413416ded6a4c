"""Scoring an estimator: protocols, the runner, metrics, cost measurement, setting facts, benchmarks."""
