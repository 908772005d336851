"""A checkpoint written before the redesign (tests/fixtures/pre_redesign, by commit 0e9f67c) still loads: it
samples the image the old code sampled from it, and a run resumed from it reaches the weights the old code's
uninterrupted run reached (the checkpoint format and the training step are unchanged). Both within the
tolerances of tests/helpers/fixtures.py: the fixtures were written on another CPU, whose floats differ at
the 1e-9 level; the resumed run shows that a real change (twice the learning rate) would exceed its tolerance.
Old checkpoints recorded ``use_llm_mask: false``: they keep the unmasked context they trained with."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm4gen.cli import train
from llm4gen.lightning_modules.sampler import load_checkpoint_module
from tests.helpers.fixtures import FIXTURES as ALL_FIXTURES
from tests.helpers.fixtures import TOLERANCES, tolerance

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"
THREADS = 2  # the fixtures were written with torch's 2 threads (the suite's, tests/conftest.py)


@pytest.fixture(autouse=True)
def fixture_threads():
    """Float sums depend on the thread count: compare at the count the fixtures were made with."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.float_sensitive
def test_an_old_checkpoint_samples_what_the_old_code_sampled():
    module = load_checkpoint_module(FIXTURES / "step2.ckpt")
    assert module.cfg.adapter.kind == "cam"  # the schema default fills the key the old checkpoint lacks
    assert module.cfg.adapter.use_llm_mask is False and module.fusion is None  # as it trained
    with module.ema_weights():
        image = module.generate(["a red circle and a blue square"], seeds=[0], num_inference_steps=3,
                                guidance_scale=4.0, output_type="np")
    np.testing.assert_allclose(np.asarray(image, dtype=np.float32), np.load(FIXTURES / "reference.npy"),
                               atol=tolerance("pre_redesign/reference.npy"), rtol=0)


def resume_from_the_old_checkpoint(tmp_path: Path, name: str, steps: int = 3) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'data'}", f"trainer.max_steps={steps}",
                       "validation.every_n_steps=0", "validation.at_start=false", "model.ema.enabled=true",
                       "checkpoint.every_n_steps=2", "model.objective.lambda_entity=0.1",
                       "model.adapter.use_llm_mask=false",  # the old code's context, recorded in the checkpoint
                       f"resume={FIXTURES / 'step2.ckpt'}"]) == 0
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_a_run_resumed_from_an_old_checkpoint_reaches_the_old_uninterrupted_weights(tmp_path):
    expected = load_file(FIXTURES / "step3_weights.safetensors")
    allowed = tolerance("pre_redesign/step3_weights.safetensors")
    assert max_difference(resume_from_the_old_checkpoint(tmp_path, "run"), expected) <= allowed
    # the tolerance would catch a real change: one optimizer step more lands far outside it
    assert max_difference(resume_from_the_old_checkpoint(tmp_path, "longer", steps=4), expected) > 5 * allowed


def test_every_stored_fixture_has_a_tolerance_and_nothing_else_is_stored():
    stored = {p.relative_to(ALL_FIXTURES).as_posix() for p in ALL_FIXTURES.rglob("*") if p.is_file() and p.suffix != ".md"}
    compared = {name for name in stored if not name.endswith(".ckpt")}  # a checkpoint is loaded, not compared
    assert compared == set(TOLERANCES)
    assert all(0 < limit < 1e-4 and why for limit, why in TOLERANCES.values())
