"""Value checks of a merged config, run by ``configs.schema.load_config`` right after the type checks and
before anything loads: ranges of counts, sizes and probabilities, settings that must agree with the
models' own configs (read from their small JSON files, never their weights), and ``trainer.*`` values
against the annotations of Lightning's ``Trainer``.

Each check raises ``ConfigError`` naming the key, the bad value, why it is wrong and what would do.
Importing this module imports neither torch nor Lightning; the Trainer check imports Lightning when it runs.
"""

from __future__ import annotations

import datetime
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from llm4gen.configs import choices
from llm4gen.configs.buckets import bucket_sizes, buckets_enabled, default_step
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.model_files import llm_layer_count, llm_length_limit, model_json, unet_cross_attention_sides


def _at_least(minimum: int | float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= minimum), f"expected a number >= {minimum}"


def _above(minimum: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > minimum), f"expected a number > {minimum}"


_SHARE = ((lambda v: 0.0 <= v < 1.0), "expected a probability in [0, 1)")


_POSITIVE = _at_least(1)


_NON_NEGATIVE = _at_least(0)


# dotted key -> (predicate, what would be right); None values are allowed where the schema says Optional.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": ((lambda v: 0 <= v < 2**32), "expected an integer in [0, 2**32)"),
    "model.llm.max_length": _POSITIVE,
    "model.base.clip_chunks": _POSITIVE,
    "model.adapter.num_heads": _POSITIVE,
    "model.optim.max_nonfinite_steps": _POSITIVE,
    "model.adapter.num_blocks": _POSITIVE,
    "model.adapter.ffn_mult": _POSITIVE,
    "model.adapter.llm_scale": _above(0.0),
    "model.adapter.hidden_dim": _POSITIVE,
    "model.adapter.ella.num_latents": _POSITIVE,
    "model.adapter.ella.num_blocks": _POSITIVE,
    "model.adapter.ella.width": _POSITIVE,
    "model.adapter.ella.num_heads": _POSITIVE,
    "model.adapter.ella.time_channels": _POSITIVE,
    "model.lora.rank": _POSITIVE,
    "model.lora.alpha": _above(0.0),
    "model.lora.dropout": _SHARE,
    "model.objective.caption_dropout": _SHARE,
    "model.objective.min_snr_gamma": _above(0.0),
    "model.objective.noise_offset": _NON_NEGATIVE,
    "model.objective.lambda_entity": _NON_NEGATIVE,
    "model.objective.entity_negative_weight": _NON_NEGATIVE,
    "model.optim.lr": _above(0.0),
    "model.optim.weight_decay": _NON_NEGATIVE,
    "model.optim.eps": _above(0.0),
    "model.optim.warmup_steps": _NON_NEGATIVE,
    "model.optim.unet_lr": _above(0.0),
    "model.optim.unet_weight_decay": _NON_NEGATIVE,
    "model.optim.unet_start_step": _NON_NEGATIVE,
    "model.ema.decay": _SHARE,
    "model.ema.update_after_step": _NON_NEGATIVE,
    "data.batch_size": _POSITIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.resolution": _POSITIVE,
    "data.shuffle_buffer": _NON_NEGATIVE,
    "data.epoch_batches": _POSITIVE,
    "data.prefetch_factor": _POSITIVE,
    "data.buckets.step": _POSITIVE,
    "data.buckets.min_aspect": ((lambda v: 0.0 < v <= 1.0), "expected a width/height ratio in (0, 1] (1: only the square)"),
    "data.buckets.max_aspect": ((lambda v: v >= 1.0), "expected a width/height ratio >= 1 (1: only the square)"),
    "model.performance.peak_tflops": _above(0.0),
    "validation.every_n_steps": (_NON_NEGATIVE[0], "expected a number of steps >= 0 (0 turns validation off)"),
    "validation.num_inference_steps": _POSITIVE,
    "validation.guidance_scale": _NON_NEGATIVE,
    "checkpoint.every_n_steps": (_NON_NEGATIVE[0], "expected a number of steps >= 0 (0: only at the end)"),
    "checkpoint.keep_last": ((lambda v: v >= 1 or v == -1), "expected a count >= 1, or -1 to keep all"),
}


