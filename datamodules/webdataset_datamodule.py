"""``WebDatasetDataModule``: Lightning's datamodule over the resumable shard stream (datamodules/stream.py): it
counts the shards' samples before the first step (shard_counts.py), plans each pass, records each consumed
batch's position, keys and skips, and saves and restores the data position of every rank in the checkpoint,
onto the same layout exactly, onto another number of ranks or workers by dividing what is left of the epoch
(sample_slices.py)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from llm4gen.configs.checks import check_range
from llm4gen.configs.schema import Config, DataConfig
from llm4gen.configs.setup_checks import check_data_stream, check_samples_per_rank, check_shard_slots
from llm4gen.datamodules.batch import Batch
from llm4gen.datamodules.entity_targets import EntityTargetBuilder
from llm4gen.datamodules.sample_slices import Span, pass_remaining
from llm4gen.datamodules.shard_counts import count_samples, known_counts, placeholder_for_unreadable, store_counts
from llm4gen.datamodules.shards import epoch_shard_numbers, resolve_shards
from llm4gen.datamodules.stream import PassPlan, ShardStream, StreamConfig, WorkerPosition
from llm4gen.datamodules.transforms import SKIP_REASONS


class PassDataLoader(DataLoader):
    """A DataLoader that asks the datamodule for the pass plan (epoch, resume point) at each ``iter``."""

    def __init__(self, dataset: ShardStream, datamodule: "WebDatasetDataModule", **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._datamodule = datamodule

    def __iter__(self) -> Iterator[Batch]:
        plan = self._datamodule._begin_pass(self.num_workers)
        self.dataset.plan = plan
        batches = super().__iter__()  # workers start here and receive the dataset with this plan
        return self._datamodule._watch_pass(batches, plan.epoch)

    # Lightning treats a loader with state_dict/load_state_dict as resumable mid-epoch. This one is:
    # its position lives in the datamodule's state (gathered over ranks), so the loader's own is empty.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass






class WebDatasetDataModule(L.LightningDataModule):
    """Training batches from WebDataset shards.

    Each batch is a :class:`~llm4gen.datamodules.batch.Batch` (its fields, types and shapes are written
    there): pixels at ``resolution`` squared (or, with ``buckets``, the batch's bucket) unless
    ``precomputed_keys`` holds ``latent_moments``; cached text features as ``precomputed_keys`` says; parsed
    entities and the entity loss's targets when an ``entity_parser`` / ``entity_targets`` builder is given.
    ``skipped`` and ``position`` are bookkeeping: under a Trainer the datamodule's own
    ``on_before_batch_transfer`` records each training batch's position, keys and skips and hands the model
    the batch without them (:meth:`Batch.for_model`). Without a Trainer, call :meth:`on_batch_consumed`
    once per batch trained on.
    """

    def __init__(self, shards: Union[str, Sequence[str]], *, seed: int = Config.seed, shuffle_shards: bool = True,
                 entity_parser: Optional[str] = None, entity_targets: Optional[EntityTargetBuilder] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 buckets: Optional[Sequence[Sequence[int]]] = None, counts_dir: Optional[str] = None, **data: Any):
        """``data``: any field of the schema's ``data`` section (configs/schema.DataConfig: ``batch_size``,
        ``resolution``, ``precomputed_keys``, ...), its defaults the schema's, so a datamodule built in a notebook
        batches like one built from a config; an unknown keyword is refused. ``buckets``: the resolved (width,
        height) sizes (configs.buckets.resolve_buckets), not the section's spec. ``counts_dir``: where the shards'
        sample counts are cached when the shard folder is read-only or remote (train.py: the run folder)."""
        super().__init__()
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(DataConfig)} - {"shards", "buckets"})
        if unknown:
            raise TypeError(f"WebDatasetDataModule got unknown keywords {unknown}; it takes the fields of "
                            f"configs.schema.DataConfig and seed, shuffle_shards, entity_parser, entity_targets, rank, "
                            f"world_size, buckets, counts_dir")
        if isinstance(data.get("caption_keys"), str):
            data["caption_keys"] = [data["caption_keys"]]
        self.data = dataclasses.replace(DataConfig(), shards=shards if isinstance(shards, str) else [str(s) for s in shards],
                                        **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
        d = self.data
        # load_config refuses these first; here they guard a datamodule built without a config
        for key in ("batch_size", "num_workers", "epoch_batches"):
            check_range(f"data.{key}", getattr(d, key))
        check_data_stream(d.resampled, d.epoch_batches, d.precomputed_keys, d.prefetch_factor, d.num_workers)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then they come from the trainer)")
        if buckets is not None:
            buckets = [(int(w), int(h)) for w, h in buckets]
            if not buckets or any(w <= 0 or h <= 0 for w, h in buckets) or len(set(buckets)) != len(buckets):
                raise ValueError(f"buckets must be distinct positive (width, height) sizes "
                                 f"(configs.buckets.bucket_sizes), got {buckets}")
        self.seed = int(seed)
        self.shuffle_shards = bool(shuffle_shards)
        self.entity_parser = entity_parser
        self.entity_targets = entity_targets
        self._explicit_rank = None if rank is None else (int(rank), int(world_size))
        self.buckets: Optional[list[tuple[int, int]]] = buckets
        self.counts_dir = counts_dir
        self._shards: Optional[list[str]] = None
        self._sizes: Optional[list[int]] = None  # samples per shard; None: whole-shard streams (epoch_batches, resampled)
        # Data position (this rank), advanced by on_batch_consumed.
        self._epoch = 0
        self._consumed = 0
        self._next_worker = 0
        self._workers: list[WorkerPosition] = []
        self._layout: Optional[tuple[int, int]] = None  # (num_workers, world_size) of the position
        self._samples: Optional[list[Span]] = None  # what this pass reads of the epoch; None: all of it
        self._pass_finished = False
        self._loaded: Optional[Mapping[str, Any]] = None
        self._skipped_totals = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self._skipped_consumed = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.last_keys: list[str] = []  # the ``__key__`` of each sample of the batch consumed last

    @classmethod
    def from_config(cls, data: DataConfig, *, seed: int, entity_parser: Optional[str] = None,
                    entity_targets: Optional[EntityTargetBuilder] = None,
                    buckets: Optional[Sequence[Sequence[int]]] = None,
                    counts_dir: Optional[str] = None) -> "WebDatasetDataModule":
        """From the typed ``data`` section (``OmegaConf.to_object(cfg.data)``) as it is; ``buckets`` resolved from
        ``data.buckets`` by configs.buckets.resolve_buckets (None: square crops)."""
        fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig) if f.name not in ("shards", "buckets")}
        return cls(data.shards, seed=seed, entity_parser=entity_parser, entity_targets=entity_targets, buckets=buckets,
                   counts_dir=counts_dir, **fields)

    # ---- Lightning hooks

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training batch is consumed here, just before the step that trains on it (Lightning calls
        this hook of the datamodule in the fit loop); every batch leaves without its bookkeeping."""
        if not isinstance(batch, Batch):
            return batch
        trainer = self.trainer  # set by Lightning; None outside a Trainer
        if trainer is not None and trainer.training and batch.position is not None:
            self.on_batch_consumed(batch)
        return batch.for_model()

    def setup(self, stage: Optional[str] = None) -> None:
        self._shards = resolve_shards(self.data.shards)
        rank, world_size = self.distributed_context()
        if self.sample_addressed and self._sizes is None:
            self._sizes = self._count_samples(rank, world_size)
            # the preflight refuses this first where the counts are recorded or cached
            check_samples_per_rank(sum(self._sizes), world_size, self.data.batch_size)
        # the preflight refuses this first where it knows the world size; here it guards every other caller
        check_shard_slots(len(self._shards), world_size, self.data.num_workers, self.data.epoch_batches,
                          self.data.resampled)

    @property
    def sample_addressed(self) -> bool:
        """True unless ``epoch_batches`` or ``resampled`` is set: the epoch's samples are addressed one by one and
        divided equally among the ranks (stream.py, sample_slices.py)."""
        return self.data.epoch_batches is None and not self.data.resampled

    def _count_samples(self, rank: int, world_size: int) -> list[int]:
        """Samples per shard (shard_counts.py). Under torch.distributed each rank counts its share of the shards
        no record covers and the ranks exchange them; rank 0 caches them."""
        shards = self._shards
        counts = known_counts(self.data.shards, shards, self.counts_dir)
        missing = [i for i, n in enumerate(counts) if n is None]
        gathering = self._explicit_rank is None and dist.is_available() and dist.is_initialized() and world_size > 1
        share = missing[rank::world_size] if gathering else missing
        counted = list(zip(share, count_samples([shards[i] for i in share])))
        if gathering:
            parts: list[Any] = [None] * world_size
            dist.all_gather_object(parts, counted)  # every rank calls setup(), so every rank joins
            counted = [item for part in parts for item in part]
        for i, n in counted:
            counts[i] = n
        if counted and (not gathering or rank == 0):
            store_counts([shards[i] for i, _ in counted], [n for _, n in counted], self.counts_dir)
        return placeholder_for_unreadable(counts)

    def train_dataloader(self) -> DataLoader:
        if self._shards is None:
            self.setup("fit")
        config = StreamConfig(shards=list(self._shards), data=self.data, seed=self.seed, sizes=self._sizes,
                              shuffle_shards=self.shuffle_shards, entity_parser=self.entity_parser,
                              entity_targets=self.entity_targets,
                              buckets=None if self.buckets is None else list(self.buckets))
        return PassDataLoader(
            ShardStream(config),
            self,
            num_workers=self.data.num_workers,
            pin_memory=self.data.pin_memory,
            persistent_workers=False,
            **({"prefetch_factor": self.data.prefetch_factor} if self.data.prefetch_factor is not None else {}),
        )

    def state_dict(self) -> dict[str, Any]:
        """The data position of every rank (gathered: the checkpoint is written by rank 0 only).

        Lightning calls this on all ranks while saving, as ``Trainer.save_checkpoint`` requires.
        """
        local = self._position_state()
        ranks = [local]
        if self._explicit_rank is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        return {"seed": self.seed, "batch_size": self.data.batch_size, "buckets": self._bucket_state(), "ranks": ranks,
                **self._order_state()}

    def _order_state(self) -> dict[str, Any]:
        """How positions address samples: ``order`` "samples" (sample_slices.py: the pass's ``samples`` of an epoch
        of ``epoch_samples`` samples in ``num_shards`` shards) or "shards" (whole-shard streams)."""
        if self._sizes is None:
            return {"order": "shards"}
        samples = None if self._pass_finished or self._samples is None else [list(span) for span in self._samples]
        return {"order": "samples", "samples": samples, "epoch_samples": sum(self._sizes), "num_shards": len(self._sizes)}

    def _bucket_state(self) -> Optional[list[list[int]]]:
        return None if self.buckets is None else [list(b) for b in self.buckets]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the position; it is applied when the train DataLoader is next iterated."""
        if state_dict.get("seed") != self.seed or state_dict.get("batch_size") != self.data.batch_size:
            warnings.warn(
                f"data position saved with seed={state_dict.get('seed')}, batch_size={state_dict.get('batch_size')} "
                f"but configured seed={self.seed}, batch_size={self.data.batch_size}: the resumed stream will differ",
                stacklevel=2,
            )
        if state_dict.get("buckets") != self._bucket_state():
            warnings.warn(
                f"data position saved with aspect-ratio buckets {state_dict.get('buckets')} but configured with "
                f"{self._bucket_state()}: the resumed stream will differ (samples waiting in a bucket are lost)",
                stacklevel=2,
            )
        self._loaded = dict(state_dict)

    # ---- position bookkeeping

    def on_batch_consumed(self, batch: Batch) -> None:
        """Record that ``batch`` was trained on. Call once per training batch, in ``training_step``."""
        position = batch.position if isinstance(batch, Batch) else None
        if position is None:
            raise ValueError("on_batch_consumed needs a batch from train_dataloader(), which carries 'position'")
        if self._layout is None or position["epoch"] != self._epoch or position["num_workers"] != self._layout[0]:
            raise ValueError(
                f"batch from epoch {position['epoch']} with {position['num_workers']} workers does not belong to the "
                f"current pass (epoch {self._epoch}, layout {self._layout}); was a batch reported twice or late?"
            )
        worker = position["worker"]
        self._workers[worker] = WorkerPosition(cursor=int(position["cursor"]), batches=int(position["worker_batches"]),
                                               snapshot=position.get("snapshot"))
        self._next_worker = (worker + 1) % position["num_workers"]
        self._consumed += 1
        self.last_keys = list(batch.keys)
        if batch.skipped is not None:
            self._skipped_consumed += batch.skipped.cpu()

    def skipped_totals(self) -> dict[str, int]:
        """Skipped samples per reason over all batches this datamodule's loaders yielded (all workers)."""
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._skipped_totals)}

    def skipped_consumed(self) -> dict[str, int]:
        """Skipped samples per reason up to the batches consumed so far in this process (what was trained
        on; a loader's prefetched batches are not counted)."""
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._skipped_consumed)}

    @property
    def epoch(self) -> int:
        """The data epoch that the next batch belongs to."""
        return self._epoch + 1 if self._pass_finished else self._epoch

    @property
    def batches_consumed(self) -> int:
        """Batches of the current data epoch reported through :meth:`on_batch_consumed`."""
        return 0 if self._pass_finished else self._consumed

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of ``epoch`` (drops any mid-epoch position)."""
        self._start_epoch(int(epoch), self._layout)

    def distributed_context(self) -> tuple[int, int]:
        """(rank, world_size): explicit constructor values, else the trainer's, else torch.distributed's."""
        if self._explicit_rank is not None:
            return self._explicit_rank
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _position_state(self) -> dict[str, Any]:
        num_workers, world_size = self._layout or (max(self.data.num_workers, 1), self.distributed_context()[1])
        if self._pass_finished:
            return {"epoch": self._epoch + 1, "batches": 0, "next_worker": 0, "workers": [],
                    "num_workers": num_workers, "world_size": world_size}
        return {
            "epoch": self._epoch,
            "batches": self._consumed,
            "next_worker": self._next_worker,
            "workers": [[w.cursor, w.batches, w.snapshot] for w in self._workers],
            "num_workers": num_workers,
            "world_size": world_size,
        }

    def _start_epoch(self, epoch: int, layout: Optional[tuple[int, int]], samples: Optional[list[Span]] = None) -> None:
        self._epoch, self._consumed, self._next_worker = epoch, 0, 0
        self._workers = [WorkerPosition() for _ in range(layout[0])] if layout else []
        self._layout = layout
        self._samples = samples
        self._pass_finished = False

    def _begin_pass(self, loader_workers: int) -> PassPlan:
        rank, world_size = self.distributed_context()
        layout = (max(loader_workers, 1), world_size)
        if self._loaded is not None:
            self._restore_position(rank, layout)
        if self._pass_finished or (self.data.epoch_batches is not None and self._consumed >= self.data.epoch_batches):
            self._start_epoch(self._epoch + 1, layout)
        elif self._layout != layout:  # another num_workers in this process: what this rank left, if it was alone
            if self._consumed:
                self._continue_on(layout, {"ranks": [self._position_state()], **self._order_state()})
            else:
                self._start_epoch(self._epoch, layout, self._samples)
        return PassPlan(
            epoch=self._epoch,
            rank=rank,
            world_size=world_size,
            num_workers=layout[0],
            first_worker=self._next_worker,
            workers=[WorkerPosition(w.cursor, w.batches, w.snapshot) for w in self._workers],
            samples=self._samples,
        )

    def _restore_position(self, rank: int, layout: tuple[int, int]) -> None:
        state, self._loaded = self._loaded, None
        ranks = state["ranks"]
        saved = ranks[rank] if rank < len(ranks) else ranks[0]
        saved_layout = (saved["num_workers"], saved["world_size"])
        same_batches = self._sizes is None or state.get("batch_size", self.data.batch_size) == self.data.batch_size
        if saved_layout == layout and len(ranks) == layout[1] and self._same_order(state) and same_batches:
            self._start_epoch(int(saved["epoch"]), layout, self._saved_samples(state))
            self._consumed = int(saved["batches"])
            self._next_worker = int(saved["next_worker"])
            if saved["workers"]:
                self._workers = [WorkerPosition(int(w[0]), int(w[1]), w[2] if len(w) > 2 else None) for w in saved["workers"]]
            return
        self._epoch = int(saved["epoch"])
        self._continue_on(layout, state)

    def _continue_on(self, layout: tuple[int, int], state: Mapping[str, Any]) -> None:
        """Start the rest of the current epoch on ``layout`` (another number of workers or ranks than ``state``
        was saved with): exactly the samples its ranks had not used yet when that can be known, else the whole
        epoch again, with a warning."""
        ranks = state["ranks"]
        same_epoch = all(int(r["epoch"]) == self._epoch for r in ranks)
        if not any(int(r["batches"]) for r in ranks) and same_epoch:  # nothing of this pass used yet
            self._start_epoch(self._epoch, layout, self._saved_samples(state) if self._same_order(state) else None)
            return
        left = None
        if self._sizes is not None and self._same_order(state) and same_epoch:
            spans = self._saved_samples(state) or [(0, sum(self._sizes))]
            order = epoch_shard_numbers(len(self._sizes), self.seed, self._epoch, self.shuffle_shards)
            saved_batch_size = int(state.get("batch_size", self.data.batch_size))  # the slots were cut with it
            left = pass_remaining(ranks, spans, order, self._sizes, saved_batch_size)
        if left is None:
            saved = (ranks[0]["num_workers"], ranks[0]["world_size"])
            warnings.warn(
                f"data position saved with (num_workers, world_size)={saved} but running with {layout}: which "
                f"samples were used is not known ({self._why_unknown(state)}), restarting epoch {self._epoch} "
                f"from its beginning", stacklevel=3)
        self._start_epoch(self._epoch, layout, left)

    def _why_unknown(self, state: Mapping[str, Any]) -> str:
        if self._sizes is None:
            return "epoch_batches or resampled streams read whole shards per rank and worker"
        if state.get("order") != "samples":
            return "the checkpoint predates sample-addressed positions or was saved with epoch_batches"
        if not self._same_order(state):
            return (f"the seed or the shards changed: seed {state.get('seed')}, {state.get('epoch_samples')} samples in "
                    f"{state.get('num_shards')} shards then; seed {self.seed}, {sum(self._sizes)} in {len(self._sizes)} now")
        return "a worker's position has no snapshot, or the ranks were at different epochs"

    def _same_order(self, state: Mapping[str, Any]) -> bool:
        """Whether the saved positions address the stream this datamodule reads."""
        order = state.get("order")
        if self._sizes is None:
            return order in (None, "shards")
        if order == "samples":  # positions in an epoch order drawn from the seed, over these counts
            return (state.get("epoch_samples") == sum(self._sizes) and state.get("num_shards") == len(self._sizes)
                    and state.get("seed", self.seed) == self.seed)
        # Before sample addressing (no "order"), the one worker of a lone rank read whole shards in epoch order
        # too: the same stream, so such a checkpoint still resumes exactly.
        return order is None and all((int(r["num_workers"]), int(r["world_size"])) == (1, 1) for r in state["ranks"])

    @staticmethod
    def _saved_samples(state: Mapping[str, Any]) -> Optional[list[Span]]:
        samples = state.get("samples")
        return None if samples is None else [(int(a), int(b)) for a, b in samples]

    def _watch_pass(self, batches: Iterator[Batch], epoch: int) -> Iterator[Batch]:
        for batch in batches:
            self._skipped_totals += batch.skipped
            yield batch
        if epoch == self._epoch:
            self._pass_finished = True
