"""Fixtures over the tiny models of :mod:`cqil.testing` (every supported architecture, built locally)."""

from __future__ import annotations

import pytest
import torch

from cqil.testing import ARCHS, VOCAB


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12))
