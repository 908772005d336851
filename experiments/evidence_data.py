"""The evidence experiment's data step (rendered shards, every caption checked against the LLM's max_length,
the feature cache), its text-feature probe, and the UNet's attention share on the connector's tokens."""

from __future__ import annotations

import json
from pathlib import Path

from llm4gen.datamodules.shards import iter_tar_samples
from llm4gen.datamodules.synthetic import ensure_synthetic_shards
from llm4gen.encoders.sources import load_pretrained
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.experiments.evidence_protocol import PROTOCOL_SETTINGS, Protocol
from llm4gen.experiments.evidence_tasks import Task
from llm4gen.experiments.probes import (
    ProbeSplits,
    layer_sweep,
    llm_attention_share,
    load_encoders,
)
from llm4gen.experiments.runner import ExperimentError
from llm4gen.launch.sweep import (
    load_experiment_config,
)
from llm4gen.tools.feature_cache import run_cache


# ---------------------------------------------------------------- the data step


def write_data(spec, protocol: Protocol = PROTOCOL_SETTINGS, log=print) -> Path:
    """The rendered shards (``<output_root>/data``), every caption checked against the LLM's max_length,
    and the feature cache the runs train on (``data.shards`` of the experiment config)."""
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    raw = spec.output_root / "data"
    shards = ensure_synthetic_shards(str(raw), num_samples=protocol.data_samples,
                                     samples_per_shard=protocol.samples_per_shard, resolution=cfg.data.resolution,
                                     seed=protocol.data_seed, verbose_share=protocol.verbose_share)
    longest, truncated = caption_lengths(cfg, shards, protocol)
    if truncated:
        raise ExperimentError(f"{truncated} captions are longer than model.llm.max_length={cfg.model.llm.max_length} "
                              f"LLM tokens (the longest: {longest}); the protocol lets the LLM see every caption whole: "
                              f"raise model.llm.max_length in {spec.config}")
    log(f"data: {len(shards)} shards in {raw}; the longest caption is {longest} LLM tokens "
        f"(max_length {cfg.model.llm.max_length}): none truncated")
    run_cache(cfg, str(raw), str(cfg.data.shards), fields=list(cfg.data.precomputed_keys), cache_dtype="float32",
              log=log)
    return Path(cfg.data.shards)


def caption_lengths(cfg, shards: list[str], protocol: Protocol = PROTOCOL_SETTINGS) -> tuple[int, int]:
    """(the longest caption in LLM tokens, how many exceed max_length) over the training shards and every
    evaluation prompt (of the protocol's scene draw)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, cfg.model.llm.tokenizer or cfg.model.llm.pretrained,
                                "model.llm.tokenizer")
    captions = [r.text for name in protocol.sets
                for r in prompt_set(name, protocol.set_size(name), draw=protocol.scene_draw)]
    for shard in shards:
        captions += [sample["txt"].decode() for sample in iter_tar_samples(shard) if "txt" in sample]
    lengths = [len(ids) for ids in tokenizer([cfg.model.llm.prefix + c for c in captions]).input_ids]
    return max(lengths), sum(n > cfg.model.llm.max_length for n in lengths)


# ---------------------------------------------------------------- probe and attention


def run_probe(spec, path: Path, log=print) -> dict:
    """The protocol's layer probe (llm4gen.experiments.probes: 3000 / 500 / 500 captions over every pair, every
    phrasing) at the experiment's LLM settings, written once to ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    cfg = load_experiment_config(spec.config, spec.base_overrides)
    _, llm = load_encoders(cfg.model.base.pretrained, cfg.model.llm.pretrained, cfg.model.llm.max_length)
    choice = layer_sweep(llm, ProbeSplits.make(3000, 500, 500, seed=0))
    result = {"layer": choice.layer, "configured_layer": cfg.model.llm.layer, "validation": {str(k): v for k, v in choice.validation.items()},
              "test": choice.test}
    if choice.layer != cfg.model.llm.layer:
        log(f"warning: the probe now picks layer {choice.layer!r}, the config reads {cfg.model.llm.layer!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log(f"probe: layer {choice.layer!r}, own colour on the test split {choice.test['all']['own']:.3f} "
        f"(short phrasings {choice.test['short']['own']:.3f}, verbose {choice.test['verbose']['own']:.3f})")
    return result


CONNECTOR_ARMS = ("c", "d", "e", "c_gated", "d_gated")


def attention_shares(tasks: list[Task]) -> dict[str, dict[str, float]]:
    """Per connector arm, the mean over seeds of where the UNet's cross-attention goes on verbose_2 (with the
    EMA weights the arm is evaluated with): CLIP's tokens, the connector's real tokens, LLM padding
    (lightning_modules/attention_split.py)."""
    prompts = [r.text for r in prompt_set("verbose_2")]
    shares: dict[str, list] = {}
    for task in tasks:
        if task.arm in CONNECTOR_ARMS and task.checkpoint:
            shares.setdefault(task.arm, []).append(llm_attention_share(task.checkpoint, prompts))
    return {arm: {part: sum(getattr(s, part) for s in splits) / len(splits) for part in ("clip", "llm", "padding")}
            for arm, splits in shares.items()}


