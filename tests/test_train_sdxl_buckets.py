"""train.py on the embedded tiny SDXL with aspect-ratio buckets (on by default for SDXL), on images of
mixed shapes (with the entity loss, whose attention maps are then not square): every step trains on one
bucket, and a run resumed from a mid-epoch checkpoint trains on the same batches as the uninterrupted run."""

import functools

import lightning as L
import pytest

from llm4gen.cli import train
from llm4gen.configs.buckets import assign_bucket, bucket_sizes
from llm4gen.datamodules.synthetic import write_synthetic_shards
from tests.helpers.training import FAST

SIZES = [(32, 32), (48, 24), (24, 48), (64, 36), (30, 34)]


class BatchRecorder(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the datamodule took the keys out of the batch (bookkeeping) and keeps those of the batch consumed last
        self.batches.append((tuple(trainer.datamodule.last_keys), tuple(batch.pixel_values.shape[-2:])))


def fit(monkeypatch, out, shards, *extra):
    recorder = BatchRecorder()
    monkeypatch.setattr(train, "build_trainer", functools.partial(train.build_trainer, extra_callbacks=[recorder]))
    assert train.main(["--config", "configs/tiny_sdxl.yaml", f"output_dir={out}", f"data.shards={shards}",
                       "data.synthetic_if_missing=false", "data.batch_size=2", "trainer.max_steps=4",
                       "checkpoint.every_n_steps=2", "checkpoint.keep_last=-1", "model.objective.lambda_entity=0.1",
                       *FAST, *extra]) == 0
    return recorder.batches


@pytest.mark.slow
def test_tiny_sdxl_trains_on_bucket_pure_batches_and_resumes_exactly(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=20, samples_per_shard=10, resolution=32, sizes=SIZES)
    bucket_of = {f"sample-{i:06d}": assign_bucket(*SIZES[i % len(SIZES)], bucket_sizes(32)) for i in range(20)}
    full = fit(monkeypatch, tmp_path / "full", shards)
    assert len(full) == 4
    for keys, (height, width) in full:
        assert {bucket_of[key] for key in keys} == {(width, height)}
    assert len({shape for _, shape in full}) > 1  # more than one bucket trained on
    resumed = fit(monkeypatch, tmp_path / "resumed", shards,
                  f"resume={tmp_path / 'full' / 'checkpoints' / 'step=0000002.ckpt'}")
    assert resumed == full[2:]
