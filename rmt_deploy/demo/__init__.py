"""Synthetic long-context demo tasks (the RMT paper's fact-memorization benchmark)."""
