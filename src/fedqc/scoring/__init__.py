"""Scoring functions: one registry, each scorer declares its direction in one place."""
