"""FLOPs per sample (lightning_modules/flops.py), the device peak table and the throughput logs."""

import csv
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llm4gen.cli import train
from llm4gen.datamodules.batch import Batch
from llm4gen.lightning_modules.flops import module_step_flops, text_encoder_flops, trained_path_flops, vae_encoder_flops
from llm4gen.lightning_modules.throughput import device_peak_flops, peak_tflops_for
from tests.helpers.modules import make_module


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA B200", 2250.0), ("Some Future GPU", None),
])
def test_dense_bf16_peak_by_device_name(name, tflops):
    assert peak_tflops_for(name) == tflops


def test_peak_override_wins_and_cpu_has_none():
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), 123.0) == 123.0e12
    with pytest.raises(ValueError, match="peak_tflops=0"):
        device_peak_flops(torch.device("cpu"), 0.0)


# ---------------------------------------------------------------- the count equals the real step's


def real_step_flops(module, batch, latent_size):
    """FlopCounterMode around the module's own training step (loss + backward) on real tensors,
    attention through the math kernel (the fused CPU kernel is invisible to the counter)."""
    n = len(batch.captions)
    module.train()
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss = module.compute_losses(batch, noise=torch.randn(n, 4, latent_size, latent_size),
                                     timesteps=torch.full((n,), 500), drop=torch.zeros(n, dtype=torch.bool),
                                     generator=torch.Generator().manual_seed(0)).diffusion
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.slow
def test_counted_flops_equal_the_modules_own_training_step(tiny_model_config):
    batch = Batch(captions=["a red circle and a blue square"], pixel_values=torch.rand(1, 3, 32, 32) * 2 - 1)
    trained = {}
    for unet_training in ("frozen", "full"):
        module = make_module(tiny_model_config, unet_training=unet_training)
        real_tokens = module.llm(batch.captions).longest  # the context is cut there (padding masked)
        counted = module_step_flops(module, resolution=32, context_llm_tokens=real_tokens)
        assert counted.vae > 0 and counted.clip > 0 and counted.llm > 0
        assert counted.total == pytest.approx(real_step_flops(module, batch, 16), rel=0.01)
        assert module_step_flops(module, resolution=32).trained > counted.trained  # max_length: the upper bound
        trained[unet_training] = counted.trained
    # with cached latents and LLM features only CLIP and the trained path remain
    cached = module_step_flops(module, resolution=32, precomputed_keys=["latent_moments", "llm_features"],
                               context_llm_tokens=real_tokens)
    assert (cached.vae, cached.llm, cached.clip, cached.trained) == (0, 0, counted.clip, counted.trained)
    # the UNet's weight gradients: ~3x its forward instead of ~2x
    assert 1.3 < trained["full"] / trained["frozen"] < 1.7


# ---------------------------------------------------------------- full-size SD1.5 against an independent count


