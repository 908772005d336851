"""LaVi-Bridge's option of LoRA inside the LLM (model.llm.lora_rank): only the LLM's LoRA weights train (its
base weights stay the pretrained ones), checkpoints hold them and resume, the exported pipeline carries the
merged LLM and samples what the checkpoint samples, and cached LLM features are refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.cli import export, generate, train
from llm4gen.configs.schema import ConfigError, load_config
from llm4gen.encoders.llm import default_lora_targets
from tests.helpers.training import FAST


def test_lora_targets_by_family_and_cached_features_are_refused():
    from types import SimpleNamespace

    assert default_lora_targets(SimpleNamespace(model_type="bert")) == ["query", "value"]
    assert default_lora_targets(SimpleNamespace(model_type="t5")) == ["q", "v"]
    with pytest.raises(ValueError, match="lora_target_modules"):
        default_lora_targets(SimpleNamespace(model_type="mamba"))
    with pytest.raises(ConfigError, match="drop llm_features from data.precomputed_keys"):
        load_config(overrides=["model.llm.lora_rank=4", "data.precomputed_keys=[llm_features]"])
    with pytest.raises(ConfigError, match="lora_rank' is -1"):
        load_config(overrides=["model.llm.lora_rank=-1"])


@pytest.mark.slow
def test_an_llm_lora_run_trains_only_the_lora_resumes_and_exports_the_merged_llm(tmp_path):
    from llm4gen.lightning_modules.sampler import load_checkpoint_module

    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.shards={tmp_path / 'data'}", "model.adapter.kind=lavi_bridge",
            "model.llm.lora_rank=4", "model.optim.lr=1e-2", "validation.at_start=false", *FAST]
    assert train.main([*args, "trainer.max_steps=3"]) == 0
    checkpoint = out / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    groups = {k.split(".")[0] for k in saved["state_dict"]}
    assert groups == {"adapter", "llm"} and all("lora_" in k for k in saved["state_dict"] if k.startswith("llm."))
    lora_b = [v for k, v in saved["state_dict"].items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it trained

    module = load_checkpoint_module(str(checkpoint))
    fresh = load_checkpoint_module(str(checkpoint))
    from llm4gen.encoders.llm import LLMEncoder

    pretrained = LLMEncoder.from_config(load_config().model.llm).model.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in module.llm.model.state_dict().items() if "lora_" not in k}
    for key, value in pretrained.items():  # the LLM's own weights are the pretrained ones, untouched
        torch.testing.assert_close(base[key], value, rtol=0, atol=0, msg=key)
    assert fresh.llm.trains and sum(p.numel() for p in fresh.llm.model.parameters() if p.requires_grad) > 0

    assert train.main([*args, "trainer.max_steps=4"]) == 0  # resumes from step 3
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 4

    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "llm" / "config.json").is_file()  # carried, merged: not referenced
    common = ["--prompt", "a red circle", "--seed", "1", "--steps", "3", "--device", "cpu"]
    assert generate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert generate.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "b"), *common]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("000-*.png"))), dtype=np.int16) for d in ("a", "b"))
    assert np.abs(a - b).max() <= 1
