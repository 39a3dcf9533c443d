"""The fold ensemble: mean of the members' softmax, through every consumer of logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from networks.ensemble import Ensemble
from networks.inference import predict_probabilities
from networks.variants import create_network
from tests.helpers import random_bank

CPU = torch.device("cpu")


def _model(seed: int, variant: str = "transunet", img_size: int = 32):
    torch.manual_seed(seed)
    priors = random_bank() if variant == "immseg" else None
    return create_network(variant, backbone="tiny", img_size=img_size, priors=priors).eval()


def test_an_ensemble_of_identical_models_equals_the_model():
    image = np.random.default_rng(0).random((3, 3, 32, 32)).astype(np.float32)
    model = _model(1)
    alone = predict_probabilities(model, image, 32, CPU, tta=True)
    together = predict_probabilities(Ensemble([model, _model(1), _model(1)]), image, 32, CPU,
                                     tta=True)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_array_equal(together.argmax(axis=1), alone.argmax(axis=1))


def test_the_ensemble_is_the_mean_of_the_members_probabilities():
    image = np.random.default_rng(1).random((2, 3, 32, 32)).astype(np.float32)
    members = [_model(1), _model(2, "immseg")]
    expected = np.mean([predict_probabilities(m, image, 32, CPU, sequences=("LGE", "T2w"))
                        for m in members], axis=0)
    got = predict_probabilities(Ensemble(members), image, 32, CPU, sequences=("LGE", "T2w"))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_members_must_agree_on_input_size():
    with pytest.raises(ValueError, match="input size"):
        Ensemble([_model(1), _model(1, img_size=48)])
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
