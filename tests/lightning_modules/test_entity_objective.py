"""The entity-guided regularization inside LLM4GenModule.compute_losses (tiny default, fp32, CPU).

Gradient routing (CAM only), exact equality with the baseline when lambda_entity = 0, an unchanged
diffusion term when it is on, the timestep window and dropped captions, and that the CAM can actually
lower the loss on a fixed batch of synthetic captions.
"""

import dataclasses

import pytest
import torch

from llm4gen.datamodules.batch import Batch
from llm4gen.losses.entity import build_entity_targets_from_captions
from llm4gen.losses.entity_parser import groups_from_json
from tests.helpers.modules import make_module, synthetic_captions, with_entity_targets
from tests.helpers.tolerances import DIFFUSION_LOSS

pytestmark = [pytest.mark.slow]

LN2 = 0.6931471805599453






def entity_batch(module, n: int = 4, seed: int = 0) -> Batch:
    """Synthetic captions with their parses and entity targets, as the data workers make them for ``module``'s
    tokenizers (every module here has the tiny default's)."""
    captions = synthetic_captions(n, seed)
    g = torch.Generator().manual_seed(seed)
    return with_entity_targets(module, Batch(captions=captions, pixel_values=torch.rand(n, 3, 32, 32, generator=g) * 2 - 1))


def fixed_inputs(n: int, seed: int = 0, timesteps: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4, 16, 16, generator=g)  # (batch, 4, 16, 16): tiny latents
    t = torch.tensor(timesteps) if timesteps is not None else torch.randint(100, 900, (n,), generator=g)
    return noise, t


def step(module, batch, noise, timesteps, drop):
    """One loss + backward with everything random fixed; returns (losses, trainable grads by name)."""
    module.train()
    module.zero_grad(set_to_none=True)
    losses = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=drop,
                                   generator=torch.Generator().manual_seed(1))
    module.objective(losses).backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return losses, grads


def build(tiny_model_config, **overrides):
    torch.manual_seed(0)  # identical CAM initialisation in every module built here
    return make_module(tiny_model_config, **overrides)


def pair_counts(module, batch) -> list[int]:
    """(attribute, entity) pairs of each caption, as the module's targets count them."""
    captions = batch.captions
    groups = [groups_from_json(parsed, caption) for parsed, caption in zip(batch.entities, captions)]
    targets = build_entity_targets_from_captions(
        captions, groups, module.clip.tokenizer, module.llm.tokenizer, clip_max_length=77,
        llm_max_length=module.cfg.llm.max_length, llm_prefix=module.cfg.llm.prefix)
    return targets.pair_mask.sum(1).tolist()


@pytest.fixture(scope="module")
def baseline(tiny_model_config):
    return build(tiny_model_config)


@pytest.fixture(scope="module")
def with_entity(tiny_model_config):
    return build(tiny_model_config, **{"objective.lambda_entity": 0.5})


def test_entity_gradient_reaches_the_cam_and_not_the_frozen_unet(tiny_model_config):
    module = build(tiny_model_config, **{"objective.lambda_entity": 1.0})
    batch = entity_batch(module)
    noise, timesteps = fixed_inputs(4)
    module.train()
    losses = module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=torch.zeros(4, dtype=torch.bool),
                                   generator=torch.Generator().manual_seed(1))
    assert losses.entity_parts.num_pairs > 0
    losses.entity.backward()  # the entity term alone
    adapter_grads = [p.grad for p in module.adapter.parameters()]
    assert all(g is not None for g in adapter_grads)
    assert sum(g.abs().sum().item() for g in adapter_grads) > 0
    assert all(p.grad is None for p in module.unet.parameters())
    assert all(p.grad is None for p in module.clip.parameters())
    assert all(p.grad is None for p in module.llm.parameters())


def test_lambda_zero_is_exactly_the_baseline(tiny_model_config, baseline):
    off = build(tiny_model_config, **{"objective.lambda_entity": 0.0})
    assert off.attention_store is None
    batch = entity_batch(baseline)
    noise, timesteps = fixed_inputs(4)
    drop = torch.tensor([False, True, False, False])
    base_losses, base_grads = step(baseline, batch, noise, timesteps, drop)
    off_losses, off_grads = step(off, batch, noise, timesteps, drop)
    assert off_losses.entity_parts is None and off_losses.entity.item() == 0  # no entity work at all with lambda 0
    assert torch.equal(off.objective(off_losses), baseline.objective(base_losses))
    assert base_grads.keys() == off_grads.keys()
    assert all(torch.equal(off_grads[n], base_grads[n]) for n in base_grads)


