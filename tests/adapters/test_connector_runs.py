"""train.py with each non-default connector kind and the gated fusion, end to end on the tiny model: a run interrupted after two
steps and resumed reaches the uninterrupted run's weights, optimizer and EMA bitwise; its export loads
back (any kind) and samples the same images as its checkpoint; the FLOP count runs the connector."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from llm4gen.cli import train
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.lightning_modules.flops import module_step_flops
from llm4gen.lightning_modules.sampler import load_checkpoint_module, load_exported_module
from tests.helpers.training import FAST

KINDS = {
    "mlp": [],
    "cam_gated": ["model.adapter.fusion=gated", "model.objective.lambda_entity=0.1"],
    "lavi_bridge": ["model.unet_training=lora", "model.lora.rank=4", "model.objective.lambda_entity=0.1"],
    "ella": ["model.adapter.ella.num_latents=8", "model.adapter.ella.num_blocks=2", "model.adapter.ella.width=64",
             "model.adapter.ella.num_heads=4", "model.adapter.ella.time_channels=32"],
}


@pytest.fixture(scope="module", params=list(KINDS))
def runs(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    write_synthetic_shards(str(root / "shards"), num_samples=16, samples_per_shard=8)
    common = [f"data.shards={root / 'shards'}", "data.synthetic_if_missing=false", "model.base.pretrained=embedded:tiny-sd",
              f"model.adapter.kind={kind.split('_gated')[0]}", *KINDS[kind], "model.ema.enabled=true", "checkpoint.every_n_steps=2",
              "model.optim.lr=1e-3", "validation.at_start=false", *FAST]
    assert train.main([f"output_dir={root / 'straight'}", "trainer.max_steps=4", *common]) == 0
    interrupted = root / "resumed" / "checkpoints"  # the folder a run stopped after step 2 leaves behind
    interrupted.mkdir(parents=True)
    shutil.copy2(root / "straight" / "checkpoints" / "step=0000002.ckpt", interrupted)
    assert train.main([f"output_dir={root / 'resumed'}", "trainer.max_steps=4", *common]) == 0
    return kind, root


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_a_resumed_run_reaches_the_uninterrupted_one_bitwise(runs):
    kind, root = runs
    straight = load(root / "straight" / "checkpoints" / "last.ckpt")
    resumed = load(root / "resumed" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 4
    with (root / "resumed" / "logs" / "metrics.csv").open() as handle:  # it went on from step 2: two steps trained
        assert sum(1 for row in csv.DictReader(handle) if row.get("train/loss")) == 2
    weights = straight["state_dict"]
    assert weights.keys() == resumed["state_dict"].keys() and any(k.startswith("adapter.") for k in weights)
    if kind == "lavi_bridge":
        assert any("lora_" in k for k in weights) and not any(k.startswith("unet.") and "lora_" not in k for k in weights)
    assert all(torch.equal(weights[k], resumed["state_dict"][k]) for k in weights)
    a, b = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    assert all(torch.equal(a[i][m], b[i][m]) for i in a for m in ("exp_avg", "exp_avg_sq"))
    assert all(torch.equal(x, y) for x, y in zip(straight["ema"]["shadow_params"], resumed["ema"]["shadow_params"]))
    start = load(root / "straight" / "checkpoints" / "step=0000002.ckpt")["state_dict"]
    assert any(not torch.equal(start[k], weights[k]) for k in weights if k.startswith("adapter."))  # it trained
    if kind == "cam_gated":  # the gated layers are what trains besides the CAM, and the frozen UNet is not saved
        assert {k.split(".")[0] for k in weights} == {"adapter", "fusion"}
        assert any(not torch.equal(start[k], weights[k]) for k in weights if k.endswith(".gate"))


@pytest.mark.slow
def test_the_export_loads_back_and_samples_what_the_checkpoint_samples(runs):
    kind, root = runs
    from_checkpoint = load_checkpoint_module(root / "straight" / "checkpoints" / "last.ckpt")
    from_export = load_exported_module(root / "straight" / "export")
    assert type(from_export.adapter) is type(from_checkpoint.adapter)
    assert (from_export.fusion is None) == (kind != "cam_gated")
    args = dict(prompts=["a red circle"], seeds=[3], num_inference_steps=2, guidance_scale=3.0, output_type="np")
    with from_checkpoint.ema_weights():  # the export holds the EMA weights
        expected = from_checkpoint.generate(**args)
    torch.testing.assert_close(torch.as_tensor(from_export.generate(**args)), torch.as_tensor(expected), atol=1e-5, rtol=0)
    flops = module_step_flops(from_checkpoint, resolution=32)
    assert flops.trained > 0 and flops.llm > 0
