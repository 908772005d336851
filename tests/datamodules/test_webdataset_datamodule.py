import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from llm4gen.datamodules.cache_codec import PRECOMPUTED_MEMBERS, encode_precomputed
from llm4gen.datamodules.collate import pad_llm_features
from llm4gen.datamodules.shards import resolve_shards
from llm4gen.datamodules.synthetic import synthetic_sample, write_synthetic_shards
from llm4gen.datamodules.transforms import SKIP_REASONS
from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
from tests.helpers.shards import png_bytes, write_tar

NUM_SYNTHETIC = 44  # 6 shards of 8 (the last holds 4): uneven on purpose






@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic shards plus one shard of bad samples and one tar cut in half."""
    directory = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(directory), num_samples=NUM_SYNTHETIC, samples_per_shard=8, resolution=16, seed=0)
    good = lambda i: (f"good-{i}", {"png": png_bytes(12), "txt": f"good caption {i}".encode()})  # noqa: E731
    write_tar(
        directory / "shard-bad.tar",
        [
            good(0),
            good(1),
            ("truncated", {"png": png_bytes(24)[:60], "txt": b"a truncated png"}),
            good(2),
            ("garbage", {"jpg": b"these bytes are not a jpeg", "txt": b"garbage named jpg"}),
            ("nocaption", {"png": png_bytes(12)}),
            ("emptycaption", {"png": png_bytes(12), "txt": b"   \n"}),
            good(3),
            good(4),
        ],
    )
    cut_path = directory / "shard-cut.tar"
    write_tar(cut_path, [(f"cut-{i}", {"png": png_bytes(16, (i, i, i)), "txt": f"cut {i}".encode()}) for i in range(6)])
    with tarfile.open(cut_path) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "cut-3.png").offset_data + 20
    with open(cut_path, "r+b") as handle:
        handle.truncate(cut_at)
    return str(directory)


SYNTHETIC_KEYS = {f"sample-{i:06d}" for i in range(NUM_SYNTHETIC)}
EXPECTED_GOOD = SYNTHETIC_KEYS | {f"good-{i}" for i in range(5)} | {f"cut-{i}" for i in range(3)}
EXPECTED_SKIPS = {"bad_image": 2, "missing_caption": 1, "empty_caption": 1, "bad_precomputed": 0, "bad_shard": 1,
                  "failed_download": 0}


def synthetic_only(data_dir):
    return os.path.join(data_dir, "shard-{000000..000005}.tar")


def make(data_dir, **overrides):
    settings = dict(shards=data_dir, batch_size=3, num_workers=0, resolution=8, shuffle_buffer=7, seed=5)
    settings.update(overrides)
    return WebDatasetDataModule(**settings)


def run_pass(dm, loader, limit=None):
    """Iterate one pass, reporting each batch as consumed; stop after ``limit`` batches."""
    batches = []
    for batch in loader:
        dm.on_batch_consumed(batch)
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def keys_of(batches):
    return [key for batch in batches for key in batch.keys]


def skips_of(batches):
    total = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in batches:
        total += batch.skipped
    return dict(zip(SKIP_REASONS, total.tolist()))


# ---------------------------------------------------------------- shard specs


def test_resolve_shards_from_directory_pattern_list_and_manifest(data_dir, tmp_path):
    listed = resolve_shards(data_dir)
    assert len(listed) == 8 and listed == sorted(listed)
    pattern = resolve_shards(synthetic_only(data_dir))
    assert [os.path.basename(p) for p in pattern] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert resolve_shards([pattern[0], synthetic_only(data_dir)]) == pattern[:1] + pattern
    manifest = tmp_path / "manifest.json"
    relative = [os.path.relpath(p, tmp_path) for p in pattern[:2]]
    manifest.write_text(json.dumps({"shards": [relative[0], {"url": pattern[1]}]}))
    assert resolve_shards(str(manifest)) == [os.path.normpath(os.path.join(tmp_path, relative[0])), pattern[1]]
    assert resolve_shards("pipe:cat /x/shard-{0..1}.tar") == ["pipe:cat /x/shard-0.tar", "pipe:cat /x/shard-1.tar"]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "ignored.tar").write_bytes(b"")
    manifest.rename(tmp_path / "manifest.json")  # a prepare.py output folder: the manifest wins
    assert resolve_shards(str(tmp_path)) == [os.path.normpath(os.path.join(tmp_path, relative[0])), pattern[1]]


def test_resolve_shards_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="2 of 2 shards.*shard-000008"):
        resolve_shards(str(tmp_path / "shard-{000008..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        resolve_shards(str(tmp_path))


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_yields_every_sample_once_with_the_batch_contract(data_dir, num_workers):
    dm = make(synthetic_only(data_dir), num_workers=num_workers, batch_size=4, resolution=16)
    batches = run_pass(dm, dm.train_dataloader())
    keys = keys_of(batches)
    assert sorted(keys) == sorted(SYNTHETIC_KEYS)
    for batch in batches:
        size = len(batch.keys)
        assert batch.pixel_values.shape == (size, 3, 16, 16) and batch.pixel_values.dtype == torch.float32
        assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
        assert batch.skipped.dtype == torch.long and batch.skipped.shape == (len(SKIP_REASONS),)
        for key, caption in zip(batch.keys, batch.captions):
            assert caption == synthetic_sample(int(key.split("-")[1]), 16, 0)["txt"]
    assert sum(len(b.keys) == 4 for b in batches) >= len(batches) - num_workers - 1  # partial: one per worker


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_by_reason(data_dir, num_workers):
    dm = make(data_dir, num_workers=num_workers)
    batches = run_pass(dm, dm.train_dataloader())
    keys = keys_of(batches)
    assert len(keys) == len(set(keys))
    assert set(keys) == EXPECTED_GOOD
    assert skips_of(batches) == EXPECTED_SKIPS
    assert dm.skipped_totals() == EXPECTED_SKIPS


def test_epochs_reshuffle_and_advance(data_dir):
    dm = make(synthetic_only(data_dir))
    loader = dm.train_dataloader()
    first, second = keys_of(run_pass(dm, loader)), keys_of(run_pass(dm, loader))
    assert sorted(first) == sorted(second) and first != second
    assert dm.epoch == 2
    again = make(synthetic_only(data_dir))
    assert keys_of(run_pass(again, again.train_dataloader())) == first  # same seed, same order


def test_random_flip_changes_with_epoch_but_not_with_workers(data_dir):
    pixels = {}
    for num_workers in (0, 2):
        dm = make(synthetic_only(data_dir), num_workers=num_workers, random_flip=True, center_crop=False)
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            for batch in run_pass(dm, loader):
                for key, image in zip(batch.keys, batch.pixel_values):
                    pixels[(num_workers, epoch, key)] = image
    for key in SYNTHETIC_KEYS:
        assert torch.equal(pixels[(0, 0, key)], pixels[(2, 0, key)])
    assert any(not torch.equal(pixels[(0, 0, k)], pixels[(0, 1, k)]) for k in SYNTHETIC_KEYS)


# ---------------------------------------------------------------- precomputed members


def test_pad_llm_features_pads_with_zeros_and_masks_real_tokens():
    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    features, mask = pad_llm_features([a, b])
    assert features.shape == (2, 4, 3) and mask.dtype == torch.bool
    assert torch.equal(mask, torch.tensor([[True, True, False, False], [True, True, True, True]]))
    assert torch.all(features[0, 2:] == 0) and torch.all(features[0, :2] == 1) and torch.all(features[1] == 2)
    with pytest.raises(ValueError, match="widths"):
        pad_llm_features([torch.ones(2, 3), torch.ones(2, 5)])


def test_encode_precomputed_uses_the_shared_member_names():
    members = encode_precomputed(np.zeros((4, 2, 2), np.float16), torch.zeros(5, 6), [{"entity": "circle"}],
                                 clip_features=torch.zeros(77, 8), clip_pooled=torch.zeros(8),
                                 original_size=(480, 640), crop_top_left=(0, 16),
                                 entity_positions={"positions": [[1, 80]], "num_tokens": 109})
    assert set(members) == set(PRECOMPUTED_MEMBERS.values())
    with pytest.raises(ValueError, match="dims"):
        encode_precomputed(latent_moments=np.zeros((2, 2)))


def test_precomputed_members_travel_instead_of_pixels(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    samples = []
    for i in range(7):
        latents = rng.standard_normal((4, 2, 2)).astype(np.float16)
        features = rng.standard_normal((2 + i % 3, 6)).astype(np.float32)
        entities = [{"attribute": "red", "entity": f"thing{i}"}]
        members = {"png": b"never decoded", "txt": f"caption {i}".encode(), **encode_precomputed(latents, features, entities)}
        if i == 4:  # written by torch.save instead of numpy
            del members[PRECOMPUTED_MEMBERS["llm_features"]]
            buffer = io.BytesIO()
            torch.save(torch.from_numpy(features), buffer)
            members["llm_features.pt"] = buffer.getvalue()
        if i == 6:
            del members[PRECOMPUTED_MEMBERS["latent_moments"]]
        samples.append((f"cached-{i}", members))
        expected[f"cached-{i}"] = (latents, features, entities)
    write_tar(tmp_path / "cache-0.tar", samples)
    dm = WebDatasetDataModule(
        str(tmp_path), batch_size=3, shuffle_buffer=0, precomputed_keys=["latent_moments", "llm_features", "entities"]
    )
    batches = run_pass(dm, dm.train_dataloader())
    assert keys_of(batches) == [f"cached-{i}" for i in range(6)]
    assert skips_of(batches)["bad_precomputed"] == 1 and skips_of(batches)["bad_image"] == 0
    for batch in batches:
        assert batch.pixel_values is None
        lengths = [expected[k][1].shape[0] for k in batch.keys]
        assert batch.latent_moments.shape == (len(lengths), 4, 2, 2) and batch.latent_moments.dtype == torch.float32
        assert batch.llm_features.shape == (len(lengths), max(lengths), 6)
        assert batch.llm_mask.sum(dim=1).tolist() == lengths
        for row, key in enumerate(batch.keys):
            latents, features, entities = expected[key]
            torch.testing.assert_close(batch.latent_moments[row], torch.from_numpy(latents.astype(np.float32)))
            torch.testing.assert_close(batch.llm_features[row, : len(features)], torch.from_numpy(features))
            assert torch.all(batch.llm_features[row, len(features) :] == 0)
            assert batch.entities[row] == entities


# ---------------------------------------------------------------- resume


def reference_run(data_dir, **settings):
    dm = make(data_dir, **settings)
    loader = dm.train_dataloader()
    return run_pass(dm, loader), run_pass(dm, loader)


def same_batches(a, b):
    assert keys_of(a) == keys_of(b)
    for x, y in zip(a, b):
        assert torch.equal(x.pixel_values, y.pixel_values)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_workers=0),
        dict(num_workers=2),
        dict(num_workers=2, epoch_batches=9),
        dict(num_workers=2, epoch_batches=9, resampled=True),
    ],
    ids=["workers0", "workers2", "workers2-epoch_batches", "workers2-resampled"],
)
@pytest.mark.slow
def test_resume_continues_the_uninterrupted_stream(data_dir, settings):
    settings = dict(settings, random_flip=True, center_crop=False)
    epoch0, epoch1 = reference_run(data_dir, **settings)
    assert len(epoch0) > 10 or settings.get("epoch_batches")
    exhaustive = not settings.get("epoch_batches")  # every stop where skips are countable exactly
    for stop in range(1, len(epoch0)) if exhaustive else sorted({1, 4, len(epoch0) // 2, len(epoch0) - 2}):
        interrupted = make(data_dir, **settings)
        consumed = run_pass(interrupted, interrupted.train_dataloader(), limit=stop)
        same_batches(consumed, epoch0[:stop])
        state = json.loads(json.dumps(interrupted.state_dict()))  # checkpoints need plain values

        resumed = make(data_dir, **settings)
        resumed.load_state_dict(state)
        loader = resumed.train_dataloader()
        rest = run_pass(resumed, loader)
        same_batches(rest, epoch0[stop:])
        same_batches(run_pass(resumed, loader), epoch1)
        if not settings.get("resampled") and not settings.get("epoch_batches"):
            assert skips_of(consumed + rest) == EXPECTED_SKIPS  # every skip counted exactly once


def test_state_after_a_finished_epoch_starts_the_next(data_dir):
    epoch0, epoch1 = reference_run(synthetic_only(data_dir), num_workers=2)
    dm = make(synthetic_only(data_dir), num_workers=2)
    run_pass(dm, dm.train_dataloader())
    state = dm.state_dict()
    assert state["ranks"][0]["epoch"] == 1 and state["ranks"][0]["batches"] == 0
    resumed = make(synthetic_only(data_dir), num_workers=2)
    resumed.load_state_dict(state)
    same_batches(run_pass(resumed, resumed.train_dataloader()), epoch1)


def test_a_pass_stopped_early_is_continued_by_the_next_pass(data_dir):
    (epoch0, _) = reference_run(synthetic_only(data_dir), num_workers=2)
    dm = make(synthetic_only(data_dir), num_workers=2)
    loader = dm.train_dataloader()
    head = run_pass(dm, loader, limit=5)
    assert dm.epoch == 0 and dm.batches_consumed == 5
    same_batches(head + run_pass(dm, loader), epoch0)


def test_changed_worker_count_finishes_the_saved_epoch_without_repeats(data_dir):
    dm = make(synthetic_only(data_dir), num_workers=2)
    head = run_pass(dm, dm.train_dataloader(), limit=3)
    resumed = make(synthetic_only(data_dir), num_workers=0)
    resumed.load_state_dict(dm.state_dict())
    loader = resumed.train_dataloader()
    rest = run_pass(resumed, loader)  # the samples the 2 workers had not used, read by one
    assert sorted(keys_of(head) + keys_of(rest)) == sorted(SYNTHETIC_KEYS)
    assert sorted(keys_of(run_pass(resumed, loader))) == sorted(SYNTHETIC_KEYS)  # then a whole epoch


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_disjoint_samples_that_cover_the_epoch_but_a_stated_remainder(data_dir, num_workers):
    per_rank = []
    for rank in (0, 1):
        dm = make(synthetic_only(data_dir), num_workers=num_workers, rank=rank, world_size=2)
        per_rank.append(run_pass(dm, dm.train_dataloader()))
    assert [len(batches) for batches in per_rank] == [NUM_SYNTHETIC // (2 * 3)] * 2  # equal, full batches of 3
    keys = [keys_of(batches) for batches in per_rank]
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) <= SYNTHETIC_KEYS
    assert len(keys[0] + keys[1]) == NUM_SYNTHETIC - NUM_SYNTHETIC % (2 * 3)  # fewer than one batch per rank unused


@pytest.mark.parametrize("resampled", [False, True])
def test_epoch_batches_gives_every_rank_the_same_number_of_full_batches(data_dir, resampled):
    counts, keys = [], []
    for rank in range(3):  # 6 shards of unequal size over 3 ranks x 2 workers
        dm = make(synthetic_only(data_dir), num_workers=2, rank=rank, world_size=3, epoch_batches=7, resampled=resampled)
        loader = dm.train_dataloader()
        assert len(loader) == 7
        batches = run_pass(dm, loader)
        counts.append([len(b.keys) for b in batches])
        keys.append(keys_of(batches))
    assert counts == [[3] * 7] * 3
    assert keys[0] != keys[1] != keys[2]


def test_invalid_settings_are_refused_with_the_fix(data_dir):
    with pytest.raises(ValueError, match="epoch_batches"):
        make(data_dir, resampled=True)
    with pytest.raises(ValueError, match="precomputed_keys"):
        make(data_dir, precomputed_keys=["latent"])
    with pytest.raises(ValueError, match="at least one shard per"):
        make(synthetic_only(data_dir), num_workers=4, rank=0, world_size=2, epoch_batches=3).setup("fit")
    dm = make(data_dir)
    with pytest.raises(ValueError, match="position"):
        dm.on_batch_consumed({"keys": ["x"]})


# ---------------------------------------------------------------- with a Lightning Trainer


class KeyRecorder:
    """A LightningModule (built lazily so importing this file stays light) that records batch keys."""

    @staticmethod
    def build():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen = []

            def training_step(self, batch, batch_idx):
                assert batch.position is None and batch.skipped is None  # the model sees only model input
                self.seen.append(tuple(self.trainer.datamodule.last_keys))
                return (self.weight * batch.pixel_values.mean()).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def fit_recording(shards, checkpoint_dir, num_workers, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = WebDatasetDataModule(shards, batch_size=4, num_workers=num_workers, resolution=8, shuffle_buffer=5, seed=1)
    model = KeyRecorder.build()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=str(checkpoint_dir), every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.slow
def test_trainer_resumed_from_mid_epoch_checkpoints_sees_the_same_batches(data_dir, tmp_path, num_workers):
    shards = synthetic_only(data_dir)  # 11 batches of 4 per epoch
    full = fit_recording(shards, tmp_path / "full", num_workers)
    assert len(full) == 22
    for step in (4, 12):  # mid epoch 0; mid epoch 1
        (checkpoint,) = (tmp_path / "full").glob(f"*-step={step}.ckpt")
        resumed = fit_recording(shards, tmp_path / f"resumed{step}", num_workers, ckpt_path=str(checkpoint))
        assert resumed == full[step:]


def _consume_under_gloo(rank, world_size, shards, init_file, out_file, stop):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dm = WebDatasetDataModule(shards, batch_size=3, num_workers=0, resolution=8, shuffle_buffer=4, seed=2)
        run_pass(dm, dm.train_dataloader(), limit=stop + rank)  # ranks at different positions
        state = dm.state_dict()  # collective: every rank takes part, as in Trainer.save_checkpoint
        if rank == 0:
            with open(out_file, "w") as handle:
                json.dump(state, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_state_dict_gathers_every_ranks_position_under_torch_distributed(data_dir, tmp_path):
    shards = synthetic_only(data_dir)
    torch.multiprocessing.spawn(
        _consume_under_gloo, args=(2, shards, str(tmp_path / "init"), str(tmp_path / "state.json"), 2), nprocs=2
    )
    state = json.loads((tmp_path / "state.json").read_text())
    assert [r["batches"] for r in state["ranks"]] == [2, 3]
    for rank in (0, 1):
        settings = dict(shards=shards, batch_size=3, resolution=8, shuffle_buffer=4, seed=2, rank=rank, world_size=2)
        reference = WebDatasetDataModule(**settings)
        full = run_pass(reference, reference.train_dataloader())
        resumed = WebDatasetDataModule(**settings)
        resumed.load_state_dict(state)
        assert keys_of(run_pass(resumed, resumed.train_dataloader())) == keys_of(full[2 + rank :])


def test_a_broken_shard_right_after_a_batch_is_counted_once_across_a_resume(tmp_path):
    good = lambda name: [(f"{name}-{i}", {"png": png_bytes(12), "txt": b"caption"}) for i in range(3)]  # noqa: E731
    write_tar(tmp_path / "a.tar", good("a"))
    (tmp_path / "b.tar").write_bytes(b"not a tar archive at all" * 40)
    write_tar(tmp_path / "c.tar", good("c"))
    settings = dict(shards=str(tmp_path), batch_size=3, resolution=8, shuffle_buffer=0, shuffle_shards=False)
    full = WebDatasetDataModule(**settings)
    batches = run_pass(full, full.train_dataloader())
    assert keys_of(batches) == [f"{n}-{i}" for n in "ac" for i in range(3)]
    assert skips_of(batches)["bad_shard"] == 1
    first = WebDatasetDataModule(**settings)
    consumed = run_pass(first, first.train_dataloader(), limit=1)
    resumed = WebDatasetDataModule(**settings)
    resumed.load_state_dict(first.state_dict())
    rest = run_pass(resumed, resumed.train_dataloader())
    assert keys_of(rest) == [f"c-{i}" for i in range(3)]
    assert skips_of(consumed)["bad_shard"] + skips_of(rest)["bad_shard"] == 1