def test_entity_on_keeps_the_diffusion_term_and_adds_lambda_times_entity(baseline, with_entity):
    batch = entity_batch(with_entity)
    noise, timesteps = fixed_inputs(4)
    drop = torch.zeros(4, dtype=torch.bool)
    base_losses, _ = step(baseline, batch, noise, timesteps, drop)
    losses, grads = step(with_entity, batch, noise, timesteps, drop)
    # the capturing processor computes what the fused kernel does: the same diffusion loss, rounding apart
    # (DIFFUSION_LOSS, 1e-5; measured up to 1.2e-7), where a padded key let into the softmax moves the UNet by 6.8e-3
    torch.testing.assert_close(losses.diffusion, base_losses.diffusion, **DIFFUSION_LOSS.close)
    assert losses.entity.item() > 0
    torch.testing.assert_close(with_entity.objective(losses), losses.diffusion + 0.5 * losses.entity, atol=1e-7, rtol=0)
    torch.testing.assert_close(losses.entity, losses.entity_parts.positive + losses.entity_parts.negative)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_store_is_disabled_outside_the_step(with_entity):
    batch = entity_batch(with_entity, 2)
    noise, timesteps = fixed_inputs(2)
    step(with_entity, batch, noise, timesteps, torch.zeros(2, dtype=torch.bool))
    assert not with_entity.attention_store.enabled
    # a batch without entity targets: no capture, no entity terms
    plain = dataclasses.replace(batch, entities=None, entity_targets=None)
    losses, _ = step(with_entity, plain, noise, timesteps, torch.zeros(2, dtype=torch.bool))
    assert losses.entity_parts is None and losses.entity.item() == 0.0
    assert set(losses.logs()) == {"diffusion"}


@pytest.fixture
def windowed(with_entity):
    """with_entity, its entity loss restricted to timesteps [200, 600) for one test (the window is read
    from the config at every step)."""
    objective = with_entity.cfg.objective
    default = list(objective.entity_timesteps)
    objective.entity_timesteps = [200, 600]
    yield with_entity
    objective.entity_timesteps = default


def test_timestep_window_and_dropped_captions_mask_pairs(windowed):
    module = windowed
    batch = entity_batch(module, 4)
    counts = pair_counts(module, batch)
    assert all(c > 0 for c in counts), counts
    noise, _ = fixed_inputs(4)
    none_dropped = torch.zeros(4, dtype=torch.bool)

    # window [200, 600): 199 and 600 are outside, 200 and 599 inside
    timesteps = torch.tensor([199, 200, 599, 600])
    losses, _ = step(module, batch, noise, timesteps, none_dropped)
    assert losses.entity_parts.num_pairs == counts[1] + counts[2]

    drop = torch.tensor([False, True, False, False])
    losses, _ = step(module, batch, noise, timesteps, drop)
    assert losses.entity_parts.num_pairs == counts[2]

    # nothing applies: the entity terms are exactly 0, the loss is the diffusion term, backward still works
    losses, grads = step(module, batch, noise, torch.tensor([0, 100, 700, 999]), none_dropped)
    assert losses.entity_parts.num_pairs == 0
    assert losses.entity.item() == 0.0
    assert torch.equal(module.objective(losses), losses.diffusion)

    # the default window [0, 1000) takes every pair of every kept caption
    module.cfg.objective.entity_timesteps = [0, 1000]
    losses, _ = step(module, batch, noise, timesteps, torch.tensor([True, False, False, True]))
    assert losses.entity_parts.num_pairs == counts[1] + counts[2]


