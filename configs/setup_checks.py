"""The refusals the parts' constructors make (the LightningModule, the encoders, the datamodule, the training
step's objective) wherever the config alone, or the models' small config files, decide them.

Each is a pure function over plain values that raises ``ConfigError``: ``load_config`` runs them over a config
before anything loads (:func:`check_setup`), and the constructors call the same functions as guards for use
outside a config (a notebook, a checkpoint's hyper-parameters), so the message a user sees cannot drift between
the two. What needs a built model stays in the constructors (tests/test_setup_refusals.py holds the list).
Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from llm4gen.configs import choices
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.model_files import model_json

# Prediction targets the diffusion objective implements (losses/diffusion.py).
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

# The attention's query and value projections of an LLM family (model_type), where its LoRA goes by default.
LLM_LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "umt5": ["q", "v"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"]}

# The keys of a T5-shaped config.json: a custom model_type with them is read as T5 (encoders/llm.py).
T5_SHAPE_KEYS = frozenset({"d_model", "num_heads", "num_layers", "d_kv"})


def check_full_unet_dtype(unet_training: str, dtype: str) -> None:
    """A UNet that trains whole keeps fp32 master weights: it is loaded in ``model.base.dtype``."""
    if unet_training == "full" and dtype != "float32":
        raise ConfigError(f"model.unet_training=full needs fp32 master weights, but model.base.dtype={dtype}; set "
                          f"model.base.dtype=float32 and train with bf16-mixed")


def check_data_stream(resampled: bool, epoch_batches: Optional[int], precomputed_keys: Sequence[str],
                      prefetch_factor: Optional[int], num_workers: int) -> None:
    """The ``data`` settings the stream needs to agree (datamodules/webdataset_datamodule.py)."""
    if resampled and epoch_batches is None:
        raise ConfigError("data.resampled=true draws shards forever: set data.epoch_batches (batches per epoch per "
                          "rank)")
    unknown = sorted(set(precomputed_keys) - set(choices.PRECOMPUTED_KEYS))
    if unknown:
        raise ConfigError(f"unknown data.precomputed_keys {unknown}; known: {sorted(choices.PRECOMPUTED_KEYS)}")
    if prefetch_factor is not None and (prefetch_factor < 1 or num_workers == 0):
        raise ConfigError(f"data.prefetch_factor={prefetch_factor} needs num_workers > 0 (got {num_workers}) and a "
                          f"value >= 1; batches are only prefetched by worker processes")


def check_shard_slots(num_shards: int, world_size: int, num_workers: int, epoch_batches: Optional[int],
                      resampled: bool) -> None:
    """Equal batch counts per rank (``epoch_batches``) over a fixed pass need a shard for every (rank, worker)."""
    slots = world_size * max(num_workers, 1)
    if epoch_batches is not None and not resampled and num_shards < slots:
        raise ConfigError(f"data.epoch_batches needs at least one shard per (rank, worker): {num_shards} shards for "
                          f"{world_size} ranks x {max(num_workers, 1)} workers; write smaller shards or use fewer "
                          f"workers")


def check_samples_per_rank(total: int, world_size: int, batch_size: int) -> None:
    """Several ranks share an epoch in equal full batches (datamodules/sample_slices.py): it must hold one per rank."""
    if world_size > 1 and total < world_size * batch_size:
        raise ConfigError(f"the shards hold {total} samples, fewer than one batch for each of the {world_size} ranks "
                          f"({world_size} x data.batch_size {batch_size} = {world_size * batch_size}): add data, use "
                          f"fewer GPUs or a smaller data.batch_size")


def check_context_width(context_dim: int, clip_width: int) -> None:
    """The UNet's cross-attention reads CLIP's hidden states (both encoders' for SDXL): the widths agree."""
    if context_dim != clip_width:
        raise ConfigError(f"UNet cross_attention_dim {context_dim} != CLIP width {clip_width}: model.base.pretrained "
                          f"is not a consistent Stable Diffusion folder")


def check_sdxl_unet(source: str, addition_embed_type: Any) -> None:
    """``model.base.family=sdxl`` conditions the UNet on the pooled embedding and time ids (``text_time``)."""
    if addition_embed_type != "text_time":
        raise ConfigError(f"model.base.family=sdxl but {source!r} has a UNet with addition_embed_type="
                          f"{addition_embed_type!r}, not 'text_time': is it an SD1.5 folder? Set model.base.family=sd15 "
                          f"for it, or point model.base.pretrained at an SDXL folder")


def check_prediction_type(kind: Any) -> None:
    """What the UNet is trained to predict must be one the diffusion objective implements."""
    if kind not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {kind!r} of the base model's scheduler is not supported; expected "
                          f"{' or '.join(map(repr, PREDICTION_TYPES))}")


