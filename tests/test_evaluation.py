"""Perplexity against the loss transformers computes itself."""

from __future__ import annotations

import math

import pytest
import torch

from cqil.evaluation.metrics import perplexity
from cqil.testing import VOCAB, make_model


def test_perplexity_matches_transformers_loss():
    model = make_model("llama")
    tokens = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, batch_size=2, progress=False)
    with torch.no_grad():
        # With equal-length rows the mean of the per-row losses is the mean over all tokens.
        reference = model(input_ids=tokens, labels=tokens).loss.item()
    assert result["tokens"] == 5 * 8
    assert result["nll"] == pytest.approx(reference, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_perplexity_restores_training_mode():
    model = make_model("llama").train()
    perplexity(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert model.training


def test_perplexity_rejects_single_token_rows():
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(make_model("llama"), torch.zeros(3, 1, dtype=torch.long), progress=False)
