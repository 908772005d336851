"""Per-word attention maps (pure functions) and the attention_maps.py command on a tiny checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image

from llm4gen.adapters.layout import ContextLayout
from llm4gen.cli import attention_maps
from llm4gen.datamodules.batch import Batch
from llm4gen.losses.attention_maps import (
    LABEL_HEIGHT,
    average_attention,
    colorize,
    layer_grid,
    panel,
    positions_in_context,
    render_attention_panels,
    word_maps,
)
from llm4gen.losses.entity import word_attention_maps
from llm4gen.losses.entity_parser import EntityParser, entity_words

PROMPT = "a red circle and a blue square"


def random_probs(batch, pixels, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, pixels, tokens, generator=g).softmax(-1)  # (batch, pixels, tokens)


# ---- pure functions ------------------------------------------------------------------------------


def test_layer_grid_restores_the_row_major_layout():
    probs = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # (batch, 2x3 pixels, tokens)
    grid = layer_grid(probs, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    assert grid[1, 2, 1, 0] == probs[1, 3, 2]  # pixel (row 1, col 0) is flat index 3
    with pytest.raises(ValueError, match="6 pixels.*2x2 = 4"):
        layer_grid(probs, (2, 2))


def test_average_attention_upsamples_layers_and_averages_steps():
    sides = {"fine": (4, 4), "coarse": (2, 2)}
    steps = [{"fine": random_probs(1, 16, 5, seed), "coarse": random_probs(1, 4, 5, seed + 10)} for seed in range(3)]
    attention = average_attention(steps, sides)
    assert attention.shape == (1, 5, 4, 4)  # (batch, tokens, H, W) at the largest side
    torch.testing.assert_close(attention.sum(1), torch.ones(1, 4, 4))  # still a distribution per pixel
    # a layer already at the common size enters unchanged
    only_fine = average_attention([{"fine": s["fine"]} for s in steps], sides)
    expected = torch.stack([layer_grid(s["fine"], (4, 4)) for s in steps]).mean(0)
    torch.testing.assert_close(only_fine, expected)
    # a constant coarse map stays constant after upsampling
    constant = torch.full((1, 4, 5), 0.2)
    torch.testing.assert_close(average_attention([{"coarse": constant}], sides, size=(8, 8)), torch.full((1, 5, 8, 8), 0.2))


def test_average_attention_refuses_empty_or_unknown_layers():
    with pytest.raises(ValueError, match="no attention maps were captured"):
        average_attention([{}, {}], {"a": (2, 2)})
    with pytest.raises(ValueError, match=r"no feature-map side for captured layers \['b'\]"):
        average_attention([{"b": random_probs(1, 4, 3)}], {"a": (2, 2)})


def test_word_maps_sum_to_one_and_match_the_entity_loss_maps():
    attention = average_attention([{"l": random_probs(1, 16, 6)}], {"l": (4, 4)})[0]  # (tokens, 4, 4)
    positions = [[1], [2, 4], [5]]
    maps = word_maps(attention, positions)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(3))
    membership = torch.zeros(1, 3, 6)
    membership[0, 0, 1] = membership[0, 1, 2] = membership[0, 1, 4] = membership[0, 2, 5] = 1
    loss_maps = word_attention_maps(attention.reshape(6, 16).T[None], membership)[0]  # (words, pixels)
    torch.testing.assert_close(maps.reshape(3, 16), loss_maps)
    with pytest.raises(ValueError, match="word 1 has no token position"):
        word_maps(attention, [[1], []])
    with pytest.raises(ValueError, match=r"word 0 has token positions \[6\] outside \[0, 6\)"):
        word_maps(attention, [[6]])


def test_colorize_runs_dark_to_bright():
    rgb = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    brightness = rgb.astype(int).sum(-1)[0]
    assert brightness[0] < brightness[1] < brightness[2]


def test_render_attention_panels_layout_and_distinct_panels():
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # word 0 attends top-left, word 1 bottom-right
    maps[1, 3, 3] = 1.0
    canvas = render_attention_panels(image, maps, ["red", "circle"], panel_size=64)
    assert canvas.size == (3 * 64, 64 + LABEL_HEIGHT)
    first, second = np.asarray(panel(canvas, 1, 64)), np.asarray(panel(canvas, 2, 64))
    assert not np.array_equal(first, second)
    assert first[:8, :8].sum() > first[-8:, -8:].sum()  # bright where the word attends
    assert second[-8:, -8:].sum() > second[:8, :8].sum()
    assert np.array_equal(np.asarray(panel(canvas, 0, 64))[5, 5], [200, 10, 10])
    with pytest.raises(ValueError, match="one label per word"):
        render_attention_panels(image, maps, ["red"])


def test_parse_layers():
    assert attention_maps.parse_layers("all") == "all"
    assert attention_maps.parse_layers("16,32") == [16, 32]
    from llm4gen.configs.errors import UserError

    with pytest.raises(UserError, match="comma-separated feature-map sides"):
        attention_maps.parse_layers("low")


# ---- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_config):
    """A real Lightning checkpoint of the tiny default trained one step with the entity loss on (so the
    loaded module already has an attention store)."""
    import lightning as L

    from tests.helpers.modules import make_module, with_entity_targets

    torch.manual_seed(0)
    module = make_module(tiny_model_config, **{"objective.lambda_entity": 0.5, "optim.warmup_steps": 0})
    captions = [PROMPT, "a green triangle on a yellow background"]
    batch = with_entity_targets(module, Batch(captions=captions, pixel_values=torch.rand(2, 3, 32, 32) * 2 - 1),
                                module.cfg.objective.entity_parser)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def prompt_words(prompt):
    return [w.text for w in entity_words(EntityParser().parse(prompt))]


@pytest.mark.parametrize("layers", [None, "all"])
@pytest.mark.slow
def test_command_writes_image_and_one_panel_per_word(checkpoint, tmp_path, capsys, layers):
    output = tmp_path / "maps.png"
    argv = ["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--output", str(output), "--steps", "3",
            "--panel-size", "96", "--device", "cpu"] + (["--layers", layers] if layers else [])
    assert attention_maps.main(argv) == 0
    words = prompt_words(PROMPT)
    assert sorted(words) == ["blue", "circle", "red", "square"]
    assert output.is_file()
    canvas = Image.open(output)
    assert canvas.size == ((1 + len(words)) * 96, 96 + LABEL_HEIGHT)
    panels = [np.asarray(panel(canvas, i, 96)) for i in range(1 + len(words))]
    for i in range(len(panels)):
        for j in range(i + 1, len(panels)):
            assert not np.array_equal(panels[i], panels[j]), f"panels {i} and {j} are identical"
    report = capsys.readouterr().out
    assert "3 steps x " + ("4 layers" if layers is None else "7 layers") in report  # tiny: 4 lowest, 7 in all


@pytest.mark.slow
def test_command_refuses_bad_arguments(checkpoint, tmp_path, capsys):
    base = ["--prompt", PROMPT, "--output", str(tmp_path / "x.png")]
    assert attention_maps.main(["--checkpoint", str(tmp_path / "missing.ckpt"), *base]) == 2
    assert "missing.ckpt' does not exist" in capsys.readouterr().err
    assert attention_maps.main(["--checkpoint", str(checkpoint), *base, "--layers", "nope"]) == 2
    assert "--layers 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_word_positions_follow_the_connectors_context_layout():
    fused = [5, 80, 81]  # a word's CLIP token and two LLM tokens in the fused [77 CLIP, LLM] sequence
    assert positions_in_context(fused, ContextLayout.CLIP_THEN_LLM, 77) == [5, 80, 81]  # the CAM, the MLP
    assert positions_in_context(fused, ContextLayout.LLM, 77) == [3, 4]  # LaVi-Bridge: LLM tokens from 0
    assert positions_in_context(fused, ContextLayout.CLIP_THEN_QUERIES, 77) == [5]  # ELLA after CLIP
    assert positions_in_context(fused, None, 77) == [5]  # the base: CLIP alone
    with pytest.raises(ValueError, match="no word positions"):
        positions_in_context(fused, ContextLayout.QUERIES, 77)