def check_range(key: str, value: Any) -> None:
    """``value`` of the dotted ``key`` within its range (``RANGES``); the constructors that take such a value
    outside a config call this too, so both say the same."""
    ok, right = RANGES[key]
    if value is not None and not ok(value):
        raise ConfigError(f"config key {key!r} is {value!r}: {right}.")


def check_ranges(cfg: DictConfig) -> None:
    for key in RANGES:
        check_range(key, OmegaConf.select(cfg, key))
    betas = list(cfg.model.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"config key 'model.optim.betas' is {betas!r}: expected two numbers in [0, 1), "
                          f"e.g. [0.9, 0.999].")
    if not cfg.data.caption_keys:
        raise ConfigError("config key 'data.caption_keys' is []: expected at least one caption key, e.g. [txt].")
    if not cfg.validation.prompts and cfg.validation.every_n_steps > 0:
        raise ConfigError("config key 'validation.prompts' is []: give at least one prompt, or set "
                          "validation.every_n_steps=0 to turn validation off.")


def entity_layer_sides(text: str) -> str | list[int]:
    """``model.objective.entity_layers``: 'lowest' | 'all' | comma-separated feature-map sides ('16,32')."""
    text = str(text)
    if text in choices.ENTITY_LAYER_PRESETS:
        return text
    try:
        sides = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sides = []
    if not sides or min(sides) < 1:
        raise ConfigError(f"config key 'model.objective.entity_layers' is {text!r}: expected lowest, all or "
                          f"comma-separated feature-map sides such as 16,32.")
    return sides


def check_buckets(cfg: DictConfig) -> None:
    """``data.buckets``: a known mode, and a range and step that leave at least one bucket."""
    buckets = cfg.data.buckets
    if str(buckets.enabled).strip().lower() not in choices.BUCKET_MODES:
        raise ConfigError(f"config key 'data.buckets.enabled' is {buckets.enabled!r}: expected one of "
                          f"{', '.join(choices.BUCKET_MODES)} (auto: on for SDXL).")
    try:
        bucket_sizes(cfg.data.resolution, buckets.step, buckets.min_aspect, buckets.max_aspect)
    except ValueError as error:
        raise ConfigError(f"config key 'data.buckets' ({OmegaConf.to_container(buckets)}): {error}.") from None


def check_llm_layer(layer: Any) -> None:
    """``model.llm.layer``: an integer index, 'penultimate' or 'mean' (its range is checked against the model)."""
    if isinstance(layer, bool) or not (isinstance(layer, int) or layer in choices.LLM_LAYER_NAMES):
        raise ConfigError(f"config key 'model.llm.layer' is {layer!r}: expected an index into the LLM's hidden "
                          f"states (0: the embeddings, -1: the last layer) or one of "
                          f"{', '.join(map(repr, choices.LLM_LAYER_NAMES))}.")


