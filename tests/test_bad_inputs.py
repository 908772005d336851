"""Bad input at every entry point, as a new user types it: one paragraph naming the bad value, exit code 2,
no traceback, and nothing loaded or started first.

Every case runs in-process through the entry point's own ``main`` (the same ``configs.errors.entry_point``
wrapper a shell invocation goes through), with anything that would load weights, train, submit or write
shards replaced by a tripwire. One case per entry point (and each example of issue 14) also runs as a real
subprocess, where the exit code, the absence of a traceback and the CPU time (< 15 s: no weights load) are
measured on the process itself: at most ``SLACK_SECONDS`` above what importing Lightning costs on the same
machine (the config check reads Lightning's Trainer signature; no weights load, no data is read). Wall times
on a quiet machine: ``python bench/bench_bad_inputs.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SLACK_SECONDS = 6.0  # CPU seconds a refusal may spend beyond importing Lightning


def cpu_seconds_of(command: list[str], cwd: Path, timeout_s: float = 180) -> tuple[float, subprocess.CompletedProcess]:
    """Runs ``command``; returns the CPU seconds (user + system) that process alone used (waiting for a core on a
    shared machine is not work), read from its own ``wait4`` record, so several can run side by side."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        while (waited := os.wait4(process.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise AssertionError(f"{command} ran past {timeout_s} s")
            time.sleep(0.05)
        _, status, usage = waited
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    return usage.ru_utime + usage.ru_stime, result


