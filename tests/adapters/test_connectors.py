"""Every connector kind (model.adapter.kind) in the tiny model: it trains (gradients reach every connector
weight and nothing frozen; the loss falls on one batch), saves and loads back identically, and ELLA's
connector runs at the timestep of each step, in training and in every denoising step of sampling."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from llm4gen.adapters.connectors import CONNECTORS, build_connector, load_connector, saved_kind
from llm4gen.adapters.ella import TimestepAwareConnector
from llm4gen.adapters.layout import ContextLayout
from llm4gen.configs.choices import CONNECTOR_CLASS_NAMES, CONNECTOR_KINDS
from llm4gen.configs.errors import ConfigError
from llm4gen.configs.schema import load_config
from llm4gen.encoders.llm import LLMFeatures
from llm4gen.losses.entity import EntityTargets, drop_leading_tokens
from tests.helpers.modules import PARSER, fixed_batch, fixed_inputs, make_module, run_steps, with_entity_targets
from tests.helpers.tolerances import DIFFUSION_LOSS, ENCODER_OUTPUT

SMALL_ELLA = {"adapter.ella": {"num_latents": 8, "num_blocks": 2, "width": 64, "num_heads": 4, "time_channels": 32}}


PUBLISHED = {"ella": SMALL_ELLA, "lavi_bridge": {"unet_training": "lora"}}  # LaVi-Bridge trains UNet LoRA with it


def kind_module(tiny_model_config, kind, **overrides):
    torch.manual_seed(0)
    return make_module(tiny_model_config, **{"adapter.kind": kind, **PUBLISHED.get(kind, {}), **overrides})


def test_kinds_classes_and_choices_agree():
    assert tuple(CONNECTORS) == CONNECTOR_KINDS
    assert {kind: cls.__name__ for kind, cls in CONNECTORS.items()} == CONNECTOR_CLASS_NAMES


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_gradients_reach_every_connector_weight_and_nothing_frozen(tiny_model_config, kind):
    module = kind_module(tiny_model_config, kind)
    batch = fixed_batch(n=2)
    noise, timesteps = fixed_inputs(module, batch)
    module.train()
    terms = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=torch.zeros(2, dtype=torch.bool),
                                  generator=torch.Generator().manual_seed(1))
    module.objective(terms).backward()
    connector = {f"adapter.{n}" for n, _ in module.adapter.named_parameters()}
    lora = {f"unet.{n}" for n, _ in module.unet.named_parameters() if "lora_" in n}
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained == (connector | lora if kind == "lavi_bridge" else connector)  # the rest stays frozen
    # every connector weight gets a gradient (LoRA's A matrices get none at step 0: B starts at zero)
    without_grad = [n for n, p in module.named_parameters()
                    if p.requires_grad and "lora_A" not in n and (p.grad is None or not p.grad.any())]
    assert not without_grad, without_grad
    assert all(p.grad is None for n, p in module.named_parameters() if not p.requires_grad)


@pytest.fixture(scope="module")
def shapes_model_config():
    """The embedded default's model: the pretrained shapes base, whose UNet responds to its context (a random
    UNet barely does to a connector that replaces CLIP with layer-normed tokens, as ELLA and LaVi-Bridge do)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load_config().model, resolve=True)


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_the_loss_falls_by_15_percent_on_one_batch(shapes_model_config, kind):
    module = kind_module(shapes_model_config, kind)
    losses, _ = run_steps(module, 60, fixed_batch(n=2), lr=3e-3, stop_below=0.85)
    assert losses[-1] <= 0.85 * losses[0], (kind, losses[0], losses[-1], len(losses))


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_save_and_from_pretrained_give_identical_outputs(tiny_model_config, kind, tmp_path):
    module = kind_module(tiny_model_config, kind)
    module.adapter.save_pretrained(tmp_path / "adapter")
    assert saved_kind(tmp_path / "adapter") == kind
    loaded = load_connector(tmp_path / "adapter")
    recorded = lambda config: {k: v for k, v in config.items() if k != "_name_or_path"}  # noqa: E731
    assert type(loaded) is type(module.adapter) and recorded(loaded.config) == recorded(module.adapter.config)
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(2, 77, module.adapter.config.clip_dim, generator=g)
    llm = torch.randn(2, 5, module.adapter.config.llm_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(loaded(clip, llm, mask, t), module.adapter(clip, llm, mask, t), rtol=0, atol=0)


@pytest.mark.parametrize("kind, layout, tokens", [
    ("cam", ContextLayout.CLIP_THEN_LLM, 77 + 5), ("mlp", ContextLayout.CLIP_THEN_LLM, 77 + 5),
    ("lavi_bridge", ContextLayout.LLM, 5), ("ella", ContextLayout.QUERIES, 8)])
def test_each_kind_builds_its_published_context(kind, layout, tokens):
    cfg = load_config(overrides=[f"model.adapter.kind={kind}", "model.adapter.ella.num_latents=8"]).model.adapter
    connector = build_connector(cfg, clip_dim=32, llm_dim=24)
    assert connector.layout is layout
    context = connector(torch.randn(2, 77, 32), torch.randn(2, 5, 24), None, torch.tensor(500))
    assert context.shape == (2, tokens, 32)
    if layout.starts_with_clip:
        clip = torch.randn(2, 77, 32)
        torch.testing.assert_close(connector(clip, torch.randn(2, 5, 24), None, 3)[:, :77], clip)


def test_with_clip_puts_clip_before_ellas_queries():
    cfg = load_config(overrides=["model.adapter.kind=ella", "model.adapter.with_clip=true",
                                 "model.adapter.ella.num_latents=8"]).model.adapter
    connector = build_connector(cfg, clip_dim=32, llm_dim=24)
    clip = torch.randn(1, 77, 32)
    context = connector(clip, torch.randn(1, 5, 24), None, 7)
    assert connector.layout is ContextLayout.CLIP_THEN_QUERIES and context.shape == (1, 85, 32)
    torch.testing.assert_close(context[:, :77], clip)


# ---------------------------------------------------------------- ELLA and the timestep


def small_ella(**kwargs) -> TimestepAwareConnector:
    torch.manual_seed(0)
    return TimestepAwareConnector(clip_dim=32, llm_dim=24, width=32, num_blocks=2, num_heads=4, num_latents=8,
                                  time_channels=16, **kwargs)


@pytest.mark.float_sensitive
def test_ellas_output_depends_on_the_timestep_and_needs_one():
    ella = small_ella()
    clip, llm = torch.randn(2, 77, 32), torch.randn(2, 5, 24)
    early, late = ella(clip, llm, None, torch.tensor(999)), ella(clip, llm, None, torch.tensor(10))
    assert (early - late).abs().max() > 1e-3
    per_sample = ella(clip, llm, None, torch.tensor([999, 10]))  # one timestep per sample, as in training
    torch.testing.assert_close(per_sample[0], early[0], **ENCODER_OUTPUT.close)  # batch rows: rounding at most
    torch.testing.assert_close(per_sample[1], late[1], **ENCODER_OUTPUT.close)  # (the other timestep's: > 1e-3)
    with pytest.raises(ValueError, match="needs the denoising timestep"):
        ella(clip, llm)


def test_ellas_adaln_starts_as_plain_layernorm():
    ella = small_ella()
    for block in ella.blocks:
        for norm in (block.query_norm, block.token_norm, block.ffn_norm):
            assert not norm.modulation.weight.any() and not norm.modulation.bias.any()


@pytest.mark.float_sensitive
def test_ella_masks_llm_padding_when_asked():
    ella = small_ella(use_llm_mask=True)
    clip, llm = torch.randn(1, 77, 32), torch.randn(1, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    changed = llm.clone()
    changed[:, 3:] = 100.0  # what padding holds does not reach the output
    torch.testing.assert_close(ella(clip, llm, mask, 5), ella(clip, changed, mask, 5), **ENCODER_OUTPUT.close)


class ConnectorSpy:
    def __init__(self, connector):
        self.calls = []
        connector.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        self.calls.append((args[0].shape[0], torch.as_tensor(timestep).clone()))


def test_sampling_runs_ella_once_per_denoising_step_at_that_steps_timestep(tiny_model_config):
    module = kind_module(tiny_model_config, "ella")
    spy = ConnectorSpy(module.adapter)
    unet_timesteps = []
    module.unet.register_forward_pre_hook(lambda m, args: unet_timesteps.append(torch.as_tensor(args[1]).clone()))
    images = module.generate(["a red circle", "a blue square"], seeds=[0, 1], num_inference_steps=3,
                             guidance_scale=4.0, output_type="np")
    assert len(images) == 2
    setup, per_step = spy.calls[:-3], spy.calls[-3:]
    assert len(unet_timesteps) == 3
    # with guidance, the connector runs on [null prompt; prompts] (4 rows) at the UNet's own timestep
    assert [rows for rows, _ in per_step] == [4, 4, 4]
    assert [int(t) for _, t in per_step] == [int(t) for t in unet_timesteps]
    assert len(set(int(t) for t in unet_timesteps)) == 3
    assert all(rows == 2 for rows, _ in setup)  # the shape-fixing calls before the loop


def test_ella_context_is_recomputed_per_step_not_fixed_at_the_first(tiny_model_config, monkeypatch):
    """Replacing the per-step hook by the fixed first-step context changes the image: the timestep matters."""
    module = kind_module(tiny_model_config, "ella")
    torch.manual_seed(0)
    for block in module.adapter.blocks:  # give the AdaLN modulations weight, as training would
        for norm in (block.query_norm, block.token_norm, block.ffn_norm):
            torch.nn.init.normal_(norm.modulation.weight, std=0.5)
    args = dict(prompts=["a red circle"], seeds=[0], num_inference_steps=3, guidance_scale=4.0, output_type="np")
    per_step = module.generate(**args)
    from llm4gen.pipelines.llm4gen_pipeline import LLMConditioning

    monkeypatch.setattr(LLMConditioning, "per_step_context", lambda self: contextlib.nullcontext())
    fixed = module.generate(**args)
    assert abs(per_step[0] - fixed[0]).max() > 1e-4


def test_cached_and_online_llm_features_give_the_same_ella_loss(tiny_model_config):
    module = kind_module(tiny_model_config, "ella")
    batch = fixed_batch(n=2)
    noise, timesteps = fixed_inputs(module, batch)
    drop = torch.tensor([False, True])
    module.train()
    common = dict(noise=noise, timesteps=timesteps, drop=drop)
    online = module.compute_losses(batch, generator=torch.Generator().manual_seed(1), **common)
    with torch.no_grad():
        features = module.llm(batch.captions)
    cached = dataclasses.replace(batch, llm_features=features.features, llm_mask=features.mask)
    offline = module.compute_losses(cached, generator=torch.Generator().manual_seed(1), **common)
    torch.testing.assert_close(offline.diffusion, online.diffusion, **DIFFUSION_LOSS.close)  # rounding; a sample: 0.16


# ---------------------------------------------------------------- the entity loss per layout


def test_dropping_clips_tokens_keeps_llm_positions_and_masks_words_left_without_tokens():
    membership = torch.zeros(1, 3, 6)
    membership[0, 0, [1, 4]] = 1  # word 0: a CLIP token and an LLM token
    membership[0, 1, [2]] = 1     # word 1: a CLIP token only (past the LLM's length)
    membership[0, 2, [5]] = 1     # word 2: an LLM token
    targets = EntityTargets(membership, torch.ones(1, 3, dtype=torch.bool), torch.tensor([[False, True, True]]),
                            torch.tensor([[[0, 1], [0, 2]]]), torch.ones(1, 2, dtype=torch.bool))
    llm_only = drop_leading_tokens(targets, 3)
    assert llm_only.token_membership.shape == (1, 3, 3)
    assert llm_only.token_membership[0].nonzero().tolist() == [[0, 1], [2, 2]]
    assert llm_only.word_mask.tolist() == [[True, False, True]]
    assert llm_only.pair_mask.tolist() == [[False, True]]  # the pair with the word that lost its tokens


def test_lavi_bridge_trains_with_the_entity_loss_on_llm_tokens(tiny_model_config):
    module = kind_module(tiny_model_config, "lavi_bridge", **{"objective.lambda_entity": 0.5,
                                                              "objective.entity_parser": PARSER})
    batch = fixed_batch(n=2)
    batch = with_entity_targets(module, batch)
    noise, timesteps = fixed_inputs(module, batch)
    module.train()
    terms = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=torch.zeros(2, dtype=torch.bool))
    assert terms.entity_parts is not None and terms.entity_parts.num_pairs > 0
    module.objective(terms).backward()
    assert module.adapter.proj_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides, message", [
    (["model.adapter.kind=ella", "model.objective.lambda_entity=0.1"], "no word positions"),
    (["model.adapter.kind=cam", "model.adapter.with_clip=false"], "use kind=mlp or lavi_bridge"),
    (["model.adapter.kind=ella", "model.adapter.ella.num_heads=5"], "does not divide"),
    (["model.adapter.kind=elle"], "model.adapter.kind"),
])
def test_a_connector_setting_that_cannot_work_is_refused_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_init_from_a_folder_of_another_kind_is_refused(tiny_model_config, tmp_path):
    kind_module(tiny_model_config, "mlp").adapter.save_pretrained(tmp_path / "mlp")
    with pytest.raises(ConfigError, match="holds a MLPConnector.*model.adapter.kind=mlp"):
        load_config(overrides=[f"model.adapter.init_from={tmp_path / 'mlp'}"])
    module = kind_module(tiny_model_config, "mlp", **{"adapter.init_from": str(tmp_path / "mlp")})
    assert type(module.adapter).__name__ == "MLPConnector"


