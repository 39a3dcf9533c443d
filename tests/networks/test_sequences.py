from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.capabilities import Capabilities
from networks.sequences import (
    accepts_sequence_mask,
    forward_with_sequences,
    parse_sequences,
    presence_vector,
    zero_absent,
)


def test_parse_orders_by_channel_and_ignores_case():
    assert parse_sequences("t2w, lge") == ("LGE", "T2w")
    assert parse_sequences(["bSSFP"]) == ("bSSFP",)


@pytest.mark.parametrize("bad", ["", "LGE,LGE", "FLAIR", ","])
def test_parse_rejects_bad_subsets(bad):
    with pytest.raises(ValueError):
        parse_sequences(bad)


def test_presence_vector_and_zeroing():
    present = presence_vector("LGE")
    assert present.tolist() == [False, True, False]
    images = torch.ones(2, 3, 4, 4)
    out = zero_absent(images, present.expand(2, 3))
    assert out[:, 1].eq(1).all() and out[:, [0, 2]].eq(0).all()
    with pytest.raises(ValueError):
        zero_absent(images, present.float().expand(2, 3))


class _Plain(nn.Module):
    def forward(self, x):
        return x.sum(dim=1, keepdim=True)


class _Masked(nn.Module):
    capabilities = Capabilities(sequence_mask=True)

    def forward(self, x, sequence_mask=None):
        return x.sum(dim=1, keepdim=True) + (0 if sequence_mask is None else 100)


def test_forward_with_sequences_routes_the_mask():
    images = torch.ones(1, 3, 2, 2)
    mask = torch.tensor([[True, False, True]])
    assert not accepts_sequence_mask(_Plain()) and accepts_sequence_mask(_Masked())
    assert forward_with_sequences(_Plain(), images, mask).eq(2).all()
    assert forward_with_sequences(_Masked(), images, mask).eq(102).all()
    assert forward_with_sequences(_Plain(), images, None).eq(3).all()


def test_single_sequence_model_needs_its_sequence():
    from networks.sequences import check_model_inputs
    from networks.variants import create_network

    model = create_network("transunet_single", backbone="tiny", img_size=32, sequence="LGE")
    check_model_inputs(model, ("LGE", "T2w"))
    with pytest.raises(ValueError, match="reads only LGE"):
        check_model_inputs(model, ("bSSFP", "T2w"))
    check_model_inputs(create_network("transunet", backbone="tiny", img_size=32), ("T2w",))
