"""Shared fixtures: the tiny variant keeps every network test fast on CPU."""

from __future__ import annotations

import pytest
import torch

from networks import TransUNet, create_transunet


@pytest.fixture
def tiny_model() -> TransUNet:
    torch.manual_seed(0)
    return create_transunet("tiny", img_size=64, in_channels=3, num_classes=4)
