"""What a training run prints: no known-harmless library notice (while a real warning still shows), steps
in the progress bar of a step-limited run, the parts table, one line per validation, and the quiet and
verbose levels; grids in rows with each prompt and the analyzer's verdict under its image."""

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from llm4gen.datamodules.synthetic import ensure_synthetic_shards
from llm4gen.evaluation.prompt_sets import prompt_set
from llm4gen.lightning_modules.callbacks import GRID_COLUMNS, GRID_SIDE, ValidationImages
from llm4gen.lightning_modules.console import StepProgressBar, parts_table
from llm4gen.noise import KNOWN_NOISE, filter_known_noise, is_noise
from llm4gen.shapes.world import render_scene
from tests.helpers.modules import make_module

REPO_ROOT = Path(__file__).resolve().parents[2]
DELIBERATE = "a deliberate warning that must still show"
SCRIPT = textwrap.dedent(f"""
    import sys, warnings
    from llm4gen.cli import train
    build = train.build_datamodule
    def noisy(cfg):
        warnings.warn("{DELIBERATE}", UserWarning)
        return build(cfg)
    train.build_datamodule = noisy
    sys.exit(train.main(sys.argv[1:]))
""")


# The validation line reads the same over one prompt per list as over the default 16 + 16, at a 16th of the sampling.
ONE_PROMPT_EACH = ("validation.prompts=[a small green triangle and a small purple circle]",
                   "validation.seen_prompts=[a large orange circle and a large yellow square]")


def run_train(tmp_path: Path, *levels: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """A 3-step default run per tuple of flags (validating one prompt per list), side by side (each is mostly its
    imports: one core apiece)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ensure_synthetic_shards(str(tmp_path / "data"))  # what train.py would write, once, before the runs share it
    running = []
    for args in levels:
        name = "-".join(a.strip("-") for a in args) or "default"
        running.append(subprocess.Popen(
            [sys.executable, str(script), *args, f"output_dir={tmp_path / name}", f"data.shards={tmp_path / 'data'}",
             "trainer.max_steps=3", "validation.every_n_steps=3", "validation.at_start=false", *ONE_PROMPT_EACH,
             "checkpoint.every_n_steps=3"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}))  # three 2-thread processes on 2 cores take twice as long
    finished = []
    for process in running:
        out, err = process.communicate(timeout=600)
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return finished


def noise_in(text: str) -> list[str]:
    return [n.pattern for n in KNOWN_NOISE if re.search(n.pattern, text)]


@pytest.mark.slow
def test_a_default_run_prints_no_known_noise_but_a_real_warning_and_reads_like_a_tool(tmp_path):
    verbose, result, quiet = run_train(tmp_path, ("--verbose",), (), ("--quiet",))
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    # without the filter the notices are there (so the check below can fail): Lightning's eval-mode warning,
    # its cloud tip and diffusers' import-time torchvision notices
    assert len(noise_in(verbose.stderr + verbose.stdout)) >= 3, verbose.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert noise_in(result.stderr + result.stdout) == [], result.stderr
    assert DELIBERATE in result.stderr
    out = result.stdout
    assert "/-2" not in out and re.search(r"step 3/3", out)
    assert re.search(r"^model: [\d.]+ M parameters, [\d.]+ K trained$", out, flags=re.M)
    assert re.search(r"^  adapter\s+CrossAdapter\s+[\d.]+ K\s+trains$", out, flags=re.M)
    assert "FLOPs" not in out and "Loading weights" not in result.stderr
    assert re.search(r"^validation at step 3: binding \d\.\d{3}, one object right \d\.\d{3}; seen: binding", out,
                     flags=re.M)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "model:" not in quiet.stdout and "validation at step" not in quiet.stdout and "━" not in quiet.stdout
    assert "GPU available" not in quiet.stderr and "run folder:" in quiet.stdout and DELIBERATE in quiet.stderr


def test_the_filter_drops_each_known_notice_and_nothing_else():
    import logging

    assert all(is_noise(text) for text in (
        "Found 580 module(s) in eval mode at the start of training. This may lead to ...",
        "The `srun` command is available on your system but is not used. HINT: ...",
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)",
        "`SiglipImageProcessor` requires torchvision (not installed); falling back to `SiglipImageProcessorPil`"))
    assert not is_noise("Found 3 NaN values in the loss") and not is_noise("a deliberate warning")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers.utils.import_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        filter_known_noise()
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logger.warning("a real transformers warning")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            filter_known_noise()
            warnings.warn("Found 12 module(s) in eval mode at the start of training.")
            warnings.warn(DELIBERATE)
        assert [str(w.message) for w in caught] == [DELIBERATE]
    finally:
        logger.removeHandler(handler)
    assert records == ["a real transformers warning"]


def test_the_bar_counts_steps_in_a_step_limited_run_and_epochs_otherwise():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=300, global_step=120, max_epochs=-1)
    assert bar._get_train_description(4).strip() == "step 120/300"
    bar._trainer = SimpleNamespace(max_steps=-1, global_step=120, max_epochs=10)
    assert bar._get_train_description(4).strip() == "epoch 4/9"


def test_the_parts_table_names_each_part_its_size_and_whether_it_trains(tiny_model_config):
    table = parts_table(make_module(tiny_model_config)).splitlines()
    assert re.match(r"model: [\d.]+ M parameters, [\d.]+ K trained", table[0])
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["adapter"][1] == "CrossAdapter" and rows["adapter"][-1] == "trains"
    assert rows["unet"][-1] == rows["vae"][-1] == rows["llm"][-1] == "frozen"


def test_a_validation_grid_is_rows_of_labelled_upscaled_images_with_the_analyzers_verdict():
    records = [prompt_set("seen_2", 1)[0], prompt_set("seen_1", 1)[0]] * 3  # 6 images: two rows of 4
    images = [render_scene(r.scene, 32) for r in records]  # drawn exactly as asked
    prompts = [r.text for r in records]
    callback = ValidationImages("unused", prompts, seed=0, every_n_steps=1, num_inference_steps=1,
                                guidance_scale=1.0, scheduler="DDIMScheduler", metrics=["shapes"])
    callback.scorer.load()
    marks = callback.scorer.marks(images, prompts)
    assert marks[:2] == ["bound 2/2", "bound 1/1"]
    grid = callback.grid(images, prompts)
    columns, rows = GRID_COLUMNS, 2
    assert grid.width % columns == 0 and grid.width // columns >= GRID_SIDE
    cell_h = grid.height // rows
    assert cell_h > GRID_SIDE + 30  # room for the verdict and the wrapped prompt under each image
    first = grid.crop((6, 4, 6 + GRID_SIDE, 4 + GRID_SIDE))
    assert first.resize((32, 32), Image.NEAREST).tobytes() == images[0].convert("RGB").tobytes()  # nearest, not blurred
    text_band = grid.crop((6, 4 + GRID_SIDE + 4, 6 + GRID_SIDE, cell_h - 2)).convert("L")
    assert min(text_band.getdata()) < 80  # ink under the image
