"""Evaluation: perplexity, KL, top-1 agreement and drift over position; reports (markdown, PNG, JSON)."""
