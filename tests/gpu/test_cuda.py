"""What only a CUDA device can show (run with ``python -m pytest -m gpu``; skipped where there is none,
as Lightning's own ``RunIf(min_cuda_gpus=1)`` tests are): bf16-mixed steps with fp32 trainable masters,
the fused and 8-bit AdamW, channels_last and torch.compile giving the losses of the plain model."""

import importlib.util

import pytest
import torch
from lightning.fabric.utilities import move_data_to_device

from llm4gen.lightning_modules.optimization import parameter_groups
from llm4gen.lightning_modules.performance import build_optimizer
from tests.helpers.modules import fixed_batch, fixed_inputs, make_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"needs {package}")


def loss_on_cuda(module, batch=None, autocast=False):
    module = module.to("cuda")
    batch = batch or fixed_batch()
    batch = move_data_to_device(batch, "cuda")  # as Lightning moves a batch
    noise, timesteps = fixed_inputs(module, batch)
    drop = torch.zeros(len(batch.captions), dtype=torch.bool, device="cuda")
    module.train()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        terms = module.compute_losses(batch, noise=noise.cuda(), timesteps=timesteps.cuda(), drop=drop,
                                      generator=torch.Generator("cuda").manual_seed(1))
    return module.objective(terms)


def test_bf16_mixed_step_keeps_fp32_masters_and_a_finite_loss(tiny_model_config):
    module = make_module(tiny_model_config, **{"base.dtype": "bfloat16", "llm.dtype": "bfloat16"})
    loss = loss_on_cuda(module, autocast=True)
    loss.backward()
    assert torch.isfinite(loss)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.grad is not None for p in trainable)
    assert module.unet.dtype == torch.bfloat16


@pytest.mark.parametrize("optimizer", ["adamw_fused", pytest.param("adamw_8bit", marks=needs("bitsandbytes"))])
def test_fused_and_8bit_adamw_take_a_step_like_plain_adamw(tiny_model_config, optimizer):
    steps = {}
    for kind in ("adamw", optimizer):
        torch.manual_seed(0)
        module = make_module(tiny_model_config, **{"performance.optimizer": kind}).to("cuda")
        opt = build_optimizer(parameter_groups(module.named_parameters(), module.cfg.optim), module.cfg.optim, kind)
        before = [p.detach().clone() for p in module.trainable_parameters()]
        loss_on_cuda(module).backward()
        opt.step()
        steps[kind] = torch.cat([(p.detach() - b).flatten() for p, b in zip(module.trainable_parameters(), before)])
    assert steps[optimizer].abs().sum() > 0
    tolerance = 1e-2 if optimizer == "adamw_8bit" else 1e-5  # 8-bit state is quantised
    torch.testing.assert_close(steps[optimizer], steps["adamw"], atol=tolerance * steps["adamw"].abs().max(), rtol=0)


def test_channels_last_and_compile_give_the_plain_loss_on_cuda(tiny_model_config):
    torch.manual_seed(0)
    reference = loss_on_cuda(make_module(tiny_model_config)).item()
    for overrides in ({"performance.channels_last": True}, {"performance.compile": True}):
        torch.manual_seed(0)
        loss = loss_on_cuda(make_module(tiny_model_config, **overrides)).item()
        assert loss == pytest.approx(reference, rel=1e-3), overrides


def test_a_sharded_run_trains_in_bf16_with_fp32_masters_and_activation_checkpointing(tmp_path):
    """trainer.strategy=fsdp2 on one GPU with bf16-mixed: FSDP2 gathers bf16 copies of fp32 shards, checkpointed
    blocks recompute their activations, the loss falls and the checkpoint folder holds fp32 weights."""
    from llm4gen.cli import train
    from llm4gen.lightning_modules.sharding import consolidated_checkpoint

    out = tmp_path / "run"
    metrics = train.run(train.load_config(None, [
        f"output_dir={out}", f"data.shards={tmp_path / 'data'}", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.strategy=fsdp2", "trainer.precision=bf16-mixed", "model.unet_training=full",
        "model.performance.gradient_checkpointing=true", "trainer.max_steps=20", "validation.every_n_steps=0",
        "validation.at_start=false", "model.optim.lr=1e-3", "checkpoint.every_n_steps=20"]))
    assert metrics["global_step"] == 20 and metrics["train/loss"] == metrics["train/loss"]
    weights = consolidated_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
