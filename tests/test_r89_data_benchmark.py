"""benchmark.py's data-loader comparison (record 21's TrainLoader against record 89's DocumentLoader): its
consumer arithmetic against sleeps of known length, and a short run on the test shards."""
import math
import time

import pytest

import benchmark as B
from conftest import shard_paths


def test_consumer_rates_match_known_sleeps():
    """A loader that takes 6 ms per batch and a consumer that works 2 ms: 8 ms per batch, 3/4 of it waiting."""
    batches_per_s, waiting = B.consume(lambda: time.sleep(0.006), batches=20, work_s=0.002)
    assert batches_per_s == pytest.approx(1 / 0.008, rel=0.25)
    assert waiting == pytest.approx(0.75, abs=0.1)


def test_loader_comparison_gives_positive_rates_and_wait_shares(monkeypatch):
    train_files, _ = shard_paths()
    monkeypatch.setattr(B, "LOADER_BATCHES", 10)
    figures = B.compare_data_loaders(str(B.testdata.first_file(train_files)))
    assert figures["batches"] == 10
    for loader in ("old", "new"):
        assert math.isfinite(figures[f"{loader}_batches_per_s"]) and figures[f"{loader}_batches_per_s"] > 0
        assert 0 < figures[f"{loader}_wait_percent"] < 100
