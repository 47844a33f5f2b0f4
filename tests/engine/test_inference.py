"""predict_everywhere: what every rank gathers, the coverage check and the error policy, in one
process (with another rank's answer faked where it matters) and in two real gloo processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapdet import comm
from mapdet.engine.inference import CoverageError, predict_everywhere
from mapdet.shards.reader import CorruptSample
from mapdet.structures import Batch
from tests.helpers import run_in_ranks


class _OneBox(torch.nn.Module):
    """One box per image scored by the image's mean; in training mode a loss that is that mean."""

    def forward(self, images, targets=None):
        if self.training:
            return {"loss_a": torch.stack([im.mean() for im in images]).mean()}
        return [
            {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "scores": im.mean().reshape(1), "labels": torch.tensor([1])}
            for im in images
        ]


def _batch(items: dict[str, int], bad: tuple[str, ...] = ()) -> Batch:
    """Images named key -> pixel value (their image id is the value), and unreadable ``bad`` keys."""
    images = [torch.full((3, 4, 4), v, dtype=torch.uint8) for v in items.values()]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    targets = [
        {"key": k, "image_id": v, "iscrowd": torch.zeros(0, dtype=torch.int64), **empty} for k, v in items.items()
    ]
    return Batch(images, targets, [{"shard": "s.tar", "key": k, "reason": "broken", "samples": 1} for k in bad])


def _failing(error: BaseException, first: Batch):
    yield first
    raise error


def _everywhere(loader, expected, **kw):
    return predict_everywhere(_OneBox(), loader, "cpu", expected, "prediction", **kw)


def test_one_process_gets_its_detections_keys_unreadable_images_and_loss_sums():
    loader = [_batch({"a": 51, "b": 102}), _batch({}, bad=("d",)), _batch({"c": 255})]
    seen = _everywhere(loader, ["a", "b", "c", "d"], with_loss=True)
    assert seen.keys == ["a", "b", "c"] and [b["key"] for b in seen.skipped] == ["d"]
    assert seen.detections.image_id.tolist() == [51, 102, 255]
    assert np.allclose(seen.detections.scores, [0.2, 0.4, 1.0])
    # Per batch: the mean loss times the batch's images, summed: (0.2 + 0.4) / 2 * 2 + 1.0.
    assert seen.loss_sum == pytest.approx({"loss_a": 1.6, "loss": 1.6})
    assert _everywhere(loader, ["a", "b", "c", "d"]).loss_sum == {}


@pytest.mark.parametrize(
    "loader, problem",
    [
        ([_batch({"a": 1, "b": 2})], "missing 1: c"),
        ([_batch({"a": 1, "b": 2}), _batch({"a": 1}, bad=("c",))], "duplicated 1: a"),
        ([_batch({"a": 1, "b": 2, "c": 3, "x": 4})], "unexpected 1: x"),
    ],
)
def test_each_expected_image_must_be_seen_or_unreadable_exactly_once(loader, problem):
    with pytest.raises(CoverageError, match=f"^prediction did not see each image exactly once: {problem}$"):
        _everywhere(loader, ["a", "b", "c"])


def test_default_policy_raises_any_error_as_runtime_error_naming_rank_and_type():
    with pytest.raises(RuntimeError, match=r"^rank 0: ValueError: boom$") as e:
        _everywhere(_failing(ValueError("boom"), _batch({"a": 1})), ["a"])
    assert type(e.value) is RuntimeError


def test_a_caught_type_can_be_raised_as_itself_with_its_own_message():
    message = "v-000001.tar: sample 'k' does not decode"
    with pytest.raises(CorruptSample, match=f"^{message}$"):
        _everywhere(
            _failing(CorruptSample(message), _batch({"a": 1})),
            ["a"],
            catch=CorruptSample,
            describe=str,
            raise_as=CorruptSample,
        )


def test_an_uncaught_type_propagates_on_its_rank_without_gathering(monkeypatch):
    gathered = []
    monkeypatch.setattr(comm, "all_gather_object", lambda own: gathered.append(own) or [own])
    with pytest.raises(KeyError):
        _everywhere(_failing(KeyError("x"), _batch({"a": 1})), ["a"], catch=CorruptSample)
    assert gathered == []


def test_another_ranks_error_is_raised_here_before_the_coverage_check(monkeypatch):
    """This rank predicted fine (and saw only half the images): it raises rank 1's error, not a
    CoverageError, and never returns to wait in a later collective."""
    monkeypatch.setattr(
        comm, "all_gather_object", lambda own: [own, own._replace(keys=[], error="rank 1: OSError: gone")]
    )
    with pytest.raises(RuntimeError, match="^rank 1: OSError: gone$"):
        _everywhere([_batch({"a": 1})], ["a", "b"])


WORLD = 2


def _loaders(rank: int) -> dict:
    """scenario -> this rank's loader (rank 1 holds c and the unreadable d)."""
    if rank == 0:
        clean = [_batch({"a": 51, "b": 102})]
        return {"clean": clean, "fails_on_rank_1": clean}
    return {"clean": [_batch({"c": 255}, bad=("d",))], "fails_on_rank_1": _failing(ValueError("boom"), _batch({}))}


def _rank_main(rank: int) -> dict:
    saved = {}
    for name, loader in _loaders(rank).items():
        try:
            seen = _everywhere(loader, ["a", "b", "c", "d"], with_loss=True)
            saved[name] = (
                seen.keys,
                [b["key"] for b in seen.skipped],
                seen.loss_sum,
                seen.detections.image_id.tolist(),
            )
        except RuntimeError as e:
            saved[name] = f"{type(e).__name__}: {e}"
    return saved


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_in_ranks(_rank_main, WORLD, tmp_path_factory.mktemp("ranks"))


@pytest.mark.slow
def test_two_ranks_gather_everything_but_keep_their_own_detections(ranks):
    for rank, saved in enumerate(ranks):
        keys, skipped, loss_sum, image_ids = saved["clean"]
        assert keys == ["a", "b", "c"] and skipped == ["d"]
        assert loss_sum == pytest.approx({"loss_a": 1.6, "loss": 1.6})  # 0.6 on rank 0 + 1.0 on rank 1
        assert image_ids == [[51, 102], [255]][rank]


@pytest.mark.slow
def test_an_error_on_one_rank_is_raised_on_every_rank(ranks):
    assert [saved["fails_on_rank_1"] for saved in ranks] == ["RuntimeError: rank 1: ValueError: boom"] * 2