def test_llm_features_reach_the_unet_in_every_kind(tiny_model_config):
    """Changing the LLM's features changes the context in every kind (nothing silently ignores them)."""
    for kind in CONNECTOR_KINDS:
        module = kind_module(tiny_model_config, kind)
        clip = torch.randn(1, 77, module.clip.hidden_size)
        a = LLMFeatures(torch.randn(1, module.cfg.llm.max_length, module.llm.hidden_size),
                        torch.ones(1, module.cfg.llm.max_length, dtype=torch.bool))
        b = LLMFeatures(a.features + 1.0, a.mask)
        t = torch.tensor([500])
        assert (module.fuse(clip, a, t) - module.fuse(clip, b, t)).abs().max() > 1e-4, kind


@pytest.mark.parametrize("kind", ["mlp", "lavi_bridge", "ella"])
def test_every_kind_trains_and_samples_on_sdxl(kind):
    """SDXL: the connector works at both CLIP encoders' width; the pooled embedding and time ids stay CLIP's."""
    from omegaconf import OmegaConf

    sdxl = OmegaConf.to_container(load_config("configs/tiny_sdxl.yaml").model, resolve=True)
    module = kind_module(sdxl, kind)
    assert module.adapter.config.clip_dim == module.unet.config.cross_attention_dim
    batch = fixed_batch(n=2)
    module.train()
    terms = module.compute_losses(batch, drop=torch.zeros(2, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    module.objective(terms).backward()
    assert all(p.grad is not None and p.grad.any() for p in module.adapter.parameters())
    images = module.generate(["a red circle"], seeds=[0], num_inference_steps=2, guidance_scale=3.0, output_type="np")
    assert images.shape[0] == 1 and torch.isfinite(torch.as_tensor(images)).all()
