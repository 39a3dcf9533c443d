from __future__ import annotations

import pytest
import torch

from networks.configs import ResNetConfig
from networks.resnet_v2 import Bottleneck, ResNetV2, StdConv2d

TINY = ResNetConfig(block_units=(1, 1, 1), width=8, gn_groups=4)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 64), (32, 48), (80, 16)])
def test_feature_sizes_are_exact(height: int, width: int) -> None:
    features = ResNetV2(TINY, in_channels=2)(torch.randn(1, 2, height, width))
    expected = [
        (8, height // 2, width // 2),
        (32, height // 4, width // 4),
        (64, height // 8, width // 8),
        (128, height // 16, width // 16),
    ]
    assert [tuple(f.shape[1:]) for f in features] == expected


def test_feature_channels_property_matches_outputs() -> None:
    model = ResNetV2(TINY)
    features = model(torch.randn(1, 3, 32, 32))
    assert model.feature_channels == tuple(f.shape[1] for f in features)


@pytest.mark.parametrize("shape", [(1, 3, 40, 32), (1, 3, 32, 24), (1, 1, 32, 32), (3, 32, 32)])
def test_bad_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected input|multiples of 16"):
        ResNetV2(TINY)(torch.randn(*shape))


def test_projection_only_where_shape_changes() -> None:
    model = ResNetV2(ResNetConfig(block_units=(2, 1, 2), width=8, gn_groups=4))
    has_proj = [[unit.conv_proj is not None for unit in stage] for stage in model.stages]
    assert has_proj == [[True, False], [True], [True, False]]
    assert model(torch.randn(1, 3, 32, 32))[-1].shape == (1, 128, 2, 2)


def test_stride_sits_on_the_3x3_conv() -> None:
    unit = Bottleneck(8, 8, 32, stride=2, gn_groups=4)
    assert unit.conv1.stride == (1, 1)
    assert unit.conv2.stride == (2, 2)
    assert unit.conv3.stride == (1, 1)
    assert unit.conv_proj is not None and unit.conv_proj.stride == (2, 2)


def test_bottleneck_rejects_groups_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="gn_groups"):
        Bottleneck(8, 6, 32, stride=1, gn_groups=4)


def test_std_conv_standardises_each_filter() -> None:
    torch.manual_seed(0)
    conv = StdConv2d(3, 5, 3, padding=1, bias=False)
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(dim=(1, 2, 3), unbiased=False), torch.ones(5))
    # Standardisation makes the conv blind to a per-filter affine change of its kernel.
    x = torch.randn(2, 3, 8, 8)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([2.0, 0.5, 3.0, 1.0, 7.0]).view(5, 1, 1, 1)).add_(0.3)
    torch.testing.assert_close(conv(x), before, atol=1e-4, rtol=1e-4)