@pytest.fixture(scope="module")
def import_seconds() -> float:
    """What importing the training stack (Lightning, and with it torch) costs a process on this machine."""
    seconds, result = cpu_seconds_of([sys.executable, "-c", "import lightning, omegaconf"], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return seconds


# ---------------------------------------------------------------- files the cases point at


def write_case_files(root: Path) -> dict[str, str]:
    """Writes the files the cases point at into ``root``; returns the {placeholder} -> path table."""
    from omegaconf import OmegaConf

    from llm4gen.configs.schema import load_config

    paths = {"tmp": str(root)}
    (root / "notes.txt").write_text("not a checkpoint\n")
    paths["garbage"] = str(root / "notes.txt")
    (root / "empty.ckpt").write_bytes(b"")
    paths["empty"] = str(root / "empty.ckpt")
    torch.save({"weights": torch.zeros(2048)}, root / "weights.pt")
    paths["torchfile"] = str(root / "weights.pt")
    data = (root / "weights.pt").read_bytes()
    (root / "cut.ckpt").write_bytes(data[: len(data) // 2])
    paths["truncated"] = str(root / "cut.ckpt")
    # An LLM4GEN checkpoint of another configuration (two CAM blocks where the default has one).
    model = OmegaConf.to_container(load_config(overrides=["model.adapter.num_blocks=2"]).model, resolve=True)
    torch.save({"state_dict": {"adapter.blocks.0.q_proj.weight": torch.zeros(1)},
                "hyper_parameters": {"model": model, "seed": 0}}, root / "two-blocks.ckpt")
    paths["other_config"] = str(root / "two-blocks.ckpt")
    (root / "empty-dir").mkdir()
    paths["empty_dir"] = str(root / "empty-dir")
    (root / "images").mkdir()
    paths["images"] = str(root / "images")
    (root / "table.csv").write_text("image,caption\na.png,a cat\n")
    paths["table"] = str(root / "table.csv")
    paths["missing"] = str(root / "missing.ckpt")
    (root / "sweep-typo.yaml").write_text(
        f"config: {REPO_ROOT / 'configs' / 'tiny.yaml'}\noutput_root: {root / 'sweep-out'}\n"
        "grid:\n  model.adapter.num_headz: [4, 8]\n")
    paths["sweep_typo"] = str(root / "sweep-typo.yaml")
    (root / "sweep-runs.yaml").write_text(
        f"config: {REPO_ROOT / 'configs' / 'tiny.yaml'}\noutput_root: {root / 'sweep-out'}\n"
        "runs:\n  - {data.batch_size: 4}\n  - {data.batch_size: 0}\n")
    paths["sweep_bad_run"] = str(root / "sweep-runs.yaml")
    (root / "sweep-key.yaml").write_text(
        f"config: {REPO_ROOT / 'configs' / 'tiny.yaml'}\noutput_root: {root / 'sweep-out'}\n"
        "gird:\n  model.optim.lr: [1.0e-4]\n")
    paths["sweep_bad_key"] = str(root / "sweep-key.yaml")
    (root / "syntax.yaml").write_text("model:\n  adapter: {num_heads: 4\n  llm:\n")
    paths["yaml_syntax"] = str(root / "syntax.yaml")
    (root / "a-list.yaml").write_text("- model.adapter.num_heads=4\n- trainer.max_steps=10\n")
    paths["yaml_list"] = str(root / "a-list.yaml")
    (root / "unet-xl").mkdir()
    (root / "unet-xl" / "config.json").write_text('{"cross_attention_dim": 2048, "in_channels": 4}')
    (root / "unet-xl" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    paths["sdxl_unet"] = str(root / "unet-xl")
    # issue 37: model folders with a config and no (or broken, or foreign) weights, refused before anything loads
    import shutil

    from llm4gen.adapters.cross_adapter import CrossAdapter
    from llm4gen.adapters.mlp import MLPConnector
    from llm4gen.encoders.sources import resolve_source

    shapes = Path(resolve_source("embedded:shapes-sd"))
    shutil.copytree(shapes, root / "sd-no-unet-weights")
    for weights in (root / "sd-no-unet-weights" / "unet").glob("*.safetensors"):
        weights.unlink()
    paths["sd_no_unet_weights"] = str(root / "sd-no-unet-weights")
    (root / "llm-config-only").mkdir()
    shutil.copy(Path(resolve_source("embedded:minilm")) / "config.json", root / "llm-config-only")
    paths["llm_config_only"] = str(root / "llm-config-only")
    (root / "unet-cut").mkdir()
    shutil.copy(shapes / "unet" / "config.json", root / "unet-cut")
    unet_weights = (shapes / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (root / "unet-cut" / "diffusion_pytorch_model.safetensors").write_bytes(unet_weights[: len(unet_weights) // 2])
    paths["unet_cut"] = str(root / "unet-cut")
    MLPConnector(clip_dim=64, llm_dim=384).save_pretrained(root / "foreign-adapter")  # an MLP's weights ...
    CrossAdapter(clip_dim=64, llm_dim=384, num_heads=4).save_config(root / "cam-config")
    shutil.copy(root / "cam-config" / "config.json", root / "foreign-adapter")       # ... under a CAM's config
    paths["foreign_adapter"] = str(root / "foreign-adapter")
    release = root / "release"
    release.mkdir()
    (release / "projector.pth").write_bytes(data[: len(data) // 3])  # a torch file cut short in the copy
    paths["bad_release"] = str(release)
    from llm4gen.datamodules.synthetic import write_synthetic_shards

    write_synthetic_shards(str(root / "shards"), num_samples=2, samples_per_shard=2, resolution=16)
    paths["shards"] = str(root / "shards")
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return write_case_files(tmp_path_factory.mktemp("bad-inputs"))


# ---------------------------------------------------------------- the table

T = "output_dir={tmp}/run"  # train.py cases write nowhere they should not
# (entry point, argv, text the message must contain: the bad value)
CASES = [
    # issue 14's examples
    ("train", [T, "trainer.max_steps=abc"], "'abc'"),
    ("train", [T, "data.shards=/nonexistent/dir", "data.synthetic_if_missing=false"], "/nonexistent/dir"),
    ("train", [T, "model.adapter.num_heads=7"], "num_heads' is 7"),
    ("train", [T, "data.batch_size=0"], "batch_size' is 0"),
    ("generate", ["--checkpoint", "{garbage}", "--prompt", "a cat", "--output-dir", "{tmp}/gen"], "{garbage}"),
    ("attention_maps", ["--checkpoint", "{garbage}", "--prompt", "a red cube", "--output", "{tmp}/m.png"], "{garbage}"),
    ("sweep", ["{sweep_typo}"], "model.adapter.num_headz"),
    # train.py: values
    ("train", [T, "model.adapter.num_head=4"], "model.adapter.num_head'"),
    ("train", [T, "trainer.precision=bf16-mix"], "bf16-mix"),
    ("train", [T, "trainer.devices=1.5"], "1.5"),
    ("train", [T, "trainer.enable_progress_bar=3"], "enable_progress_bar' is 3"),
    ("train", [T, "trainer.max_stepz=3"], "trainer.max_stepz"),
    ("train", [T, "data.resolution=31"], "resolution' is 31"),
    ("train", [T, "model.llm.max_length=1000"], "max_length' is 1000"),
    ("train", [T, "model.objective.entity_timesteps=[0,2000]"], "2000"),
    ("train", [T, "model.objective.entity_timesteps=[500,100]"], "[500, 100]"),
    ("train", [T, "model.objective.caption_dropout=1.5"], "1.5"),
    ("train", [T, "model.lora.dropout=-0.1"], "-0.1"),
    ("train", [T, "model.optim.lr=0"], "lr' is 0"),
    ("train", [T, "model.ema.decay=1.0"], "decay' is 1.0"),
    ("train", [T, "model.llm.kind=decodr"], "decodr"),
    ("train", [T, "model.base.dtype=fp16"], "fp16"),
    ("train", [T, "logger=wandbx"], "wandbx"),
    ("train", [T, "model.adapter.enabled=false"], "leaves nothing to train"),
    ("train", [T, "model.adapter.enabled=false", "model.unet_training=full", "model.objective.lambda_entity=0.1"],
     "lambda_entity > 0 needs the CAM"),
    ("train", [T, "model.optim.scheduler=cosin"], "cosin"),
    ("train", [T, "model.objective.entity_layers=foo"], "foo"),
    ("train", [T, "data.num_workers=-1"], "num_workers' is -1"),
    ("train", [T, "data.buckets.enabled=maybe"], "'maybe'"),
    ("train", [T, "data.buckets.enabled=true", "data.buckets.step=6"], "step' is 6"),
    ("train", [T, "model.adapter.num_heads=four"], "four"),
    ("train", [T, "validation.scheduler=DDIMSchedular"], "DDIMSchedular"),
    ("train", ["--config", "configs/nope.yaml"], "configs/nope.yaml"),
    # issue 24: files and values that used to end in a traceback
    ("train", ["--config", "{yaml_syntax}", T], "{yaml_syntax}' is not valid YAML, line 3, column 6"),
    ("train", ["--config", "{yaml_list}", T], "{yaml_list}' holds a list, not a mapping"),
    ("train", [T, "model.llm.layer=7"], "layer' is 7: embedded:minilm has 6 layers"),
    ("train", [T, "model.objective.lambda_entity=0.1", "model.objective.entity_layers=64"],
     "no cross-attention layer with feature-map side 64"),
    ("train", [T, "model.adapter.init_from={truncated}"], "{truncated}', which is not a readable torch file"),
    ("train", [T, "model.adapter.init_from={torchfile}"], "in another layout than the released CAM's"),
    ("train", [T, "model.adapter.init_from={bad_release}"], "{bad_release}', which is not a readable torch file"),
    ("train", [T, "model.base.unet={sdxl_unet}"], "cross_attention_dim=2048, but the base model embedded:shapes-sd"),
    # issue 36: sharding where it cannot pay or cannot work
    ("train", [T, "trainer.strategy=fsdp2"], "model.unet_training=frozen: what trains (the connector) is small"),
    ("train", [T, "trainer.strategy=fsdp2", "model.unet_training=full", "trainer.precision=16-mixed"],
     "trainer.precision='16-mixed'"),
    # issue 37: a model folder without its weights (or with broken or foreign ones), refused before any loads
    ("train", [T, "model.base.pretrained={sd_no_unet_weights}"], "unet holds no weights file"),
    ("train", [T, "model.llm.pretrained={llm_config_only}"], "llm-config-only holds no weights file"),
    ("train", [T, "model.base.unet={unet_cut}"], "the file is truncated"),
    ("train", [T, "model.adapter.init_from={foreign_adapter}"], "weights lack"),
    # train.py: paths and checkpoints
    ("train", ["output_dir={garbage}/run"], "{garbage}"),
    ("train", [T, "model.adapter.init_from={garbage}"], "{garbage}"),
    ("train", [T, "model.adapter.init_from={empty_dir}"], "{empty_dir}"),
    ("train", [T, "model.base.pretrained=/no/such/sd"], "/no/such/sd"),
    ("train", [T, "data.shards={empty_dir}", "data.synthetic_if_missing=false"], "{empty_dir}"),
    ("train", [T, "resume={garbage}"], "{garbage}"),
    ("train", [T, "resume={truncated}"], "{truncated}"),
    ("train", [T, "resume={other_config}"], "model.adapter.num_blocks: checkpoint 2"),
    # generate.py
    ("generate", ["--checkpoint", "{truncated}", "--prompt", "a", "--output-dir", "{tmp}/gen"], "truncated"),
    ("generate", ["--checkpoint", "{torchfile}", "--prompt", "a", "--output-dir", "{tmp}/gen"], "{torchfile}"),
    ("generate", ["--checkpoint", "{empty}", "--prompt", "a", "--output-dir", "{tmp}/gen"], "{empty}"),
    ("generate", ["--checkpoint", "{missing}", "--prompt", "a", "--output-dir", "{tmp}/gen"], "{missing}"),
    ("generate", ["--checkpoint", "{other_config}", "--prompt", "a", "--output-dir", "{tmp}/gen", "--steps", "0"],
     "--steps 0"),
    ("generate", ["--checkpoint", "{other_config}", "--prompt", "a", "--output-dir", "{tmp}/gen", "--scheduler", "DDIM"],
     "'DDIM'"),
    # attention_maps.py
    ("attention_maps", ["--checkpoint", "{truncated}", "--prompt", "a", "--output", "{tmp}/m.png"], "{truncated}"),
    ("attention_maps", ["--checkpoint", "{empty_dir}", "--prompt", "a", "--output", "{tmp}/m.png"], "{empty_dir}"),
    ("attention_maps", ["--checkpoint", "{other_config}", "--prompt", "a", "--output", "{tmp}/m.png", "--layers", "nope"],
     "'nope'"),
    # prepare.py
    ("prepare", ["/no/such/images", "--output", "{tmp}/shards"], "/no/such/images"),
    ("prepare", ["{images}", "--output", "{tmp}/shards", "--samples-per-shard", "0"], "--samples-per-shard"),
    ("prepare", ["{images}", "--output", "{tmp}/shards", "--jpeg-quality", "101"], "101"),
    ("prepare", ["{table}", "--output", "{tmp}/shards", "--image-root", "/no/such/root"], "/no/such/root"),
    # cache.py
    ("cache", ["--shards", "{empty_dir}", "--output", "{tmp}/cache", "--fields", "latent_moments,bogus"], "bogus"),
    ("cache", ["--shards", "{empty_dir}", "--output", "{tmp}/cache", "--batch-size", "0"], "got 0"),
    ("cache", ["--shards", "/no/such/shards", "--output", "{tmp}/cache"], "/no/such/shards"),
    ("cache", ["--shards", "{empty_dir}", "--output", "{tmp}/cache", "--fields", "llm_features",
               "model.llm.lora_rank=4"], "model.llm.lora_rank=4"),
    ("cache", ["--shards", "{empty_dir}", "--output", "{tmp}/cache", "model.llm.max_length=0"], "max_length' is 0"),
    # submit.py
    ("submit", ["--config", "configs/tiny.yaml", "output_dir={tmp}/job", "slurm.nodez=2"], "slurm.nodez"),
    ("submit", ["--config", "configs/tiny.yaml", "output_dir={tmp}/job", "trainer.max_steps=abc"], "'abc'"),
    ("submit", ["--config", "configs/tiny.yaml", "output_dir={garbage}/job"], "{garbage}"),
    ("submit", ["--config", "configs/tiny.yaml", "output_dir={tmp}/job", "model.adapter.num_heads=7"], "num_heads' is 7"),
    # sweep.py
    ("sweep", ["{sweep_bad_run}"], "batch_size' is 0"),
    ("sweep", ["{sweep_bad_run}", "--slurm"], "batch_size' is 0"),
    ("sweep", ["{sweep_bad_key}"], "gird"),
    ("sweep", ["{tmp}/no-sweep.yaml"], "no-sweep.yaml"),
    # evaluate.py
    ("evaluate", ["--checkpoint", "{garbage}", "--prompts", "{tmp}/p.txt", "--output-dir", "{tmp}/ev"], "{garbage}"),
    ("evaluate", ["--checkpoint", "{truncated}", "--shapes", "seen_1", "--output-dir", "{tmp}/ev"], "{truncated}"),
    ("evaluate", ["--base", "embedded:tiny-sd", "--output-dir", "{tmp}/ev"], "no prompt set"),
    ("evaluate", ["--base", "embedded:tiny-sd", "--shapes", "seen_1", "--scorers", "blipp", "--output-dir", "{tmp}/ev"],
     "blipp"),
    ("evaluate", ["--base", "embedded:tiny-sd", "--shapes", "seen_1", "--images-per-prompt", "0",
                  "--output-dir", "{tmp}/ev"], "--images-per-prompt 0"),
    ("evaluate", ["compare", "{tmp}/no-such-eval", "--output-dir", "{tmp}/cmp"], "no-such-eval"),
    ("evaluate", ["--base", "embedded:tiny-sd", "--protocol", "dpg-bench", "--output-dir", "{tmp}/ev"],
     "give --dpg-questions PATH to dpg_bench/dpg_bench.csv"),
    ("evaluate", ["--base", "embedded:tiny-sd", "--dpg-questions", "{tmp}/no-table.csv", "--output-dir", "{tmp}/ev"],
     "no-table.csv"),
    ("evaluate", ["--base", "embedded:tiny-sd", "--dpg-shapes", "verbose_2", "--images-per-prompt", "2",
                  "--output-dir", "{tmp}/ev"], "DPG-Bench scores 4 images per prompt"),
    ("generate", ["--release", "{bad_release}", "--config", "configs/tiny.yaml", "--prompt", "a",
                  "--output-dir", "{tmp}/gen"], "projector.pth', which is not a readable torch file"),
    # export.py
    ("export", ["--checkpoint", "{garbage}", "--output", "{tmp}/release"], "{garbage}"),
    ("export", ["--checkpoint", "{empty_dir}", "--output", "{tmp}/release"], "{empty_dir}"),
    # recaption.py (issue 44; every refusal on a tiny LLaVA: tests/datamodules/test_recaption.py)
    ("recaption", ["/no/such/shards", "--model", "{llm_config_only}", "--output", "{tmp}/dense"], "/no/such/shards"),
    ("recaption", ["{shards}", "--model", "{llm_config_only}", "--output", "{tmp}/dense"],
     "is a 'bert' model (BertModel), not a vision-language model"),
    ("recaption", ["{shards}", "--model", "{llm_config_only}", "--output", "{tmp}/dense", "--min-words", "9",
                   "--max-words", "3"], "--min-words 9 --max-words 3"),
]

# One per entry point (with issue 14's examples) as a real process: exit code, traceback, time.
SUBPROCESS_CASES = [*range(7)] + [next(i for i, case in enumerate(CASES) if case[0] == entry)
                                  for entry in ("prepare", "cache", "submit", "evaluate", "export", "recaption")]


def fill(items, files):
    return [item.format(**files) for item in items]


def case_id(case) -> str:
    entry, argv, _ = case
    return f"{entry}:{' '.join(a for a in argv if a != T)}"[:70]


@pytest.fixture
def tripwires(monkeypatch):
    """Loading a model, training, submitting or writing shards fails the test: errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    import llm4gen.encoders.llm as llm
    import llm4gen.encoders.stable_diffusion as sd
    import llm4gen.launch.sweep as launch_sweep
    from llm4gen.cli import submit as submit_cli
    from llm4gen.cli import sweep as sweep_cli
    from llm4gen.cli import train
    from llm4gen.lightning_modules.llm4gen import LLM4GenModule
    from llm4gen.tools import feature_cache, prepare

    monkeypatch.setitem(sd.LOADERS, "sd15", refuse)
    monkeypatch.setattr(llm.LLMEncoder, "__init__", refuse)
    monkeypatch.setattr(train, "run", refuse)
    monkeypatch.setattr(LLM4GenModule, "load_from_checkpoint", refuse)
    monkeypatch.setattr(sweep_cli, "run_locally", refuse)
    monkeypatch.setattr(sweep_cli, "submit", refuse)
    monkeypatch.setattr(launch_sweep.subprocess, "run", refuse)
    monkeypatch.setattr(submit_cli, "submit", refuse)
    monkeypatch.setattr(feature_cache, "FeatureEncoders", refuse)
    monkeypatch.setattr(prepare, "run_prepare", refuse)
    from llm4gen.tools import recaption
    monkeypatch.setattr(recaption, "Captioner", refuse)
    import llm4gen.lightning_modules.sampler as evaluation_sampler
    monkeypatch.setattr(evaluation_sampler, "load_sampler", refuse)


def entry_main(entry: str):
    import importlib

    return importlib.import_module(entry).main


def test_the_table_is_big_enough_and_covers_every_entry_point():
    assert len(CASES) >= 40
    assert {entry for entry, _, _ in CASES} == {"train", "generate", "prepare", "cache", "submit", "sweep",
                                                "attention_maps", "evaluate", "export", "recaption"}
    assert {CASES[i][0] for i in SUBPROCESS_CASES} == {entry for entry, _, _ in CASES}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_refused_in_one_paragraph_with_exit_code_2(case, files, tripwires, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    entry, argv, expected = case
    code = entry_main(entry)(fill(argv, files))
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if line.strip()]
    assert len(message) == 1 and message[0].startswith(f"{entry}.py: error: "), err
    assert expected.format(**files) in message[0]
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("index", SUBPROCESS_CASES, ids=lambda i: case_id(CASES[i]))
def test_bad_input_as_a_real_process_exits_2_fast_without_traceback(index, files, import_seconds, refusals):
    entry, argv, expected = CASES[index]
    seconds, result, _ = refusals["checkout", index]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    assert f"{entry}.py: error: " in result.stderr and expected.format(**files) in result.stderr, result.stderr
    assert seconds < import_seconds + SLACK_SECONDS, (
        f"{entry}.py used {seconds:.1f} CPU s to refuse a config/path mistake; importing Lightning costs "
        f"{import_seconds:.1f} s here")


# issue 24's and issue 37's refusals, as real processes in an empty folder: nothing may be left behind (no run folder, no
# synthetic shards in the default data/ folder, no log)
LEAVES_NOTHING = [i for i, (entry, argv, expected) in enumerate(CASES)
                  if any(token in expected for token in ("not valid YAML", "not a mapping", "has 6 layers",
                                                        "feature-map side", "readable torch file",
                                                        "another layout", "holds no weights file",
                                                        "the file is truncated", "weights lack"))]


class Refusal(NamedTuple):
    seconds: float  # CPU seconds of the process alone
    result: subprocess.CompletedProcess
    folder: Path  # where it ran


@pytest.fixture(scope="module")
def refusals(files, tmp_path_factory) -> dict[tuple[str, int], Refusal]:
    """Every real-process case, two at a time (each is one core's worth of imports): each subprocess case from
    the checkout, and each leaves-nothing case again from an empty folder of its own."""
    commands = {}
    for index in SUBPROCESS_CASES:
        entry, argv, _ = CASES[index]
        commands["checkout", index] = ([sys.executable, str(REPO_ROOT / f"{entry}.py"), *fill(argv, files)], REPO_ROOT)
    for index in LEAVES_NOTHING:
        entry, argv, _ = CASES[index]
        folder = tmp_path_factory.mktemp(f"refused-{index}") / "cwd"
        folder.mkdir()
        argv = [a.replace(T, f"output_dir={folder}/run") for a in argv]
        commands["empty folder", index] = ([sys.executable, str(REPO_ROOT / f"{entry}.py"), *fill(argv, files)], folder)
    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = pool.map(lambda command: cpu_seconds_of(*command), commands.values())
        return {key: Refusal(*m, folder) for (key, (_, folder)), m in zip(commands.items(), measured)}


@pytest.mark.slow
@pytest.mark.parametrize("index", LEAVES_NOTHING, ids=lambda i: case_id(CASES[i]))
def test_a_refused_run_leaves_nothing_behind(index, files, refusals):
    entry, argv, expected = CASES[index]
    _, result, workdir = refusals["empty folder", index]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected.format(**files) in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == [], "a refused run wrote files"
    assert not (Path(files["tmp"]) / "gen").exists()


def test_the_leaves_nothing_table_holds_every_issue_24_and_37_case():
    assert len(LEAVES_NOTHING) == 8 + 4


def test_an_unexpected_exception_keeps_its_traceback():
    from llm4gen.configs.errors import entry_point

    @entry_point("x.py")
    def broken(argv=None):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        broken([])


def test_importing_the_config_schema_does_not_import_torch():
    code = ("import sys, llm4gen.configs.schema, llm4gen.configs.checks, llm4gen.configs.choices, "
            "llm4gen.configs.errors, llm4gen.configs.buckets, llm4gen.shapes.world, llm4gen.embedded.registry; "
            "heavy = [m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
