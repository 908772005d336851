"""A checkpoint written before the redesign (tests/fixtures/pre_redesign, by commit 0e9f67c) still loads: it
samples the image the old code sampled from it, and a run resumed from it reaches the weights the old code's
uninterrupted run reached, bitwise (the checkpoint format and the training step are unchanged)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm4gen.cli import train
from llm4gen.lightning_modules.sampler import load_checkpoint_module

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"
THREADS = 2  # the fixtures were written with torch's 2 threads (the suite's, tests/conftest.py)


@pytest.fixture(autouse=True)
def fixture_threads():
    """Float sums depend on the thread count: compare at the count the fixtures were made with."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def test_an_old_checkpoint_samples_what_the_old_code_sampled():
    module = load_checkpoint_module(FIXTURES / "step2.ckpt")
    assert module.cfg.adapter.kind == "cam"  # the schema default fills the key the old checkpoint lacks
    with module.ema_weights():
        image = module.generate(["a red circle and a blue square"], seeds=[0], num_inference_steps=3,
                                guidance_scale=4.0, output_type="np")
    np.testing.assert_allclose(np.asarray(image, dtype=np.float32), np.load(FIXTURES / "reference.npy"), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_run_resumed_from_an_old_checkpoint_reaches_the_old_uninterrupted_weights(tmp_path):
    out = tmp_path / "run"
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}", "trainer.max_steps=3",
                       "validation.every_n_steps=0", "validation.at_start=false", "model.ema.enabled=true",
                       "checkpoint.every_n_steps=2", "model.objective.lambda_entity=0.1",
                       f"resume={FIXTURES / 'step2.ckpt'}"]) == 0
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    expected = load_file(FIXTURES / "step3_weights.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