def analytic_forward_flops(model: nn.Module, run) -> int:
    """Closed-form FLOPs from module shapes: 2 x multiply-adds of every Conv2d and Linear (read from
    forward hooks) plus the two attention products of every diffusers Attention, counted by hand."""
    from diffusers.models.attention_processor import Attention

    total = 0

    def conv(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    def attention(module, args, kwargs, output):
        nonlocal total
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        batch = hidden.shape[0]
        queries = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        keys = queries if context is None else context.shape[1]
        total += 2 * 2 * batch * queries * keys * module.inner_dim  # q k^T and p v

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, Attention):
            hooks.append(module.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return total


@pytest.fixture(scope="module")
def sd15_parts():
    from llm4gen.adapters.cross_adapter import CrossAdapter
    from llm4gen.embedded.full_size import clip_l_text, sd15_unet, sd15_vae, t5_xl_encoder

    with torch.device("meta"):
        adapter = CrossAdapter(clip_dim=768, llm_dim=2048, num_heads=8)  # the release's CAM
    return dict(unet=sd15_unet().requires_grad_(False), adapter=adapter, vae=sd15_vae().requires_grad_(False),
                clip=clip_l_text().requires_grad_(False), llm=t5_xl_encoder().requires_grad_(False))


@pytest.mark.slow
def test_full_size_sd15_512px_flops_match_an_independent_count(sd15_parts):
    unet, adapter = sd15_parts["unet"], sd15_parts["adapter"]
    counted = trained_path_flops(adapter, unet, latent_size=64, clip_tokens=77, llm_tokens=256)

    # independent: the UNet and the CAM differentiated separately on the built architecture
    with torch.device("meta"):
        latents, timesteps = torch.empty(1, 4, 64, 64), torch.zeros(1, dtype=torch.long)
        context = torch.empty(1, 333, 768, requires_grad=True)
        clip, llm = torch.empty(1, 77, 768), torch.empty(1, 256, 2048)
    unet_counter, cam_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with unet_counter:
        unet(latents, timesteps, context).sample.sum().backward()
    with cam_counter:
        adapter(clip, llm).sum().backward()
    independent = unet_counter.get_total_flops() + cam_counter.get_total_flops()
    assert counted == pytest.approx(independent, rel=0.05)
    # the anchor: ~1.65 TFLOP per 512 px sample with a frozen UNet and cached features
    assert 1.6e12 < counted < 1.8e12

    # and the forward the count is built on agrees with a closed-form count from the module shapes
    with torch.device("meta"):
        context = torch.empty(1, 333, 768)
    forward_counter = FlopCounterMode(display=False)
    with forward_counter, torch.no_grad():
        unet(latents, timesteps, context)
    closed_form = analytic_forward_flops(unet, lambda: unet(latents, timesteps, context))
    assert forward_counter.get_total_flops() == pytest.approx(closed_form, rel=0.01)
    assert 0.80e12 < closed_form < 0.86e12  # environment.md: 0.83 TFLOP with the 333-token context


@pytest.mark.slow
def test_full_size_encoder_flops(sd15_parts):
    vae = vae_encoder_flops(sd15_parts["vae"], 512)
    t5 = text_encoder_flops(sd15_parts["llm"], 256)
    clip = text_encoder_flops(sd15_parts["clip"], 77)
    assert vae == pytest.approx(1.12e12, rel=0.05)  # environment.md's figures, counted the same way
    assert t5 == pytest.approx(0.61e12, rel=0.05)
    assert clip == pytest.approx(2 * 77 * 85e6, rel=0.05)  # 2 x tokens x the 85M non-embedding weights


# ---------------------------------------------------------------- the logs


@pytest.mark.slow
def test_training_logs_samples_per_second_tflops_and_mfu(tmp_path):
    from llm4gen.datamodules.synthetic import write_synthetic_shards

    out = tmp_path / "run"
    write_synthetic_shards(tmp_path / "shards", num_samples=16, samples_per_shard=16, resolution=32)
    assert train.main([f"output_dir={out}", f"data.shards={tmp_path / 'shards'}", "trainer.max_steps=4",
                       "data.synthetic_if_missing=false",
                       "validation.every_n_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
                       "data.batch_size=4", "model.optim.warmup_steps=0", "model.performance.peak_tflops=0.5"]) == 0
    with open(out / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    flops_per_sample = [float(r["throughput/flops_per_sample"]) for r in rows if r.get("throughput/flops_per_sample")]
    assert flops_per_sample and flops_per_sample[0] > 1e8
    logged = [r for r in rows if r.get("train/device/mfu")]
    assert logged, "no MFU row in metrics.csv"
    last = logged[-1]
    samples_per_sec, tflops, mfu = (float(last[k]) for k in
                                    ("train/device/samples_per_sec", "train/device/tflops_per_sec", "train/device/mfu"))
    assert samples_per_sec > 0
    assert tflops == pytest.approx(samples_per_sec * flops_per_sample[0] / 1e12, rel=1e-3)
    assert mfu == pytest.approx(tflops / 0.5, rel=1e-3) and math.isfinite(mfu)
