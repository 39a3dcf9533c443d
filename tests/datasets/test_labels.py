from __future__ import annotations

import numpy as np
import pytest

from datasets.labels import EDEMA, NORMAL_MYOCARDIUM, SCAR, to_training_labels


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
