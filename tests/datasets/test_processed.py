from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from datasets.labels import MODALITIES
from datasets.processed import (
    ProcessedDataError,
    ProcessedLayout,
    write_test_volume,
    write_training_slice,
)
from tests.helpers import write_ring_dataset


def _fill(layout: ProcessedLayout, rng: np.random.Generator) -> dict:
    written = {}
    for channel, modality in enumerate(MODALITIES):
        image = rng.random((8, 8)).astype(np.float32) * 255
        label = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
        write_training_slice(layout.item_path(modality, "train", "case0001_slice000"), image, label)
        volume = rng.random((3, 8, 8)).astype(np.float32) * 255
        write_test_volume(layout.item_path(modality, "test_vol", "case0005"), volume,
                          np.zeros((3, 8, 8), np.uint8) + channel, (12.0, 1.0, 1.0))
        written[modality] = (image, volume)
    return written


def test_round_trip_scales_to_unit_range_and_generates_lists(tmp_path):
    layout = ProcessedLayout(tmp_path)
    written = _fill(layout, np.random.default_rng(0))
    assert layout.names("train") == ["case0001_slice000"]
    assert (tmp_path / "lists" / "train.txt").read_text() == "case0001_slice000\n"
    image, label = layout.read_slice("case0001_slice000")
    assert image.shape == (3, 8, 8)
    for channel, modality in enumerate(MODALITIES):
        np.testing.assert_allclose(image[channel], written[modality][0] / 255, rtol=1e-6)
    assert label[0, :4].tolist() == [0, 1, 2, 3]
    volume, vlabel, spacing = layout.read_volume("case0005")
    assert volume.shape == (3, 3, 8, 8) and spacing == (12.0, 1.0, 1.0)
    np.testing.assert_allclose(volume[:, 1], written["LGE"][1] / 255, rtol=1e-6)
    assert np.all(vlabel == MODALITIES.index("LGE"))  # the LGE label is the one returned


def test_list_naming_absent_file_raises(tmp_path):
    layout = ProcessedLayout(tmp_path)
    _fill(layout, np.random.default_rng(0))
    layout.list_path("train").parent.mkdir()
    layout.list_path("train").write_text("case0001_slice000\ncase0002_slice004\n")
    with pytest.raises(ProcessedDataError, match=r"train.txt: lists 'case0002_slice004'"):
        layout.names("train")


def test_empty_and_unknown_split(tmp_path):
    layout = ProcessedLayout(tmp_path)
    with pytest.raises(ProcessedDataError, match="no 'train' data"):
        layout.names("train")
    with pytest.raises(ValueError, match="unknown split"):
        layout.names("validation")


def test_corrupt_slice_names_file(tmp_path):
    layout = ProcessedLayout(tmp_path)
    _fill(layout, np.random.default_rng(0))
    layout.item_path("T2w", "train", "case0001_slice000").write_bytes(b"junk")
    with pytest.raises(ProcessedDataError, match=r"T2w/train_npz/case0001_slice000.npz"):
        layout.read_slice("case0001_slice000")


def test_recorded_preprocessing_reads_the_first_readable_manifest(tmp_path):
    from datasets.processed import ProcessedLayout

    layout = ProcessedLayout(tmp_path)
    assert layout.recorded_preprocessing() is None
    layout.manifest_dir().mkdir()
    (layout.manifest_dir() / "a.json").write_text("{broken")
    (layout.manifest_dir() / "b.json").write_text('{"config": {"roi_size": 96}}')
    assert layout.recorded_preprocessing() == {"roi_size": 96}


def test_release_layout_volume_loads_along_its_slice_axis(tmp_path):
    """The release writes test volumes as nibabel (X, Y, Z) and reads slice k as image[:, :, k]:
    a 128x128x7 file is 7 slices of 128x128, not 128 slices of 128x7."""
    layout = ProcessedLayout(tmp_path)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (128, 128, 7)).astype(np.float32)
    label = rng.integers(0, 4, (128, 128, 7)).astype(np.uint8)
    for modality in MODALITIES:
        path = layout.item_path(modality, "test_vol", "case0001")
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as handle:  # no attributes, as the release writes them
            handle["image"], handle["label"] = image, label
    volume, read_label, spacing = layout.read_volume("case0001")
    assert volume.shape == (7, 3, 128, 128) and spacing == (10.0, 1.0, 1.0)
    for k in range(7):
        np.testing.assert_allclose(volume[k, 1], image[:, :, k] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(read_label[k], label[:, :, k])
    # Ours say their axes; a file that is neither is refused rather than misread.
    ours = layout.item_path("LGE", "test_vol", "case0002")
    write_test_volume(ours, image.transpose(2, 0, 1), label.transpose(2, 0, 1), (8, 1, 1))
    with h5py.File(ours, "r") as handle:
        assert handle.attrs["axes"] == "DHW"
    odd = layout.item_path("LGE", "test_vol", "case0003")
    with h5py.File(odd, "w") as handle:
        handle["image"], handle["label"] = image[:, :64], label[:, :64]
    for modality in ("bSSFP", "T2w"):
        shutil.copy(odd, layout.item_path(modality, "test_vol", "case0003"))
    with pytest.raises(ProcessedDataError, match="slice axis"):
        layout.read_volume("case0003")


def test_a_case_in_both_lists_is_refused(tmp_path):
    write_ring_dataset(tmp_path, train_cases=2, slices_per_case=2,
                       test_cases=("case0001",))
    layout = ProcessedLayout(tmp_path)
    layout.names("train")
    layout.names("test_vol")
    with pytest.raises(ProcessedDataError, match="case0001"):
        layout.check_disjoint()
    layout.list_path("test_vol").write_text("case0003\n")
    write_ring_dataset(tmp_path, train_cases=0, slices_per_case=2, test_cases=("case0003",))
    layout.check_disjoint()


def test_broken_training_slices_are_named_before_training(tmp_path):
    """A 0-byte or truncated .npz raised BadZipFile/EOFError mid-epoch without its path."""
    write_ring_dataset(tmp_path, train_cases=2, slices_per_case=2)
    layout = ProcessedLayout(tmp_path)
    names = layout.names("train")
    layout.check_slices(names)
    empty = layout.item_path("T2w", "train", names[1])
    empty.write_bytes(b"")
    with pytest.raises(ProcessedDataError, match=str(empty)):
        layout.check_slices(names)
    truncated = layout.item_path("LGE", "train", names[2])
    write_training_slice(empty, np.zeros((32, 32)), np.zeros((32, 32)))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ProcessedDataError, match=str(truncated)):
        layout.check_slices(names)
    # Sequences of one slice that differ in size: named, not a numpy error.
    write_training_slice(truncated, np.zeros((24, 24)), np.zeros((24, 24)))
    with pytest.raises(ProcessedDataError, match=rf"{truncated}: slice of size \(24, 24\)"):
        layout.read_slice(names[2])
