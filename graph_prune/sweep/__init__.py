"""Sweeps: a model pruned at many settings, each run verified, benchmarked and evaluated."""