def lora_targets_of(model_type: Any) -> list[str]:
    """The LLM family's query and value projections, for its LoRA when ``model.llm.lora_target_modules`` is []."""
    targets = LLM_LORA_TARGETS.get(model_type)
    if targets is None:
        raise ConfigError(f"no default LoRA targets for LLM model_type {model_type!r}; set "
                          f"model.llm.lora_target_modules (e.g. [q_proj, v_proj])")
    return targets


def is_t5_shaped(config: dict) -> bool:
    return T5_SHAPE_KEYS <= set(config)


def llm_model_type(pretrained: str, config: dict, trust_remote_code: bool, known_types) -> Any:
    """The model_type an LLM's config.json loads as (encoders/llm.py load_llm_config): its own where transformers
    knows it (``known_types``) or its code is trusted; T5 for a T5-shaped config of a custom type; otherwise
    refused, naming the way out."""
    model_type = config.get("model_type")
    if model_type in known_types or trust_remote_code:
        return model_type
    if is_t5_shaped(config):
        return "t5"
    raise ConfigError(unknown_llm_type_message(pretrained, model_type))


def connector_widths_message(init_from: str, found: tuple[int, int], needed: tuple[Any, Any]) -> str:
    """A trained connector between other widths than this config's models (preflight and the module's loader)."""
    return (f"config key 'model.adapter.init_from' is {init_from!r}, a connector between widths {found[0]} (UNet "
            f"context) and {found[1]} (LLM); this config's models need {needed[0]} and {needed[1]}. Was it trained "
            f"on another base model (model.base) or LLM (model.llm)?")


def unknown_llm_type_message(pretrained: str, model_type: Any) -> str:
    """An LLM config.json of a model_type transformers cannot build without the model's own code."""
    return (f"model.llm.pretrained={pretrained!r}: its config.json has model_type {model_type!r}, which transformers "
            f"does not know and which is not T5-shaped. Read its code and set model.llm.trust_remote_code=true, or "
            f"point at a standard checkpoint.")


def clip_width(base) -> Optional[int]:
    """The width of the context CLIP gives the UNet, from the text encoders' config files (SDXL: both, side by
    side); None when one is not on this machine."""
    parts = ["text_encoder"] + (["text_encoder_2"] if base.family == "sdxl" else [])
    widths = [(model_json(base.pretrained, f"{part}/config.json", base.revision) or {}).get("hidden_size")
              for part in parts]
    return sum(widths) if all(isinstance(w, int) for w in widths) else None


def check_setup(cfg: DictConfig) -> None:
    """What the parts' constructors would refuse, decided by the config and the models' config files (a model
    whose files are not on this machine is not checked)."""
    model, data = cfg.model, cfg.data
    check_full_unet_dtype(model.unet_training, model.base.dtype)
    check_data_stream(data.resampled, data.epoch_batches, list(data.precomputed_keys), data.prefetch_factor,
                      data.num_workers)
    base = model.base
    # The base's own UNet against its CLIP: a model.base.unet that does not fit the base is the preflight's
    # to name (check_base_unet says which family it belongs to).
    own_unet = model_json(base.pretrained, "unet/config.json", base.revision)
    width = clip_width(base)
    if own_unet and base.family == "sd15" and own_unet.get("addition_embed_type") == "text_time":
        raise ConfigError(f"model.base.family=sd15 but {base.pretrained!r} has an SDXL UNet (addition_embed_type="
                          f"'text_time', conditioned on a pooled embedding and time ids); set model.base.family=sdxl")
    if own_unet and isinstance(own_unet.get("cross_attention_dim"), int) and width is not None:
        check_context_width(own_unet["cross_attention_dim"], width)
    unet = (model_json(base.unet, "config.json") if base.unet else None) or own_unet  # the UNet that loads
    if unet and base.family == "sdxl":
        check_sdxl_unet(base.unet or base.pretrained, unet.get("addition_embed_type"))
    scheduler = model_json(base.pretrained, "scheduler/scheduler_config.json", base.revision)
    if scheduler:
        check_prediction_type(scheduler.get("prediction_type", "epsilon"))  # diffusers' default when unset