def check_choices(cfg: DictConfig) -> None:
    entity_layer_sides(cfg.model.objective.entity_layers)
    check_llm_layer(cfg.model.llm.layer)
    if str(cfg.model.llm.layer_norm).strip().lower() not in choices.SWITCHES:
        raise ConfigError(f"config key 'model.llm.layer_norm' is {cfg.model.llm.layer_norm!r}: expected one of "
                          f"{', '.join(choices.SWITCHES)} (auto: on for a non-final layer of a decoder or T5).")
    if cfg.model.base.clip_chunks > 1 and cfg.model.objective.lambda_entity > 0:
        raise ConfigError(f"model.base.clip_chunks={cfg.model.base.clip_chunks} with model.objective.lambda_entity > 0: "
                          f"the entity loss aligns words to one 77-token CLIP window; set model.base.clip_chunks=1 "
                          f"or model.objective.lambda_entity=0")
    if cfg.model.optim.unet_start_step > 0 and cfg.model.unet_training == "frozen":
        raise ConfigError(f"model.optim.unet_start_step={cfg.model.optim.unet_start_step} with model.unet_training=frozen: "
                          f"the UNet never trains, so it cannot join at a step; set model.unet_training=full (or lora), "
                          f"or model.optim.unet_start_step=0")
    if not cfg.model.adapter.enabled and cfg.model.unet_training == "frozen":
        raise ConfigError("model.adapter.enabled=false with model.unet_training=frozen leaves nothing to train; "
                          "set model.unet_training=full (or lora) to fine-tune the UNet on CLIP alone, or "
                          "model.adapter.enabled=true")
    if not cfg.model.adapter.enabled and cfg.model.objective.lambda_entity > 0:
        raise ConfigError("model.objective.lambda_entity > 0 needs the CAM (its targets include the fused LLM "
                          "tokens); set model.adapter.enabled=true or model.objective.lambda_entity=0")
    check_caption_mix(cfg)
    check_connector(cfg)
    check_llm_lora(cfg)
    check_sharding(cfg)
    check_buckets(cfg)
    resume = str(cfg.resume)
    if resume not in choices.RESUME_MODES and not resume.strip():
        raise ConfigError("config key 'resume' is empty: expected auto, never or a checkpoint path.")
    window = list(cfg.model.objective.entity_timesteps)
    if len(window) != 2 or window[0] < 0 or window[0] >= window[1]:
        raise ConfigError(f"config key 'model.objective.entity_timesteps' is {window!r}: expected a window "
                          f"[low, high) with 0 <= low < high, e.g. [0, 1000].")


def check_caption_mix(cfg: DictConfig) -> None:
    """``data.caption_mix``: member keys (or ``member:field`` of a json member) with finite weights >= 0, some above
    0, whose cached members' names (``choices.caption_tag``) do not collide."""
    mix = OmegaConf.to_container(cfg.data.caption_mix)
    if not mix:
        return
    example = "e.g. data.caption_mix={dense.txt: 0.5, txt: 0.5}"
    for key, weight in mix.items():
        member, _, field = str(key).partition(":")
        if not member.strip() or key != key.strip() or member.startswith(("_", ".")) or "/" in member \
                or (":" in key and not field):
            raise ConfigError(f"config key 'data.caption_mix' has the key {key!r}: expected a sample member such as "
                              f"txt or dense.txt, or member:field of a json member such as json:caption ({example}).")
        if not (weight >= 0 and weight != float("inf")):
            raise ConfigError(f"config key 'data.caption_mix' gives {key!r} the weight {weight!r}: expected a finite "
                              f"number >= 0 (0 keeps a key cached but never drawn; {example}).")
    if sum(mix.values()) <= 0:
        raise ConfigError(f"config key 'data.caption_mix' is {mix}: every weight is 0, so no caption could be drawn; "
                          f"give at least one key a weight above 0 ({example}), or set data.caption_mix={{}} to read "
                          f"data.caption_keys.")
    tags: dict[str, str] = {}
    for key in mix:
        tag = choices.caption_tag(key)
        if tag in tags:
            raise ConfigError(f"config key 'data.caption_mix' names {tags[tag]!r} and {key!r}, whose cached features "
                              f"would share one member name ({tag}); rename one of the members.")
        tags[tag] = key


