import pytest
import torch

from llm4gen.datamodules.batch import Batch
from llm4gen.encoders.llm import LLMFeatures
from llm4gen.lightning_modules.llm4gen import CheckpointKeyError, check_checkpoint_keys
from tests.helpers.modules import fixed_batch, fixed_inputs, make_module, run_steps
from tests.helpers.tolerances import ENCODER_OUTPUT


@pytest.fixture(scope="module")
def module(tiny_model_config):
    return make_module(tiny_model_config)


def test_only_the_adapter_trains_by_default(module):
    trainable = module.trainable_state_keys()
    assert trainable and all(k.startswith("adapter.") for k in trainable)
    assert set(dict(module.adapter.named_parameters(prefix="adapter"))) == trainable
    for part in (module.unet, module.vae, module.clip, module.llm):
        assert not any(p.requires_grad for p in part.parameters())


def test_context_shape_and_clip_passthrough(module):
    batch = fixed_batch()
    context, unet_kwargs = module.conditioning(batch)
    real = module.llm(batch.captions).mask  # (4, max_length)
    longest = int(real.sum(1).max())
    assert longest < module.cfg.llm.max_length
    assert context.shape == (4, 77 + longest, module.clip.hidden_size)  # padding past the longest caption: cut
    torch.testing.assert_close(context[:, :77], module.clip(batch.captions).hidden)
    assert list(unet_kwargs) == ["encoder_attention_mask"]  # the rest of the padding: masked
    assert unet_kwargs["encoder_attention_mask"].tolist() == [[True] * 77 + row[:longest] for row in real.tolist()]


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_caption_dropout_uses_the_empty_prompt(module):
    batch = fixed_batch()
    drop = torch.tensor([True, False, True, False])
    context, _ = module.conditioning(batch, drop)
    empty, _ = module.conditioning(Batch(captions=[""] * 4))
    kept, _ = module.conditioning(batch)
    length = context.shape[1]  # the longest caption left after the drop: the context is cut there
    assert empty.shape[1] < length <= kept.shape[1]
    # rows encoded beside other captions against a batch of empty ones: rounding apart (ENCODER_OUTPUT, measured
    # up to 7.2e-7); a caption's features where the empty prompt's belong differ by O(1)
    torch.testing.assert_close(context[drop][:, :empty.shape[1]], empty[drop], **ENCODER_OUTPUT.close)
    assert context[drop][:, empty.shape[1]:].abs().max() == 0  # the empty prompt's padding, zeroed (and masked)
    torch.testing.assert_close(context[~drop], kept[~drop][:, :length], **ENCODER_OUTPUT.close)
    assert kept[~drop][:, length:].abs().max() == 0


def test_train_mode_keeps_frozen_parts_in_eval(module):
    module.train()
    assert module.adapter.training
    assert not (module.unet.training or module.vae.training or module.clip.training or module.llm.training)


@pytest.mark.slow
def test_frozen_weights_bitwise_unchanged_and_optimizer_holds_exactly_the_trainable(tiny_model_config):
    module = make_module(tiny_model_config)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _, optimizer = run_steps(module, 3, fixed_batch())
    trainable = module.trainable_state_keys()
    for name, p in module.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
            assert p.grad is None
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.trainable_parameters()}


def test_lightning_optimizer_holds_exactly_the_trainable(module):
    class FakeTrainer:
        max_steps = 10

    module._trainer = FakeTrainer()
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    params = [p for group in config["optimizer"].param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.trainable_parameters()}


@pytest.mark.slow
def test_overfitting_one_batch_with_the_adapter_alone(tiny_model_config):
    torch.manual_seed(0)
    module = make_module(tiny_model_config)
    losses, _ = run_steps(module, 300, fixed_batch(), lr=1e-3, stop_below=0.85)
    print(f"adapter only: {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")
    assert losses[-1] <= 0.85 * losses[0]


@pytest.mark.slow
def test_overfitting_one_batch_with_the_unet_unfrozen(tiny_model_config):
    torch.manual_seed(0)
    module = make_module(tiny_model_config, unet_training="full")
    assert any(k.startswith("unet.") for k in module.trainable_state_keys())
    losses, _ = run_steps(module, 100, fixed_batch(), lr=1e-3, stop_below=0.5)
    print(f"unet unfrozen: {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")
    assert losses[-1] <= 0.5 * losses[0]


@pytest.mark.slow
def test_lora_trains_only_lora_weights(tiny_model_config):
    module = make_module(tiny_model_config, unet_training="lora")
    unet_keys = {k for k in module.trainable_state_keys() if k.startswith("unet.")}
    assert unet_keys and all("lora" in k for k in unet_keys)
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if "lora" not in n}
    run_steps(module, 2, fixed_batch())
    assert all(torch.equal(p, before[n]) for n, p in module.unet.named_parameters() if "lora" not in n)


def test_checkpoint_key_check():
    check_checkpoint_keys({"a", "b"}, {"a", "b"})
    with pytest.raises(CheckpointKeyError, match=r"missing \['b'\].*unexpected \['c'\]"):
        check_checkpoint_keys({"a", "b"}, {"a", "c"})


