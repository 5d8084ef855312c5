"""Evaluating a rewritten model: metrics (perplexity, latency, lm-eval), the evaluate driver and the report."""
