"""Files crafted to run code when they are read: each one's unpickling would create a marker file (what a real
attack does with os.system). A test gives one to a reader and checks the marker never appears."""

from __future__ import annotations

import pickle
from pathlib import Path


class CreatesFile:
    """Unpickled, this calls ``open(path, "w")``: the file appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def model_section() -> dict:
    """The embedded tiny default's model config: a crafted file that looks like this project's checkpoint."""
    from omegaconf import OmegaConf

    from llm4gen.configs.schema import load_config

    return OmegaConf.to_container(load_config().model, resolve=True)


def checkpoint_contents(step: int = 5) -> dict:
    """What an LLM4GEN checkpoint holds, small: a CAM weight, the config, the step."""
    import torch

    return {"global_step": step, "state_dict": {"adapter.blocks.0.q_proj.weight": torch.zeros(2, 2)},
            "hyper_parameters": {"model": model_section(), "seed": 0}}


def crafted_checkpoint(path, marker, step: int = 5) -> Path:
    """An LLM4GEN-looking ``.ckpt`` with the payload among its callbacks' state."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**checkpoint_contents(step), "callbacks": {"RunCheckpoint": {"dirpath": CreatesFile(marker)}}}, path)
    return path


def sharded_checkpoint(folder, step: int = 5, meta_extra: dict | None = None, entry_extra: dict | None = None) -> Path:
    """A sharded checkpoint folder as ShardedStrategy writes one (DCP shards of what trains, optimizer and EMA state,
    beside ``meta.pt``), saved in this process; ``meta_extra`` / ``entry_extra`` go into meta.pt / the EMA entry."""
    import torch
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    weight = torch.arange(4.0).reshape(2, 2)
    tensors = {"state_dict": {"adapter.blocks.0.q_proj.weight": weight},
               "optimizer_0": {"state": {"adapter.blocks.0.q_proj.weight": {"step": torch.tensor(5.0),
                                                                            "exp_avg": weight / 10}},
                               "param_groups": [{"name": "adapter", "lr": 1e-4, "betas": (0.9, 0.999),
                                                 "params": ["adapter.blocks.0.q_proj.weight"]}]},
               "ema": {"decay": 0.999, "optimization_step": step, "shadow_params": [weight + 1], **(entry_extra or {})}}
    dcp.save(tensors, checkpoint_id=folder)
    meta = {key: value for key, value in checkpoint_contents(step).items() if key != "state_dict"}
    torch.save({**meta, **(meta_extra or {})}, folder / "meta.pt")
    return folder


def crafted_dcp_index(folder, marker) -> Path:
    """``folder``'s DCP index (``.metadata``, a plain pickle) with the payload in front of the real index."""
    index = Path(folder) / ".metadata"
    with open(index, "rb") as handle:
        real = pickle.load(handle)  # this test's own file, written a line before
    index.write_bytes(pickle.dumps([CreatesFile(marker), real], protocol=4))
    return Path(folder)


def listing(root) -> list[str]:
    """Every path under ``root`` (relative), to compare before and after: a refusal writes nothing."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
