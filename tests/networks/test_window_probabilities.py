from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from networks.capabilities import Capabilities
from networks.inference import window_probabilities

CPU = torch.device("cpu")


class Recorder(nn.Module):
    """Logits from channel means; records what it was given."""

    def __init__(self, takes_mask: bool) -> None:
        super().__init__()
        self.takes_mask = takes_mask
        self.inputs: list[Tensor] = []
        self.masks: list[Tensor | None] = []

    capabilities = Capabilities(sequence_mask=True)

    def forward(self, x: Tensor, sequence_mask: Tensor | None = None) -> Tensor:
        self.inputs.append(x.clone())
        self.masks.append(sequence_mask)
        return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1) * 4.0


class NoMask(Recorder):
    capabilities = Capabilities()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)


def windows(count=5, size=16):
    return np.random.default_rng(0).uniform(0, 255, (count, 3, size, size)).astype(np.float32)


def test_probabilities_known_values_and_batches():
    model = Recorder(True)
    images = windows()
    probabilities = window_probabilities(model, images, ("bSSFP", "LGE", "T2w"), 16, CPU,
                                         batch_size=2)
    assert probabilities.shape == (5, 4, 16, 16) and probabilities.dtype == np.float32
    x = torch.from_numpy(images) / 255.0
    expected = torch.softmax(torch.cat([x, x.mean(1, keepdim=True)], 1) * 4.0, 1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert [len(batch) for batch in model.inputs] == [2, 2, 1]
    assert model.masks == [None, None, None]  # all present: the plain forward


@pytest.mark.parametrize("model", [Recorder(True), NoMask(False)])
def test_absent_sequences_are_zeroed_and_masked(model):
    window_probabilities(model, windows(3), ("LGE",), 16, CPU)
    given = model.inputs[0]
    assert given[:, 0].abs().max() == 0 and given[:, 2].abs().max() == 0
    assert given[:, 1].abs().max() > 0
    if model.takes_mask:
        assert model.masks[0].tolist() == [[False, True, False]] * 3


def test_windows_are_resized_to_the_input_size_and_back():
    model = Recorder(True)
    probabilities = window_probabilities(model, windows(2, 24), ("LGE", "T2w"), 16, CPU)
    assert model.inputs[0].shape == (2, 3, 16, 16)
    assert probabilities.shape == (2, 4, 24, 24)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_bad_arguments():
    model = Recorder(True)
    with pytest.raises(ValueError, match="windows"):
        window_probabilities(model, np.zeros((2, 2, 8, 8)), ("LGE",), 8, CPU)
    with pytest.raises(ValueError, match="batch_size"):
        window_probabilities(model, windows(), ("LGE",), 16, CPU, batch_size=0)
    with pytest.raises(ValueError, match="unknown sequence"):
        window_probabilities(model, windows(), ("FLAIR",), 16, CPU)