def check_llm_lora(cfg: DictConfig) -> None:
    """``model.llm.lora_rank``: a LoRA rank >= 0, and with it no cached LLM features."""
    llm = cfg.model.llm
    if llm.lora_rank < 0:
        raise ConfigError(f"config key 'model.llm.lora_rank' is {llm.lora_rank}: expected 0 (a frozen LLM) or a "
                          f"LoRA rank such as 8.")
    if llm.lora_rank > 0 and "llm_features" in cfg.data.precomputed_keys:
        raise ConfigError(f"model.llm.lora_rank={llm.lora_rank} trains LoRA in the LLM, so its features change every "
                          f"step and cached ones would be stale: drop llm_features from data.precomputed_keys (the "
                          f"latents can stay cached), or set model.llm.lora_rank=0.")


def starts_with_clip(kind: str, with_clip) -> bool:
    """Whether a connector's context begins with CLIP's tokens (adapters/connectors.py's per-kind default)."""
    return kind in choices.KINDS_WITH_CLIP if with_clip is None else bool(with_clip)


SHARDED = "fsdp2"  # trainer.strategy of sharded data parallel (lightning_modules/sharding.py)


SHARDED_PRECISIONS = ("32-true", "32", "bf16-mixed")


def check_sharding(cfg: DictConfig) -> None:
    """``trainer.strategy: fsdp2`` where sharding pays: a UNet that trains (full or LoRA) and a frozen LLM."""
    trainer = cfg.trainer
    if trainer.get("strategy") != SHARDED:
        return
    if cfg.model.unet_training == "frozen":
        raise ConfigError("trainer.strategy=fsdp2 with model.unet_training=frozen: what trains (the connector) is "
                          "small enough to keep whole on every GPU, so sharding saves nothing and costs a gather "
                          "per block; use trainer.strategy=ddp (the default), or train the UNet "
                          "(model.unet_training=full or lora)")
    if cfg.model.llm.lora_rank > 0:
        raise ConfigError(f"trainer.strategy=fsdp2 with model.llm.lora_rank={cfg.model.llm.lora_rank}: the LLM's LoRA "
                          f"is not sharded; use trainer.strategy=ddp, or model.llm.lora_rank=0")
    precision = str(trainer.get("precision", "32-true"))
    if precision not in SHARDED_PRECISIONS:
        raise ConfigError(f"trainer.strategy=fsdp2 with trainer.precision={precision!r}: the sharded strategy runs "
                          f"fp32 (32-true) or bf16 compute with fp32 masters and reduction (bf16-mixed)")


def check_connector(cfg: DictConfig) -> None:
    """The connector's settings fit its kind (adapters/connectors.py): the CAM fuses into CLIP's tokens, so it
    keeps them; ELLA's queries have no word positions for the entity loss; ELLA's heads divide its width."""
    adapter = cfg.model.adapter
    kind = adapter.kind
    if kind == "cam" and adapter.with_clip is False:
        raise ConfigError("model.adapter.with_clip=false with model.adapter.kind=cam: the CAM's output is CLIP's "
                          "tokens followed by the fused LLM tokens; use kind=mlp or lavi_bridge for an LLM-only context")
    if kind == "ella" and adapter.enabled and cfg.model.objective.lambda_entity > 0:
        raise ConfigError(f"model.objective.lambda_entity={cfg.model.objective.lambda_entity} with "
                          f"model.adapter.kind=ella: ELLA's context is {adapter.ella.num_latents} learned queries, "
                          f"which have no word positions to align the entity loss to; set "
                          f"model.objective.lambda_entity=0 (or train kind=cam, mlp or lavi_bridge)")
    if adapter.fusion == "gated" and adapter.enabled and not starts_with_clip(kind, adapter.with_clip):
        raise ConfigError(f"model.adapter.fusion=gated with model.adapter.kind={kind} and with_clip="
                          f"{adapter.with_clip}: the gated fusion adds the connector's attention to the base's own "
                          f"over CLIP's tokens, and this context has none; set model.adapter.with_clip=true or "
                          f"model.adapter.fusion=concat")
    if adapter.fusion == "gated" and adapter.init_from and not Path(adapter.init_from).is_dir():
        raise ConfigError(f"model.adapter.fusion=gated with model.adapter.init_from={adapter.init_from!r}: the "
                          f"released projector.pth holds a CAM for the concatenated context and no gated layers; "
                          f"use fusion=concat to load it")
    if kind == "ella" and adapter.ella.width % adapter.ella.num_heads:
        raise ConfigError(f"config key 'model.adapter.ella.num_heads' is {adapter.ella.num_heads}, which does not "
                          f"divide model.adapter.ella.width={adapter.ella.width}")
    saved_config = Path(adapter.init_from) / "config.json" if adapter.init_from else None
    if saved_config is not None and saved_config.is_file():
        saved = json.loads(saved_config.read_text()).get("_class_name")
        expected = choices.CONNECTOR_CLASS_NAMES[kind]
        if saved != expected:
            kinds = {name: k for k, name in choices.CONNECTOR_CLASS_NAMES.items()}
            hint = f"model.adapter.kind={kinds[saved]}" if saved in kinds else "a folder saved from a connector"
            raise ConfigError(f"model.adapter.init_from={adapter.init_from!r} holds a {saved}, but model.adapter.kind="
                              f"{kind} builds a {expected}; use {hint}")


