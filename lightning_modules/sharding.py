"""Sharded data parallel (FSDP2) for the runs that train the UNet: ``trainer.strategy: fsdp2``.

DDP keeps a whole copy of what trains on every GPU: its fp32 master weights, gradients, AdamW moments and EMA.
For SDXL's UNet that is 2.6 B parameters, ~39 GiB before any activation (bench/memory_table.py), more than
an 80 GB GPU holds beside the rest. FSDP2 (torch's ``fully_shard``, through Lightning's
``ModelParallelStrategy``: the module's ``configure_model`` applies it) keeps 1/N of each on each of N GPUs
and gathers a block's weights just before the block runs.

- What trains is sharded: the UNet per transformer and resnet block, then as a whole; the connector and the
  gated fusion (each layer of it, which the UNet's processors call directly). Frozen parts (VAE, CLIP, the LLM)
  stay whole on every rank: they hold no gradient or optimizer state, and a frozen UNet leaves nothing worth
  sharding (the config check refuses it and suggests DDP).
- On a GPU with ``trainer.precision: bf16-mixed``, the blocks compute in bf16 with fp32 gradient reduction
  (``MixedPrecisionPolicy``). ``model.performance.gradient_checkpointing`` (diffusers' own, per block) recomputes
  activations in the backward as under DDP; FSDP2 gathers a block's weights again for the recomputation.
- Checkpoints stay what they were: ``step=N.ckpt`` and ``last.ckpt``, each now a folder of torch distributed
  checkpoint (DCP) shards holding only what trains (trained weights, optimizer state, EMA) plus the run's
  metadata (``meta.pt``: step, data position, counters), written to a temporary folder and renamed into place.
  DCP reshards on load: a run saved on N processes resumes on M. ``consolidated_checkpoint`` turns a folder
  into an ordinary checkpoint in one process, which is how export, generation and evaluation read it. Both read
  the folder's index, its shards' non-tensor entries and ``meta.pt`` without running code
  (lightning_modules/safe_loading.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from llm4gen.configs.checks import SHARDED as STRATEGY_NAME  # the trainer.strategy value that selects it
from llm4gen.lightning_modules.checkpoint_files import META_FILE, check_resume_layout, checkpoint_metadata
from llm4gen.lightning_modules.safe_loading import dcp_load, read_dcp_checkpoint


def sharded_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's units of sharding: every resnet and transformer (attention) block of its down, mid and up
    blocks; a unit's weights are gathered together just before it runs."""
    units = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is None:
            continue
        units += list(getattr(block, "resnets", None) or []) + list(getattr(block, "attentions", None) or [])
    return units


def shard_module(module, mesh, param_dtype: Optional[torch.dtype] = None) -> None:
    """``fully_shard`` what trains in an ``LLM4GenModule`` over ``mesh`` (its data-parallel dimension); with
    ``param_dtype`` the gathered weights compute in it while gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in sharded_blocks(module.unet):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module.unet, mesh=mesh, mp_policy=policy)
    if any(p.requires_grad for p in module.adapter.parameters()):
        fully_shard(module.adapter, mesh=mesh, mp_policy=policy)
    if module.fusion is not None:
        for layer in module.fusion.layers.values():  # the UNet's processors call each layer, not the fusion
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module.fusion, mesh=mesh, mp_policy=policy)


def consolidated_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint folder read in one process, as the ordinary checkpoint dict an unsharded run writes
    (``state_dict`` of what trains, ``optimizer_states``, ``ema`` and the metadata): full tensors on the CPU."""
    checkpoint = checkpoint_metadata(path)  # first: the small file, refused before the shards are read
    tensors = read_dcp_checkpoint(path)
    checkpoint["state_dict"] = tensors["state_dict"]
    checkpoint["optimizer_states"] = [tensors[k] for k in sorted(k for k in tensors if k.startswith("optimizer_"))]
    if "ema" in tensors:
        checkpoint["ema"] = tensors["ema"]
    return checkpoint


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with FSDP2 over every process (no tensor parallelism) and checkpoints
    that hold only what trains: the module's trainable weights (its ``on_save_checkpoint`` drops the frozen ones),
    the optimizer state and the EMA, each sharded into the DCP folder, written atomically."""

    def __init__(self, world_size: int, after_save: Optional[Callable[[int, Path], Any]] = None, **kwargs):
        """``after_save(step, path)`` runs on rank 0 once a checkpoint is complete under its name (train.py prunes
        the run's older signal checkpoints there, as AtomicCheckpointIO does for an unsharded run)."""
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True,
                         **kwargs)
        self.after_save = after_save

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        from torch.distributed.checkpoint import save

        if storage_options is not None:
            raise TypeError("the sharded strategy writes its own folders: storage_options is not supported")
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("sharded_checkpoint_tmp")
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        tensors.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        if "ema" in checkpoint:
            tensors["ema"] = checkpoint.pop("ema")
        save(tensors, checkpoint_id=tmp)
        if self.global_rank == 0:
            torch.save(checkpoint, tmp / META_FILE)
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                path.rename(old) if path.is_dir() else path.unlink()
            tmp.rename(path)  # the checkpoint is complete under its name, or the previous one is
            if old.exists():
                shutil.rmtree(old)
            if self.after_save is not None and isinstance(checkpoint.get("global_step"), int):
                self.after_save(checkpoint["global_step"], path)
        self.barrier("sharded_checkpoint_done")

    def remove_checkpoint(self, filepath) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        check_resume_layout(path, STRATEGY_NAME)  # the preflight refuses it first
        metadata = checkpoint_metadata(path)  # refused here, before any weight changes, if it would run code
        trainable = module.trainable_state_keys()
        state: dict[str, Any] = {"state_dict": {k: v for k, v in get_model_state_dict(self.model).items() if k in trainable}}
        for i, optimizer in enumerate(self.optimizers):
            state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, optimizer)
        if module.ema is not None:
            state["ema"] = module.ema.state_dict()
        dcp_load(state, path)  # resharded to this run's processes
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{i}"])
        metadata["state_dict"] = state["state_dict"]
        if "ema" in state:
            metadata["ema"] = state["ema"]
        return metadata
