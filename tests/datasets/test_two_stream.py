"""Two-stream batches: a fixed labelled share per batch, fixed steps, the same global batches on
1 or N processes, and repeated slices that get their own augmentation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from datasets.augment import AugmentConfig
from datasets.dataset import SliceDataset
from datasets.processed import ProcessedLayout
from datasets.two_stream import TwoStreamSampler, steps_per_pass
from tests.helpers import write_ring_dataset

LABELLED = [0, 1, 2]
UNLABELLED = list(range(3, 23))


def _sampler(**changes) -> TwoStreamSampler:
    options = {"labelled": LABELLED, "unlabelled": UNLABELLED, "batch_size": 8,
               "labelled_per_batch": 4, "steps": 5, "seed": 7} | changes
    return TwoStreamSampler(**options)


def test_every_batch_holds_the_labelled_share():
    sampler = _sampler()
    batches = sampler.global_batches()
    assert len(batches) == 5 and len(sampler) == 40
    for batch in batches:
        indices = [index for index, _ in batch]
        assert all(i in LABELLED for i in indices[:4]) and all(i in UNLABELLED for i in indices[4:])
    # 20 labelled draws from 3 slices: each pass uses every slice once, so counts differ by <= 1.
    counts = Counter(index for batch in batches for index, _ in batch[:4])
    assert sum(counts.values()) == 20 and max(counts.values()) - min(counts.values()) <= 1
    # Draw numbers count the earlier draws of the same slice in the epoch.
    seen = Counter()
    for batch in batches:
        for index, draw in batch:
            assert draw == seen[index]
            seen[index] += 1
    # 20 unlabelled draws over 20 slices: one pass, each once.
    assert sorted(i for batch in batches for i, _ in batch[4:]) == UNLABELLED


def test_batches_are_a_function_of_seed_and_epoch():
    a, b = _sampler(), _sampler()
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and all(key[0] == 3 for key in a)
    b.set_epoch(4)
    assert [key[1:] for key in a] != [key[1:] for key in b]
    assert _sampler(seed=8).global_batches() != _sampler().global_batches()


def test_ranks_share_each_global_batch_equally():
    one = list(_sampler())
    ranks = [list(_sampler(num_replicas=2, rank=r)) for r in range(2)]
    assert all(len(items) == 20 for items in ranks)
    for step in range(5):
        local = [items[4 * step:4 * step + 4] for items in ranks]
        assert sorted(local[0] + local[1]) == sorted(one[8 * step:8 * step + 8])
        # Two labelled slices each: the labelled items are dealt round-robin.
        assert all(sum(key[1] in LABELLED for key in part) == 2 for part in local)


def test_labelled_cases_alone_fill_whole_batches():
    sampler = _sampler(unlabelled=[], labelled_per_batch=4)
    assert all(index in LABELLED for batch in sampler.global_batches() for index, _ in batch)
    assert len(sampler) == 40
    assert steps_per_pass(23, 8) == 3 and steps_per_pass(24, 8) == 3


@pytest.mark.parametrize("changes", [
    {"labelled": []}, {"unlabelled": [0, 5]}, {"labelled_per_batch": 8},
    {"labelled_per_batch": 0}, {"batch_size": 7, "num_replicas": 2}, {"steps": 0},
    {"num_replicas": 2, "rank": 2}])
def test_bad_arguments_raise(changes):
    with pytest.raises(ValueError):
        _sampler(**changes)


def test_repeated_draws_get_their_own_augmentation(tmp_path):
    root = write_ring_dataset(tmp_path, train_cases=2, slices_per_case=2)
    layout = ProcessedLayout(root)
    dataset = SliceDataset(layout, layout.names("train"), 32, AugmentConfig(), seed=3)
    first = dataset[(2, 1)]["image"]
    assert torch.equal(dataset[(2, 1, 0)]["image"], first)  # draw 0: the usual stream
    assert not torch.equal(dataset[(2, 1, 1)]["image"], first)
    assert torch.equal(dataset[(2, 1, 1)]["image"], dataset[(2, 1, 1)]["image"])
