"""Parameter groups (model.optim.lr for the CAM, unet_lr / unet_weight_decay / unet_start_step for the UNet):
the optimizer holds them with their own rates, the UNet stays put until its start step, and a resumed run
continues them bitwise."""

import pytest
import torch

from llm4gen.cli import train
from llm4gen.configs.schema import OptimConfig
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.lightning_modules.optimization import hold_back, parameter_groups, schedule_factor
from tests.helpers.modules import make_module


def optim(**values):
    base = dict(lr=1e-3, weight_decay=0.01, unet_lr=None, unet_weight_decay=None, unet_start_step=0,
                scheduler="constant_with_warmup", warmup_steps=2)
    return OptimConfig(**{**base, **values})


def test_groups_split_by_name_and_take_their_own_settings():
    named = [("adapter.q.weight", torch.nn.Parameter(torch.zeros(2))), ("unet.conv.weight", torch.nn.Parameter(torch.zeros(3))),
             ("vae.frozen", torch.nn.Parameter(torch.zeros(1), requires_grad=False))]
    groups = parameter_groups(named, optim(unet_lr=2e-5, unet_weight_decay=0.0, unet_start_step=5))
    assert [(g["name"], g["lr"], g["weight_decay"], g["start_step"], len(g["params"])) for g in groups] == [
        ("adapter", 1e-3, 0.01, 0, 1), ("unet", 2e-5, 0.0, 5, 1)]
    defaulted = parameter_groups(named, optim())
    assert [(g["lr"], g["weight_decay"]) for g in defaulted] == [(1e-3, 0.01), (1e-3, 0.01)]
    assert [g["name"] for g in parameter_groups(named[:1], optim())] == ["adapter"]  # an empty group is left out


def test_a_group_schedule_is_zero_before_its_start_and_the_shape_counted_from_there():
    plain = schedule_factor("constant_with_warmup", warmup_steps=2, total_steps=10)
    late = schedule_factor("constant_with_warmup", warmup_steps=2, total_steps=10, start_step=4)
    assert [plain(s) for s in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert [late(s) for s in range(8)] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    cosine = schedule_factor("cosine", warmup_steps=0, total_steps=10, start_step=6)
    assert cosine(5) == 0.0 and cosine(6) == 1.0 and cosine(8) == pytest.approx(0.5)  # cosine over the 4 steps left


def test_hold_back_drops_the_gradients_of_a_group_that_has_not_started():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [a], "start_step": 0}, {"params": [b], "start_step": 3}], lr=0.1)
    for step in range(4):
        (a.sum() + b.sum()).backward()
        hold_back(optimizer, step)
        assert (b.grad is None) == (step < 3)
        optimizer.step()
        optimizer.zero_grad()
        if step < 3:
            assert torch.equal(b, torch.ones(2)) and b not in optimizer.state  # no move, no moments
    assert not torch.equal(b, torch.ones(2)) and optimizer.state[b]["step"] == 1


def test_the_module_optimizer_holds_both_groups_at_their_rates(tiny_model_config):
    module = make_module(tiny_model_config, unet_training="full", **{"optim.unet_lr": 2e-5, "optim.unet_start_step": 3})

    class FakeTrainer:
        max_steps = 10

    module._trainer = FakeTrainer()
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {id(p) for p in groups["unet"]["params"]} == {id(p) for p in module.unet.parameters()}
    assert {id(p) for p in groups["adapter"]["params"]} == {id(p) for p in module.adapter.parameters()}
    assert scheduler.base_lrs == [module.cfg.optim.lr, 2e-5]
    assert groups["unet"]["lr"] == 0.0 and groups["adapter"]["lr"] == 0.0  # warmup starts at 0 for both


def test_print_config_lists_the_groups(capsys):
    assert train.main(["--print-config", "model.unet_training=full", "model.optim.unet_lr=2e-5",
                       "model.optim.unet_start_step=100"]) == 0
    printed = capsys.readouterr().out
    assert "unet_lr: 2.0e-05" in printed and "unet_start_step: 100" in printed and "unet_weight_decay: null" in printed


FAST = ["validation.every_n_steps=0", "validation.at_start=false", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "data.batch_size=4", "model.base.pretrained=embedded:tiny-sd",
        "model.unet_training=full", "model.optim.lr=1e-3", "model.optim.unet_lr=3e-4", "model.optim.warmup_steps=1",
        "model.optim.unet_start_step=2", "model.optim.unet_weight_decay=0.0", "model.ema.enabled=true",
        "checkpoint.every_n_steps=2", "data.synthetic_if_missing=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    write_synthetic_shards(str(root / "shards"), num_samples=32, samples_per_shard=16)
    common = [f"data.shards={root / 'shards'}", *FAST]
    assert train.main([f"output_dir={root / 'straight'}", "trainer.max_steps=4", *common]) == 0
    assert train.main([f"output_dir={root / 'resumed'}", "trainer.max_steps=2", *common]) == 0
    assert train.main([f"output_dir={root / 'resumed'}", "trainer.max_steps=4", *common]) == 0
    return root


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_the_unet_waits_for_its_start_step_then_trains_at_its_own_rate(runs, tiny_model_config):
    base = make_module(tiny_model_config).unet.state_dict()
    at_start = load(runs / "straight" / "checkpoints" / "step=0000002.ckpt")
    end = load(runs / "straight" / "checkpoints" / "last.ckpt")
    unet_at_start = {k[len("unet."):]: v for k, v in at_start["state_dict"].items() if k.startswith("unet.")}
    assert unet_at_start.keys() == base.keys()
    assert all(torch.equal(unet_at_start[k], base[k]) for k in base)  # two CAM-only steps: the UNet as loaded
    assert any(not torch.equal(end["state_dict"][f"unet.{k}"], base[k]) for k in base)
    groups = at_start["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["start_step"], g["weight_decay"]) for g in groups] == [("adapter", 0, 0.01), ("unet", 2, 0.0)]
    held = set(groups[1]["params"])
    assert held and not held & set(at_start["optimizer_states"][0]["state"])  # no moments for the UNet yet
    rates = end["lr_schedulers"][0]["_last_lr"]
    assert rates == [pytest.approx(1e-3), pytest.approx(3e-4)]


@pytest.mark.slow
def test_a_resumed_run_continues_the_groups_bitwise(runs):
    straight = load(runs / "straight" / "checkpoints" / "last.ckpt")
    resumed = load(runs / "resumed" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 4
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])
    a, b = straight["optimizer_states"][0], resumed["optimizer_states"][0]
    assert [{k: v for k, v in g.items()} for g in a["param_groups"]] == [{k: v for k, v in g.items()} for g in b["param_groups"]]
    assert all(torch.equal(a["state"][i][m], b["state"][i][m]) for i in a["state"] for m in ("exp_avg", "exp_avg_sq"))
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    ema_a, ema_b = straight["ema"]["shadow_params"], resumed["ema"]["shadow_params"]
    assert all(torch.equal(x, y) for x, y in zip(ema_a, ema_b))
