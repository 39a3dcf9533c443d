"""Case-level validation split, in-memory validation volumes, scoring and best-model tracking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datasets.labels import MODALITIES, NUM_CLASSES
from datasets.processed import (
    DEFAULT_SPACING,
    ProcessedDataError,
    ProcessedLayout,
    write_test_volume,
    write_training_slice,
)
from training.validation import (
    BestModelTracker,
    ValidationVolume,
    parse_slice_name,
    split_validation_cases,
    validate,
    validation_volumes,
)


def _names(n_cases: int, n_slices: int = 3) -> list[str]:
    return [f"case{c:04d}_slice{s:03d}" for c in range(n_cases) for s in range(n_slices)]


def _case(name: str) -> str:
    return parse_slice_name(name)[0]


# --- split -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_cases", "fraction", "expected"),
                         [(10, 0.2, 2), (10, 0.25, 2), (10, 0.3, 3), (5, 0.1, 1), (2, 0.01, 1),
                          (25, 0.2, 5)])
def test_split_holds_out_about_fraction_of_whole_cases(n_cases, fraction, expected):
    names = _names(n_cases)
    train, validation = split_validation_cases(names, fraction)
    assert len({_case(n) for n in validation}) == expected
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(names)
    # Whole cases: no case id appears on both sides.
    assert not {_case(n) for n in train} & {_case(n) for n in validation}


def test_split_is_deterministic_and_independent_of_list_order():
    names = _names(12)
    shuffled = list(np.random.default_rng(0).permutation(names))
    train, validation = split_validation_cases(names, 0.25)
    assert split_validation_cases(names, 0.25) == (train, validation)
    train_s, validation_s = split_validation_cases(shuffled, 0.25)
    assert sorted(validation_s) == sorted(validation)
    # The input order is kept on both sides.
    assert validation_s == [n for n in shuffled if n in set(validation)]
    assert train_s == [n for n in shuffled if n not in set(validation)]
    assert train == [n for n in names if n not in set(validation)]


def test_split_spreads_cases_over_the_id_range():
    _, validation = split_validation_cases(_names(10), 0.2)
    assert sorted({_case(n) for n in validation}) == ["case0002", "case0007"]


def test_split_case_ids_with_underscores_and_unequal_slice_counts():
    names = ["a_b_slice000", "a_b_slice001", "c_slice007", "d_e_f_slice010"]
    train, validation = split_validation_cases(names, 0.34)
    assert {_case(n) for n in validation} == {"c"}
    assert train == ["a_b_slice000", "a_b_slice001", "d_e_f_slice010"]


def test_fraction_zero_keeps_everything_unparsed():
    names = ["anything", "goes.here"]
    assert split_validation_cases(names, 0.0) == (names, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.2", True])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        split_validation_cases(_names(4), fraction)


@pytest.mark.parametrize(("n_cases", "fraction"), [(1, 0.2), (2, 0.9), (3, 0.95)])
def test_split_refuses_to_hold_out_every_case(n_cases, fraction):
    with pytest.raises(ValueError, match="nothing to train on"):
        split_validation_cases(_names(n_cases), fraction)


def test_split_rejects_unparsable_and_duplicate_names():
    with pytest.raises(ValueError, match="case0001_s003"):
        split_validation_cases([*_names(3), "case0001_s003"], 0.2)
    with pytest.raises(ValueError, match="duplicates"):
        split_validation_cases([*_names(3), "case0000_slice000"], 0.2)
    with pytest.raises(ValueError, match="more than once"):
        split_validation_cases(["x_slice1", "x_slice001", "y_slice000"], 0.5)


# --- validation volumes ------------------------------------------------------------------------

def _write_slices(layout: ProcessedLayout, name: str, image: np.ndarray,
                  label: np.ndarray) -> None:
    for channel, modality in enumerate(MODALITIES):
        write_training_slice(layout.item_path(modality, "train", name), image[channel], label)


@pytest.fixture
def tiny_layout(tmp_path):
    """Two cases of 16 x 16 slices in [0, 255] (seed convention), written in shuffled order."""
    layout = ProcessedLayout(tmp_path)
    rng = np.random.default_rng(1)
    slices = {}
    for case, numbers in (("p01", (2, 0, 10, 1)), ("p02", (5, 3))):
        for number in numbers:
            name = f"{case}_slice{number:03d}"
            image = rng.uniform(0, 255, (3, 16, 16)).astype(np.float32)
            image[:, 0, 0] = 255.0  # every sequence is clearly in [0, 255]
            label = rng.integers(0, NUM_CLASSES, (16, 16)).astype(np.uint8)
            _write_slices(layout, name, image, label)
            slices[name] = (image, label)
    return layout, slices


def test_validation_volumes_stack_slices_in_slice_order(tiny_layout):
    layout, slices = tiny_layout
    volumes = validation_volumes(layout, list(slices))
    assert [v.name for v in volumes] == ["p01", "p02"]
    first = volumes[0]
    assert first.slice_names == ("p01_slice000", "p01_slice001", "p01_slice002", "p01_slice010")
    assert first.image.shape == (4, 3, 16, 16) and first.image.dtype == np.float32
    assert first.label.shape == (4, 16, 16) and first.label.dtype == np.uint8
    assert first.spacing == DEFAULT_SPACING
    for depth, name in enumerate(first.slice_names):
        image, label = layout.read_slice(name)
        np.testing.assert_array_equal(first.image[depth], image)
        np.testing.assert_array_equal(first.label[depth], label)
        np.testing.assert_allclose(first.image[depth], slices[name][0] / 255.0, rtol=1e-6)
    assert first.image.min() >= 0.0 and first.image.max() <= 1.0


def test_validation_volume_matches_the_test_volume_format(tiny_layout):
    """The same slices written as a test volume read back identically (what predict_volume sees)."""
    layout, slices = tiny_layout
    volume = validation_volumes(layout, [n for n in slices if n.startswith("p02")])[0]
    images = np.stack([slices[n][0] for n in volume.slice_names])
    labels = np.stack([slices[n][1] for n in volume.slice_names])
    for channel, modality in enumerate(MODALITIES):
        write_test_volume(layout.item_path(modality, "test_vol", "p02"), images[:, channel],
                          labels, DEFAULT_SPACING)
    image, label, spacing = layout.read_volume("p02")
    assert image.dtype == volume.image.dtype and image.shape == volume.image.shape
    np.testing.assert_allclose(volume.image, image, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(volume.label, label)
    assert spacing == volume.spacing


def test_validation_volumes_errors(tiny_layout):
    layout, _ = tiny_layout
    with pytest.raises(ValueError, match="no validation slices"):
        validation_volumes(layout, [])
    _write_slices(layout, "p01_slice020", np.zeros((3, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(ProcessedDataError, match="p01_slice020"):
        validation_volumes(layout, ["p01_slice000", "p01_slice020"])
    with pytest.raises(ValueError, match="not of the form"):
        validation_volumes(layout, ["p01"])


def test_validation_volume_checks_shapes():
    with pytest.raises(ValueError, match="does not match"):
        ValidationVolume("x", np.zeros((2, 3, 4, 4)), np.zeros((2, 4, 5)), DEFAULT_SPACING,
                         ("a", "b"))
    with pytest.raises(ValueError, match="slice names"):
        ValidationVolume("x", np.zeros((2, 3, 4, 4)), np.zeros((2, 4, 4)), DEFAULT_SPACING,
                         ("a",))


# --- validate ----------------------------------------------------------------------------------

class LabelReader(nn.Module):
    """Predicts the class encoded in the LGE channel as ``label / 3`` (or background only)."""

    def __init__(self, background_only: bool = False) -> None:
        super().__init__()
        self.background_only = background_only
        self.weight = nn.Parameter(torch.zeros(()))  # so .to()/.train() behave like a network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = torch.round(x[:, MODALITIES.index("LGE")] * 3).long()
        if self.background_only:
            classes = torch.zeros_like(classes)
        one_hot = nn.functional.one_hot(classes, NUM_CLASSES).permute(0, 3, 1, 2).float()
        return 10.0 * one_hot + self.weight


def _volume(name: str, label: np.ndarray) -> ValidationVolume:
    image = np.zeros((label.shape[0], 3, *label.shape[1:]), np.float32)
    image[:, MODALITIES.index("LGE")] = label / 3.0
    return ValidationVolume(name, image, label.astype(np.uint8), DEFAULT_SPACING,
                            tuple(f"{name}_slice{i:03d}" for i in range(label.shape[0])))


@pytest.fixture
def label_volumes():
    first = np.zeros((3, 12, 12), np.uint8)
    first[:, 3:9, 3:9] = 1
    first[:, 3:5, 3:9] = 2
    first[1, 7:9, 3:9] = 3
    second = np.zeros((2, 12, 12), np.uint8)
    second[:, 4:8, 4:8] = 1  # no scar, no edema
    return [_volume("a", first), _volume("b", second)]


def test_validate_perfect_prediction(label_volumes):
    model = LabelReader().train()
    metrics = validate(model, label_volumes, 12, torch.device("cpu"), batch_size=2)
    assert model.training  # mode restored
    assert len(metrics) == 2
    for group, scores in metrics.summary().items():
        assert scores["dice"]["mean"] == pytest.approx(1.0), group
        assert scores["hd95"]["mean"] == pytest.approx(0.0), group
    assert metrics.mean_dice() == pytest.approx(1.0)


def test_validate_background_only_prediction(label_volumes):
    model = LabelReader(background_only=True).eval()
    metrics = validate(model, label_volumes, 12, torch.device("cpu"))
    assert not model.training
    rows = {row["case"]: row for row in metrics.per_case()}
    # Case a has every class: all Dice 0. Case b has no scar/edema: empty vs empty -> 1.
    assert rows["a"]["scar_dice"] == 0.0 and rows["a"]["edema alone_dice"] == 0.0
    assert rows["b"]["scar_dice"] == 1.0 and rows["b"]["edema alone_dice"] == 1.0
    assert rows["b"]["myocardium_dice"] == 0.0
    assert metrics.mean_dice() == pytest.approx(0.5)


def test_validate_resizes_to_the_network_size(label_volumes):
    """A network size other than the stored grid still scores on the stored grid."""
    metrics = validate(LabelReader(), label_volumes, 24, torch.device("cpu"))
    assert metrics.mean_dice(("whole myocardium",)) == pytest.approx(1.0)


def test_validate_needs_volumes():
    with pytest.raises(ValueError, match="no validation volumes"):
        validate(LabelReader(), [], 12, torch.device("cpu"))


# --- best-model tracking -----------------------------------------------------------------------

def test_tracker_improve_plateau_and_patience():
    tracker = BestModelTracker(patience=2)
    assert tracker.best_score is None and tracker.best_epoch is None and not tracker.should_stop
    assert tracker.update(0, 0.3)
    assert tracker.update(1, 0.5)
    assert not tracker.update(2, 0.5)  # equal is not better
    assert not tracker.should_stop
    assert tracker.update(3, 0.6)  # improvement resets the count
    assert not tracker.update(4, 0.1)
    assert not tracker.should_stop
    assert not tracker.update(5, 0.59)
    assert tracker.should_stop
    assert (tracker.best_score, tracker.best_epoch) == (0.6, 3)


def test_tracker_min_delta_and_no_patience():
    tracker = BestModelTracker(patience=None, min_delta=0.05)
    assert tracker.update(0, 0.5)
    assert not tracker.update(1, 0.55)  # not more than best + min_delta
    assert tracker.update(2, 0.56)
    for epoch in range(3, 100):
        tracker.update(epoch, 0.0)
    assert not tracker.should_stop
    assert (tracker.best_score, tracker.best_epoch) == (0.56, 2)


def test_tracker_state_round_trip_continues_tracking():
    tracker = BestModelTracker(patience=3)
    for epoch, score in enumerate([0.2, 0.4, 0.3, 0.35]):
        tracker.update(epoch, score)
    resumed = BestModelTracker(patience=3)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.state_dict() == tracker.state_dict()
    assert (resumed.best_score, resumed.best_epoch) == (0.4, 1)
    assert not resumed.update(4, 0.1)
    assert resumed.should_stop  # two rounds before the resume plus this one
    with pytest.raises(ValueError, match="not after"):
        resumed.update(4, 0.9)
    fresh = BestModelTracker(patience=1)
    fresh.load_state_dict(BestModelTracker(patience=1).state_dict())
    assert fresh.update(0, 0.0)


@pytest.mark.parametrize(("patience", "min_delta"),
                         [(0, 0.0), (-1, 0.0), (1.5, 0.0), (True, 0.0), (None, -0.1),
                          (None, float("nan")), (None, float("inf"))])
def test_tracker_rejects_bad_settings(patience, min_delta):
    with pytest.raises(ValueError):
        BestModelTracker(patience, min_delta)


def test_tracker_rejects_bad_updates_and_states():
    tracker = BestModelTracker(patience=None)
    for epoch, score in [(-1, 0.5), (1.0, 0.5), (0, float("nan")), (0, float("inf"))]:
        with pytest.raises(ValueError):
            tracker.update(epoch, score)
    tracker.update(3, 0.5)
    with pytest.raises(ValueError, match="not after"):
        tracker.update(2, 0.9)
    good = tracker.state_dict()
    for bad in [{}, {**good, "extra": 1}, {**good, "best_score": None},
                {**good, "rounds_without_improvement": -1}, {**good, "best_epoch": 4},
                {**good, "best_score": float("nan")}]:
        with pytest.raises(ValueError):
            BestModelTracker(patience=None).load_state_dict(bad)
