"""The gated fusion (model.adapter.fusion=gated, adapters/gated_fusion.py): at step 0 the UNet is the base,
bitwise, for SD1.5 and SDXL, with and without the entity loss's capture; the gates are what the first step
trains, then the LLM branch and the connector learn; its layers save, load, refuse another UNet, and travel
with an export."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llm4gen.adapters.gated_fusion import GatedFusion, GatedFusionProcessor
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.schema import load_config
from llm4gen.lightning_modules.attention_split import attention_split
from tests.helpers.modules import (
    PARSER,
    fixed_batch,
    fixed_inputs,
    make_module,
    run_steps,
    unet_prediction,
)


@pytest.fixture(scope="module")
def sdxl_model_config():
    return OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("lambda_entity", [0.0, 0.5])
def test_at_step_0_the_unet_is_the_base_bitwise(tiny_model_config, sdxl_model_config, family, lambda_entity):
    config = tiny_model_config if family == "sd15" else sdxl_model_config
    batch = fixed_batch()
    extra = {"objective.lambda_entity": lambda_entity, "objective.entity_parser": PARSER}
    gated = make_module(config, **{"adapter.fusion": "gated", **extra}).eval()
    base = make_module(config, **{"adapter.enabled": False, "unet_training": "full", **extra}).eval()
    assert all(isinstance(p, GatedFusionProcessor) for n, p in gated.unet.attn_processors.items() if "attn2" in n)
    context, _ = gated.conditioning(batch)
    assert context.shape[1] > 77  # the LLM's tokens are in the context, the gates keep them out
    store = gated.attention_store
    with store.capturing() if store is not None else torch.no_grad():
        ours = unet_prediction(gated, batch)
    with base.attention_store.capturing() if base.attention_store is not None else torch.no_grad():
        theirs = unet_prediction(base, batch)
    assert torch.equal(ours, theirs)
    if store is not None:  # captured: CLIP's probabilities as the base's, then the LLM branch's, each summing to 1
        for name, probs in store.maps().items():
            assert torch.equal(probs[..., :77], base.attention_store.maps()[name])
            torch.testing.assert_close(probs[..., 77:].sum(-1), torch.ones_like(probs[..., 0]))


def test_the_first_step_trains_the_gates_then_the_llm_branch_and_the_connector_learn(tiny_model_config):
    module = make_module(tiny_model_config, **{"adapter.fusion": "gated"})
    batch = fixed_batch(n=2)
    noise, timesteps = fixed_inputs(module, batch)
    module.train()

    def gradients():
        module.zero_grad()
        terms = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=torch.zeros(2, dtype=torch.bool),
                                      generator=torch.Generator().manual_seed(1))
        module.objective(terms).backward()
        return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}

    grads = gradients()
    assert set(grads) == {n for n, _ in module.named_parameters() if n.startswith(("adapter.", "fusion."))}
    moving = {n for n, g in grads.items() if g is not None and g.abs().max() > 0}
    assert moving == {n for n in grads if n.endswith(".gate")}  # a closed gate passes nothing else a gradient
    with torch.no_grad():
        for layer in module.fusion.layers.values():
            layer.gate.fill_(0.1)
    grads = gradients()
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())


def test_it_learns_a_batch_with_the_gates_opening(tiny_model_config):
    module = make_module(tiny_model_config, **{"adapter.fusion": "gated"})
    losses, _ = run_steps(module, 40, fixed_batch(n=2), lr=1e-2, stop_below=0.85)
    assert losses[-1] <= 0.85 * losses[0]
    assert module.fusion.openness().max() > 0


def test_its_layers_save_load_and_refuse_another_unet(tiny_model_config, sdxl_model_config, tmp_path):
    module = make_module(tiny_model_config, **{"adapter.fusion": "gated"})
    with torch.no_grad():
        for i, layer in enumerate(module.fusion.layers.values()):
            layer.gate.fill_(0.1 * (i + 1))
    module.fusion.save_pretrained(tmp_path / "fusion")
    loaded = GatedFusion.from_pretrained(tmp_path / "fusion")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.fusion.state_dict().values()))
    before = unet_prediction(module.eval(), fixed_batch())
    loaded.install(module.unet)
    assert torch.equal(unet_prediction(module, fixed_batch()), before)
    sdxl = make_module(sdxl_model_config)
    with pytest.raises(ValueError, match="made for a UNet with cross-attention layers"):
        loaded.install(sdxl.unet)


def test_the_attention_split_reads_a_closed_gate_as_the_base(tiny_model_config):
    module = make_module(tiny_model_config, **{"adapter.fusion": "gated"})
    prompts = ["a red circle", "a blue square and a green triangle"]
    closed = attention_split(module, prompts)
    assert (closed.clip, closed.llm, closed.padding) == (1.0, 0.0, 0.0)
    with torch.no_grad():
        for layer in module.fusion.layers.values():
            layer.gate.fill_(torch.atanh(torch.tensor(0.5)))
    opened = attention_split(module, prompts)
    assert opened.clip == pytest.approx(1 / 1.5, abs=1e-5) and opened.llm == pytest.approx(0.5 / 1.5, abs=1e-5)
    assert opened.padding == 0


@pytest.mark.parametrize("overrides, message", [
    (["model.adapter.kind=lavi_bridge", "model.adapter.fusion=gated"], "has none"),
    (["model.adapter.fusion=sum"], "model.adapter.fusion"),
    (["model.adapter.fusion=gated", "model.adapter.init_from=projector.pth"], "released projector.pth"),
])
def test_a_gated_setting_that_cannot_work_is_refused_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_it_trains_beside_unet_lora_and_its_weights_stay_its_own(tiny_model_config):
    """With LoRA in the UNet the gated layers are the fusion's (peft wraps the UNet's projections only), and the
    first steps move the gates, the LoRA and then everything else that trains."""
    module = make_module(tiny_model_config, **{"adapter.fusion": "gated", "unet_training": "lora"})
    assert not any("lora_" in name for name, _ in module.fusion.named_parameters())
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"adapter", "fusion", "unet"}
    assert all("lora_" in n for n in trained if n.startswith("unet."))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    run_steps(module, 3, fixed_batch(n=2), lr=1e-2)
    moved = {n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.endswith(".gate") for n in moved) and any("lora_B" in n for n in moved)
    assert any(n.startswith("adapter.") for n in moved) and any(".to_k." in n for n in moved if n.startswith("fusion."))
