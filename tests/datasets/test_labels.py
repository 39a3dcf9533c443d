from __future__ import annotations

import numpy as np
import pytest

from datasets.labels import (
    EDEMA,
    EVAL_GROUPS,
    NORMAL_MYOCARDIUM,
    SCAR,
    burdens,
    group_volumes,
    to_training_labels,
    voxel_ml,
)


def test_myops2020_codes_map_to_training_labels():
    raw = np.array([[0, 200, 500], [600, 1220, 2221]], dtype=np.int16)
    expected = np.array([[0, NORMAL_MYOCARDIUM, 0], [0, EDEMA, SCAR]], dtype=np.uint8)
    np.testing.assert_array_equal(to_training_labels(raw), expected)


def test_training_labels_pass_through():
    raw = np.array([0, 1, 2, 3], dtype=np.float32)
    out = to_training_labels(raw)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 1, 2, 3])


@pytest.mark.parametrize("values", [[0, 200, 7], [0, 4], [0.5, 1]])
def test_unknown_values_raise_naming_source(values):
    with pytest.raises(ValueError, match="case9_gt"):
        to_training_labels(np.array(values), source="case9_gt")


def test_group_volumes_count_voxels_times_their_volume():
    labels = np.zeros((2, 10, 10), np.uint8)  # 5 x 2 x 1 mm voxels: 0.01 mL each
    labels[0, :3] = NORMAL_MYOCARDIUM  # 30 voxels
    labels[1, :1] = SCAR  # 10
    labels[1, 5:7] = EDEMA  # 20
    volumes = group_volumes(labels, (5.0, 2.0, 1.0), EVAL_GROUPS)
    assert volumes == pytest.approx({"myocardium": 0.3, "scar": 0.1, "edema alone": 0.2,
                                     "scar+edema": 0.3, "whole myocardium": 0.6})
    assert burdens(volumes) == pytest.approx({"scar burden": 100 * 10 / 60,
                                              "scar+edema burden": 100 * 30 / 60})
    assert voxel_ml((8.0, 1.25, 1.25)) == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="spacing"):
        group_volumes(labels, (1.0, 1.0), EVAL_GROUPS)
    with pytest.raises(ValueError, match="positive"):
        voxel_ml((1.0, 0.0, 1.0))


def test_burdens_need_a_myocardium():
    empty = group_volumes(np.zeros((1, 4, 4), np.uint8), (1.0, 1.0, 1.0), EVAL_GROUPS)
    assert burdens(empty) == {"scar burden": None, "scar+edema burden": None}
    assert burdens({"scar": 1.0}) == {}  # no whole-myocardium group: no burden