def check_against_models(cfg: DictConfig) -> None:
    """Settings that must agree with the models: CAM heads divide the CLIP width, the resolution is a
    multiple of the VAE's downsampling, max_length fits the LLM, the entity timestep window fits the
    noise schedule. A model whose config is not on this machine (an uncached hub id) is not checked."""
    base, llm, adapter = cfg.model.base, cfg.model.llm, cfg.model.adapter
    # The CAM works at the UNet's context width: CLIP's width for SD1.5, both CLIP encoders' for SDXL.
    unet = model_json(base.pretrained, "unet/config.json", base.revision)
    width = unet.get("cross_attention_dim") if unet else None
    if adapter.kind == "cam" and isinstance(width, int) and not (adapter.init_from and Path(adapter.init_from).is_dir()):
        if width % adapter.num_heads:
            divisors = [d for d in range(1, min(width, 32) + 1) if width % d == 0]
            raise ConfigError(f"config key 'model.adapter.num_heads' is {adapter.num_heads}: the CAM's width is the "
                              f"CLIP width of {base.pretrained} ({width}), which {adapter.num_heads} heads do not "
                              f"divide; choose a divisor such as {', '.join(map(str, divisors[-4:]))}.")
    sides = entity_layer_sides(cfg.model.objective.entity_layers)
    available = unet_cross_attention_sides(unet) if unet else []
    if cfg.model.objective.lambda_entity > 0 and isinstance(sides, list) and available \
            and set(sides) - set(available):
        raise ConfigError(f"config key 'model.objective.entity_layers' is {cfg.model.objective.entity_layers!r}: the "
                          f"UNet of {base.pretrained} has no cross-attention layer with feature-map side "
                          f"{', '.join(map(str, sorted(set(sides) - set(available))))}; its cross-attention maps have "
                          f"sides {', '.join(map(str, available))} (at its sample_size {unet['sample_size']}): pick "
                          f"among those, or use lowest or all.")
    vae = model_json(base.pretrained, "vae/config.json", base.revision)
    if vae and isinstance(vae.get("block_out_channels"), list):
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if cfg.data.resolution % factor:
            lower = max(factor, cfg.data.resolution // factor * factor)
            raise ConfigError(f"config key 'data.resolution' is {cfg.data.resolution}: the VAE of {base.pretrained} "
                              f"downsamples by {factor}, so the resolution must be a multiple of {factor} "
                              f"(e.g. {lower} or {lower + factor}).")
    unet_levels = len(unet.get("down_block_types") or ()) if unet else 0
    if vae and isinstance(vae.get("block_out_channels"), list) and unet_levels:
        step = cfg.data.buckets.step or default_step(cfg.data.resolution)
        multiple = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (unet_levels - 1)
        if buckets_enabled(cfg.data.buckets.enabled, base.family) and step % multiple:
            raise ConfigError(f"config key 'data.buckets.step' is {step}: {base.pretrained} downsamples images by "
                              f"{multiple} (VAE x UNet), so bucket sides must be multiples of {multiple}; use "
                              f"a step of {max(multiple, step // multiple * multiple)} or {step // multiple * multiple + multiple}.")
    scheduler = model_json(base.pretrained, "scheduler/scheduler_config.json", base.revision)
    if scheduler and isinstance(scheduler.get("num_train_timesteps"), int):
        steps = scheduler["num_train_timesteps"]
        low, high = cfg.model.objective.entity_timesteps
        if high > steps:
            raise ConfigError(f"config key 'model.objective.entity_timesteps' is [{low}, {high}]: the noise schedule "
                              f"of {base.pretrained} has timesteps 0..{steps - 1}, so the window must lie within "
                              f"[0, {steps}].")
    llm_config = model_json(llm.pretrained, "config.json", llm.revision)
    layers = llm_layer_count(llm_config) if llm_config else None
    if layers is not None and isinstance(llm.layer, int) and not -(layers + 1) <= llm.layer <= layers:
        raise ConfigError(f"config key 'model.llm.layer' is {llm.layer}: {llm.pretrained} has {layers} layers "
                          f"({layers + 1} hidden states, the embeddings first); use an index in "
                          f"[{-(layers + 1)}, {layers}], 'penultimate' or 'mean'.")
    tokenizer_config = model_json(llm.tokenizer or llm.pretrained, "tokenizer_config.json", llm.revision)
    limit = llm_length_limit(llm_config, tokenizer_config)
    if limit and llm.max_length > limit[0]:
        raise ConfigError(f"config key 'model.llm.max_length' is {llm.max_length}: {llm.pretrained} takes at most "
                          f"{limit[0]} tokens ({limit[1]}); use a max_length <= {limit[0]}.")


def check_scheduler_name(name: str, what: str) -> None:
    """``name`` is a diffusers scheduler class (imports diffusers, so it runs after the cheap checks)."""
    import diffusers

    schedulers = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
    if name not in schedulers:
        close = difflib.get_close_matches(name, schedulers, n=3) or ["DDIMScheduler", "EulerDiscreteScheduler"]
        raise ConfigError(f"{what} is {name!r}, which is not a diffusers scheduler class; closest valid: "
                          f"{', '.join(close)}.")


def _matches(value: Any, annotation: Any) -> bool:
    """Does a config value (YAML scalar, list or mapping) fit a type annotation of Trainer.__init__?"""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (datetime.timedelta,):
        return False  # a timedelta cannot come from YAML; the str / dict arms take it
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not understand is not held against the value


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [c for arm in typing.get_args(annotation) for c in _literals(arm)]


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    return text.replace("<class '", "").replace("'>", "")


def trainer_annotations() -> dict[str, Any]:
    from lightning import Trainer

    return typing.get_type_hints(Trainer.__init__)


def check_trainer_values(trainer_args: dict) -> None:
    if isinstance(trainer_args, DictConfig):
        trainer_args = OmegaConf.to_container(trainer_args, resolve=True)
    hints = trainer_annotations()
    for key, value in trainer_args.items():
        annotation = hints.get(key)
        if annotation is None or _matches(value, annotation):
            continue
        literals = [c for c in _literals(annotation) if isinstance(c, str)]
        if literals and isinstance(value, str):
            close = difflib.get_close_matches(value, literals, n=3, cutoff=0.4) or literals[:6]
            right = f"closest valid values: {', '.join(map(repr, close))}"
        else:
            right = f"Lightning's Trainer takes {_describe(annotation)} here"
        raise ConfigError(f"config key 'trainer.{key}' is {value!r}, which is not a valid value for "
                          f"Trainer({key}=...); {right}.")
