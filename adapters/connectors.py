"""The connectors a run can train, by ``model.adapter.kind``, and how a saved one is read back.

    cam          LLM4GEN's Cross-Adapter Module (adapters/cross_adapter.py): [CLIP, CAM(CLIP, LLM)]
    mlp          a two-layer projection of the LLM tokens after CLIP's (adapters/mlp.py)
    lavi_bridge  LaVi-Bridge's gated MLP adapter, replacing CLIP; trained with UNet LoRA (adapters/lavi_bridge.py)
    ella         ELLA's timestep-aware resampler, replacing CLIP (adapters/ella.py)

Every connector is a diffusers ``ModelMixin``: ``save_pretrained(dir)`` writes ``config.json`` (with its class
name) and safetensors; :func:`load_connector` reads any of them back without the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm4gen.adapters.cross_adapter import CrossAdapter
from llm4gen.adapters.ella import TimestepAwareConnector
from llm4gen.adapters.lavi_bridge import LaViBridgeAdapter
from llm4gen.adapters.mlp import MLPConnector
from llm4gen.configs.choices import KINDS_WITH_CLIP

CONNECTORS = {"cam": CrossAdapter, "mlp": MLPConnector, "lavi_bridge": LaViBridgeAdapter,
              "ella": TimestepAwareConnector}
KIND_OF_CLASS = {cls.__name__: kind for kind, cls in CONNECTORS.items()}


def default_with_clip(kind: str) -> bool:
    """Whether a kind keeps CLIP's tokens in the context unless told otherwise (as each was published)."""
    return kind in KINDS_WITH_CLIP


def build_connector(acfg, clip_dim: int, llm_dim: int):
    """A new connector of ``acfg.kind`` (``model.adapter``) between the given widths."""
    kind = acfg.kind
    common = dict(clip_dim=clip_dim, llm_dim=llm_dim, llm_scale=acfg.llm_scale, use_llm_mask=acfg.use_llm_mask)
    if kind == "cam":
        return CrossAdapter(num_heads=acfg.num_heads, num_blocks=acfg.num_blocks, ffn_mult=acfg.ffn_mult, **common)
    with_clip = acfg.with_clip
    common["with_clip"] = default_with_clip(kind) if with_clip is None else bool(with_clip)
    if kind in ("mlp", "lavi_bridge"):
        return CONNECTORS[kind](hidden_dim=acfg.hidden_dim, **common)
    if kind == "ella":
        ella = acfg.ella
        return TimestepAwareConnector(width=ella.width, num_blocks=ella.num_blocks, num_heads=ella.num_heads,
                                      num_latents=ella.num_latents, time_channels=ella.time_channels, **common)
    raise ValueError(f"model.adapter.kind={kind!r}: expected one of {', '.join(CONNECTORS)}")


def saved_kind(directory: str | Path) -> str:
    """The kind of a connector folder written by ``save_pretrained``, from its config.json's class name."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no config.json: not a connector saved with save_pretrained")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in KIND_OF_CLASS:
        raise ValueError(f"{config} is a {name!r}, not a connector; known: {', '.join(KIND_OF_CLASS)}")
    return KIND_OF_CLASS[name]


def load_connector(directory: str | Path):
    """Any connector saved with ``save_pretrained``, as its own class."""
    return CONNECTORS[saved_kind(directory)].from_pretrained(directory)