def test_load_state_dict_refuses_frozen_or_missing_keys(module):
    state = {k: v for k, v in module.state_dict().items() if k in module.trainable_state_keys()}
    module.load_state_dict(state)  # exactly the trainable keys: fine
    with pytest.raises(CheckpointKeyError):
        module.load_state_dict(module.state_dict())  # frozen weights are never loaded from a checkpoint
    state.pop(next(iter(state)))
    with pytest.raises(CheckpointKeyError):
        module.load_state_dict(state)


def test_llm_features_pad_cut_and_trim():
    f = LLMFeatures(torch.ones(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]]))
    padded = f.padded_to(5)
    assert padded.features.shape == (2, 5, 4) and padded.features[:, 3:].abs().sum() == 0
    assert padded.mask.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    assert f.longest == 2 and f.trimmed().features.shape == (2, 2, 4)
    assert f.trimmed().mask.tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError, match="2 real tokens, more than the 1"):
        f.padded_to(1)  # cutting a real token is refused
    empty = LLMFeatures(torch.zeros(1, 4, 4), torch.zeros(1, 4, dtype=torch.bool))
    assert empty.trimmed().features.shape == (1, 1, 4)  # a context never has an empty LLM part


def test_llm_features_where_pads_both_sides_to_one_length():
    long = LLMFeatures(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    short = LLMFeatures(torch.full((1, 1, 4), 7.0), torch.ones(1, 1, dtype=torch.bool))
    merged = long.where(torch.tensor([True, False]), short)
    assert merged.features.shape == (2, 3, 4)
    assert merged.features[0].eq(1).all() and merged.features[1, 0].eq(7).all() and merged.features[1, 1:].eq(0).all()
    assert merged.mask.tolist() == [[True] * 3, [True, False, False]]


@pytest.mark.slow
def test_generate_is_deterministic_per_seed(module):
    a = module.generate(["a red circle", "a blue square"], [3, 4], num_inference_steps=3)
    b = module.generate(["a red circle", "a blue square"], [3, 4], num_inference_steps=3)
    c = module.generate(["a red circle"], [5], num_inference_steps=3)
    import numpy as np

    assert a[0].size == (32, 32)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_export_pretrained_roundtrip(module, tmp_path):
    from llm4gen.adapters.cross_adapter import CrossAdapter

    module.export_pretrained(tmp_path / "export")
    loaded = CrossAdapter.from_pretrained(tmp_path / "export" / "adapter")
    for (n, p), (_, q) in zip(module.adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_trainable_init_depends_on_the_seed_alone(tiny_model_config):
    """Loading the frozen parts may draw from the global RNG (an embedded model is built on first use);
    the CAM's initial weights must not depend on that, or a restarted run would start elsewhere."""
    from llm4gen.lightning_modules.llm4gen import LLM4GenModule

    torch.manual_seed(123)
    a = LLM4GenModule(tiny_model_config, seed=5)
    torch.manual_seed(456)
    torch.randn(1000)
    b = LLM4GenModule(tiny_model_config, seed=5)
    c = LLM4GenModule(tiny_model_config, seed=6)
    for name, p in a.adapter.state_dict().items():
        assert torch.equal(p, b.adapter.state_dict()[name]), name
    assert not all(torch.equal(p, c.adapter.state_dict()[n]) for n, p in a.adapter.state_dict().items())


def test_without_the_cam_the_unet_sees_clip_alone_and_only_the_unet_trains(tiny_model_config):
    """model.adapter.enabled=false with a full UNet: the paper's "SD1.5 (ft)" control."""
    module = make_module(tiny_model_config, **{"adapter.enabled": False, "unet_training": "full"})
    batch = fixed_batch()
    calls = []
    module.llm.register_forward_hook(lambda *args: calls.append(1))
    context, _ = module.conditioning(batch)
    torch.testing.assert_close(context, module.clip(batch.captions).hidden)   # (4, 77, clip_dim)
    dropped, _ = module.conditioning(batch, drop=torch.tensor([True, False, True, False]))  # CFG's empty prompt
    torch.testing.assert_close(dropped[0], module.clip([""]).hidden[0])
    assert calls == []  # nothing reads LLM features, so the LLM never runs
    trainable = module.trainable_state_keys()
    assert trainable and all(k.startswith("unet.") for k in trainable)
    module.train()
    assert not module.adapter.training
    noise, timesteps = fixed_inputs(module, batch)
    module.compute_losses(batch, noise=noise, timesteps=timesteps).diffusion.backward()
    assert all(p.grad is None for p in module.adapter.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.unet.parameters())


def test_latents_are_the_posterior_mean_or_a_sample_as_configured(module, tiny_model_config):
    batch = fixed_batch()
    with torch.no_grad():
        mean = module.vae.encode(batch.pixel_values).latent_dist.mean * module.vae.config.scaling_factor
        assert module.cfg.objective.latents == "sample"  # the default, as diffusers' SD training
        means = make_module(tiny_model_config, **{"objective.latents": "mean"})
        for seed in (0, 1):
            torch.testing.assert_close(means.latents(batch, torch.Generator().manual_seed(seed)), mean)
        sampling = module
        a = sampling.latents(batch, torch.Generator().manual_seed(0))
        b = sampling.latents(batch, torch.Generator().manual_seed(1))
        assert a.shape == mean.shape and not torch.allclose(a, b)
        torch.testing.assert_close(a, sampling.latents(batch, torch.Generator().manual_seed(0)))
