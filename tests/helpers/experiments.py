"""The evidence experiment's config and protocol shrunk for end-to-end tests on the tiny model."""

from __future__ import annotations

from pathlib import Path

from llm4gen.experiments.evidence_protocol import Protocol, ROOT

TINY_PROTOCOL = Protocol(data_samples=16, samples_per_shard=8, sampling_steps=1, eval_batch=4, prompts_per_set=2)


def tiny_experiment_config(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    """configs/shapes_evidence.yaml with its feature cache under ``tmp_path``, batch 4 and any further
    (old, new) ``replacements``, written to ``tmp_path/experiment.yaml``; every old text must occur."""
    text = (ROOT / "configs" / "shapes_evidence.yaml").read_text()
    for old, new in (("runs/shapes-evidence/cache", str(tmp_path / "cache")), ("  batch_size: 16", "  batch_size: 4"),
                     *replacements):
        assert old in text, f"configs/shapes_evidence.yaml no longer holds {old!r}"
        text = text.replace(old, new)
    config = tmp_path / "experiment.yaml"
    config.write_text(text)
    return config
