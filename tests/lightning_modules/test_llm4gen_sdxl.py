"""LLM4GenModule on the embedded tiny SDXL: the same objective as SD1.5 (only the conditioning differs),
frozen weights untouched, the CAM alone able to fit a batch, the entity loss's gradient routed to the
CAM only, generation through diffusers' SDXL pipeline."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llm4gen.configs.schema import load_config
from llm4gen.datamodules.batch import Batch
from llm4gen.encoders.llm import common_length
from tests.helpers.modules import fixed_batch, make_module, run_steps, synthetic_captions, with_entity_targets


@pytest.fixture(scope="module")
def sdxl_config():
    return OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)


@pytest.fixture(scope="module")
def module(sdxl_config):
    return make_module(sdxl_config)


def test_only_the_adapter_trains_and_frozen_weights_stay_bitwise(sdxl_config):
    module = make_module(sdxl_config)
    trainable = module.trainable_state_keys()
    assert trainable and all(k.startswith("adapter.") for k in trainable)
    assert module.adapter.blocks[0].llm_proj.weight.shape == (80, 384)  # LLM (MiniLM) width -> both CLIPs' width
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    run_steps(module, 3, fixed_batch())
    for name, p in module.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]) and p.grad is None, f"frozen {name} changed"


@pytest.mark.slow
def test_overfitting_one_batch_with_the_adapter_alone(sdxl_config):
    torch.manual_seed(0)
    module = make_module(sdxl_config)
    losses, _ = run_steps(module, 300, fixed_batch(), lr=1e-3, stop_below=0.85)
    print(f"tiny SDXL, adapter only: {losses[0]:.4f} -> {losses[-1]:.4f} ({losses[-1] / losses[0]:.3f}) "
          f"in {len(losses)} steps")
    assert len(losses) <= 300 and losses[-1] <= 0.85 * losses[0]


def test_entity_gradient_reaches_every_cam_parameter_and_no_frozen_one(sdxl_config):
    torch.manual_seed(0)
    module = make_module(sdxl_config, **{"objective.lambda_entity": 1.0})
    from llm4gen.losses.attention_capture import CapturingAttnProcessor

    layers = [n for n, p in module.unet.attn_processors.items() if isinstance(p, CapturingAttnProcessor)]
    # SDXL has no cross-attention at the highest resolution: "lowest" is its 8x8 transformer blocks here
    assert layers and all(n.startswith(("down_blocks.1.", "mid_block.", "up_blocks.0.")) for n in layers)
    captions = synthetic_captions(4)
    g = torch.Generator().manual_seed(0)
    batch = with_entity_targets(module, Batch(captions=captions, pixel_values=torch.rand(4, 3, 32, 32, generator=g) * 2 - 1))
    module.train()
    losses = module.compute_losses(batch, noise=torch.randn(4, 4, 16, 16, generator=g),
                                   timesteps=torch.tensor([100, 300, 500, 700]), drop=torch.zeros(4, dtype=torch.bool),
                                   generator=torch.Generator().manual_seed(1))
    assert losses.entity_parts.num_pairs > 0 and torch.isfinite(losses.entity)
    losses.entity.backward()  # the entity term alone
    for name, p in module.adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no entity gradient at adapter.{name}"
    for part in (module.unet, module.vae, module.clip, module.llm):
        assert all(p.grad is None for p in part.parameters())
    captured = module.attention_store.maps()
    assert captured and all(m.shape[-1] == 77 + module.cfg.llm.max_length for m in captured.values())
    # the lowest resolution's transformer block has 2 layers in the tiny SDXL (10 in SDXL): both captured
    assert len([n for n in captured if "down_blocks.1" in n]) == 2


def test_generate_through_the_sdxl_pipeline_is_deterministic_per_seed(module):
    from diffusers import StableDiffusionXLPipeline

    assert isinstance(module.pipeline(), StableDiffusionXLPipeline)
    a = module.generate(["a red circle", "a blue square"], [3, 4], num_inference_steps=3)
    b = module.generate(["a red circle", "a blue square"], [3, 4], num_inference_steps=3)
    c = module.generate(["a red circle"], [5], num_inference_steps=3)
    assert a[0].size == (32, 32)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_generation_uses_the_fused_prompt_and_negative(module, monkeypatch):
    """What the SDXL pipeline conditions on when the module samples: the CAM-fused contexts and both pooled
    embeddings of the module's own encoders."""
    from llm4gen.pipelines.llm4gen_pipeline import LLM4GenXLPipeline

    seen = {}
    encode = LLM4GenXLPipeline.encode_prompt

    def record(self, *args, **kwargs):
        seen["conditioning"] = encode(self, *args, **kwargs)
        raise StopIteration

    monkeypatch.setattr(LLM4GenXLPipeline, "encode_prompt", record)
    with pytest.raises(StopIteration):
        module.generate(["a red circle"], [0], negative_prompt="blurry")
    clip, llm = module.encode_text(["a red circle"])
    neg_clip, neg_llm = module.encode_text(["blurry"])
    llm, neg_llm = common_length(llm, neg_llm)  # guidance's two halves: one length
    context, negative, pooled, negative_pooled = seen["conditioning"]
    torch.testing.assert_close(context, module.fuse(clip.hidden, llm))
    torch.testing.assert_close(negative, module.fuse(neg_clip.hidden, neg_llm))
    torch.testing.assert_close(pooled, clip.pooled)
    torch.testing.assert_close(negative_pooled, neg_clip.pooled)


def test_export_loads_back_and_generates_the_same_image(module, sdxl_config, tmp_path):
    from llm4gen.adapters.cross_adapter import CrossAdapter

    module.export_pretrained(tmp_path / "export")
    loaded = CrossAdapter.from_pretrained(tmp_path / "export" / "adapter")
    assert loaded.config.clip_dim == 80
    fresh = make_module(sdxl_config, **{"adapter.init_from": str(tmp_path / "export" / "adapter")})
    for name, p in module.adapter.state_dict().items():
        assert torch.equal(p, fresh.adapter.state_dict()[name]), name
    a = module.generate(["a red circle"], [1], num_inference_steps=2)[0]
    b = fresh.generate(["a red circle"], [1], num_inference_steps=2)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_flops_per_sample_cover_the_unets_added_conditioning_and_both_clip_encoders(module):
    """The run's FLOP count (throughput/MFU logging) builds SDXL's added_cond_kwargs for the UNet, and
    online CLIP costs both encoders, the second more than the first (it is wider)."""
    from llm4gen.lightning_modules.flops import module_step_flops, text_encoder_flops

    flops = module_step_flops(module, 32)
    first, second = (text_encoder_flops(e, 77) for e in (module.clip.text_encoder, module.clip.text_encoder_2))
    assert flops.trained > 0 and second > first > 0
    assert flops.clip == first + second
