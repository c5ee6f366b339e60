"""Temporal workflows. Keep these modules thin: they are re-imported in the sandbox per run."""