def test_optimizing_the_cam_against_the_entity_loss_binds_attributes(tiny_model_config):
    """The CAM alone can lower the entity loss by >= 30% on a fixed batch of synthetic captions.

    What is reachable: the CLIP half of the context (positions 0..76) passes the CAM untouched, so only
    the LLM tokens' keys and values, hence their share of each pixel's attention, can move. A word's map
    sums its CLIP and its LLM tokens' probabilities, and the CLIP part is fixed by the frozen UNet and
    CLIP: the loss cannot reach 0, its floor is set by the CLIP half. The CAM lowers it by making
    each word's LLM tokens grab attention on their own pixels.

    Where it starts: the random tiny UNet attends almost uniformly, so at initialisation every word's
    map is nearly the same. The positive term JS(attribute, its entity) is then already at its floor
    (~1e-4) and the negative term ln2 - JS(attribute, other entity) at its ceiling (ln 2): the loss can
    only fall by separating maps. Separation costs a little positive JS (attribute and entity are
    different words with their own LLM tokens), so the positive term does not fall below its starting
    value during phase 1; what shows the binding is that attributes end far closer to their own entity
    than to the caption's other entities. Phase 2 then checks that the positive term's pull works
    from the separated state: optimising it alone brings attributes back onto their entities while
    the separation from the other entities stays.
    """
    module = build(tiny_model_config, **{"objective.lambda_entity": 1.0})
    batch = entity_batch(module, 2)
    noise, timesteps = fixed_inputs(2)
    drop = torch.zeros(2, dtype=torch.bool)
    module.train()

    def losses():
        return module.compute_losses(batch, noise=noise, timesteps=timesteps, drop=drop,
                                     generator=torch.Generator().manual_seed(1))

    def optimize(key, lr, max_steps, done):
        """Adam steps on key(losses()) until done(losses) holds; returns (steps taken, last losses)."""
        optimizer = torch.optim.Adam(module.trainable_parameters(), lr=lr)
        for steps in range(max_steps + 1):
            out = losses()
            if done(out) or steps == max_steps:
                return steps, out
            optimizer.zero_grad(set_to_none=True)
            key(out).backward()
            optimizer.step()

    with torch.no_grad():
        start = losses()
    assert start.entity_parts.num_pairs > 0
    start_total = start.entity.item()
    # at initialisation the maps are indistinguishable: own entity and other entities alike
    assert start.entity_parts.positive.item() < 1e-3 and LN2 - start.entity_parts.negative.item() < 1e-3

    steps, end = optimize(lambda t: t.entity, 3e-3, 300, lambda out: out.entity.item() <= 0.7 * start_total)
    print(f"entity loss {start_total:.4f} -> {end.entity.item():.4f} in {steps} steps; positive "
          f"{start.entity_parts.positive.item():.5f} -> {end.entity_parts.positive.item():.5f}")
    assert end.entity.item() <= 0.7 * start_total, f"only reached {end.entity.item():.4f} from {start_total:.4f}"
    other_js = LN2 - end.entity_parts.negative.item()  # divergence of attributes from the other entities
    assert end.entity_parts.positive.item() < 0.1 * other_js, (end.entity_parts.positive.item(), other_js)

    positive_before = end.entity_parts.positive.item()
    steps, pulled = optimize(lambda t: t.entity_parts.positive, 1e-3, 60,
                             lambda out: out.entity_parts.positive.item() <= 0.5 * positive_before)
    print(f"positive alone: {positive_before:.5f} -> {pulled.entity_parts.positive.item():.5f} in {steps} steps")
    assert pulled.entity_parts.positive.item() <= 0.5 * positive_before
    assert LN2 - pulled.entity_parts.negative.item() >= 0.8 * other_js  # attributes stay off the other entities


def test_the_logged_training_loss_is_diffusion_plus_lambda_times_entity(tiny_model_config, tmp_path):
    """One real Lightning training step: what the logger shows as train/loss is the objective
    L_diffusion + lambda_entity * L_entity, computed from the logged terms."""
    import lightning as L
    from torch.utils.data import DataLoader

    module = build(tiny_model_config, **{"objective.lambda_entity": 0.25, "objective.caption_dropout": 0.0})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader([entity_batch(module)], batch_size=None))
    logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert logged["train/entity_pairs"] > 0 and logged["train/entity"] > 0
    assert logged["train/loss"] == pytest.approx(logged["train/diffusion"] + 0.25 * logged["train/entity"], abs=1e-6)
    assert logged["train/entity"] == pytest.approx(logged["train/entity_positive"] + logged["train/entity_negative"],
                                                   abs=1e-6)
