"""One sampling path and one LLM reader: a training step, a validation grid, generate.py and an exported pipeline
all read prompts through ``LLMEncoder`` (encoders/llm.py), and every image with a connector is conditioned by
``LLMConditioning.connector_context`` (pipelines/llm4gen_pipeline.py), inside the LLM4Gen pipeline's own call.

Spies wrap the two functions (the wrapped code still runs) and count who called them."""

from __future__ import annotations

import pytest

from llm4gen.cli import export, generate, train
from llm4gen.encoders.llm import LLMEncoder
from llm4gen.pipelines.llm4gen_pipeline import LLMConditioning
from tests.helpers.training import FAST

pytestmark = pytest.mark.slow


@pytest.fixture
def spies(monkeypatch):
    """Counts of calls to the LLM reader and to the one conditioning function since the fixture started."""
    counts = {"llm_reader": 0, "connector_context": 0}
    read, condition = LLMEncoder._features, LLMConditioning.connector_context

    def reading(self, *args, **kwargs):
        counts["llm_reader"] += 1
        return read(self, *args, **kwargs)

    def conditioning(self, *args, **kwargs):
        counts["connector_context"] += 1
        return condition(self, *args, **kwargs)

    monkeypatch.setattr(LLMEncoder, "_features", reading)
    monkeypatch.setattr(LLMConditioning, "connector_context", conditioning)
    return counts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-path") / "run"
    assert train.main([f"output_dir={out}", f"data.shards={out.parent / 'data'}", "trainer.max_steps=1", *FAST,
                       "validation.at_start=false"]) == 0
    return out


def test_training_steps_and_validation_grids_go_through_the_reader_and_the_conditioning(tmp_path, spies):
    out = tmp_path / "run"
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}", "trainer.max_steps=2", *FAST,
                       "validation.at_start=false", "validation.every_n_steps=2", "validation.num_inference_steps=1",
                       "validation.prompts=[a red circle]", "validation.seen_prompts=[a blue square]"]) == 0
    assert (out / "samples" / "step_0000002.png").is_file()
    # online LLM features: two steps read their captions; the grid's two lists, their negatives: more reads
    assert spies["llm_reader"] >= 2 + 2
    assert spies["connector_context"] == 2  # the grid's two lists, each one pipeline call


def test_generate_py_samples_through_the_pipeline_call(run, tmp_path, spies):
    assert generate.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--prompt", "a red circle",
                          "--steps", "1", "--output-dir", str(tmp_path / "images")]) == 0
    assert spies["connector_context"] == 1 and spies["llm_reader"] >= 2  # the prompt and the negative prompt


def test_an_exported_pipeline_reads_with_the_same_reader_and_conditioning(run, tmp_path, spies):
    assert export.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "pipe")]) == 0
    before = dict(spies)
    assert generate.main(["--pipeline", str(tmp_path / "pipe"), "--prompt", "a red circle", "--steps", "1",
                          "--output-dir", str(tmp_path / "images")]) == 0
    assert spies["connector_context"] - before["connector_context"] == 1
    assert spies["llm_reader"] - before["llm_reader"] == 2  # the pipeline's own prompt and negative prompt
