"""A non-editable install, used from another directory: one import name (``llm4gen``), every console
script, the experiment YAMLs as package data, and no top-level module that shadows another project."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["llm4gen-train", "llm4gen-generate", "llm4gen-prepare", "llm4gen-submit", "llm4gen-sweep", "llm4gen-cache",
           "llm4gen-attention-maps", "llm4gen-evaluate", "llm4gen-export", "llm4gen-experiment", "llm4gen-pretrain",
           "llm4gen-recaption"]
SHADOWING = ["evaluate", "adapters", "configs", "train", "cache", "export", "datamodules", "losses", "launch", "recaption"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --no-deps .`` (a wheel build, not editable) into a folder of its own; the
    dependencies come from this environment."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(ROOT)], check=True, cwd=site)
    return site


def installed_env(site) -> dict:
    return {"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
            "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}  # several run side by side: one thread each


def run_installed(site, args, cwd):
    return subprocess.run(args, cwd=cwd, env=installed_env(site), capture_output=True, text=True, timeout=300)


def run_installed_side_by_side(site, commands, cwd) -> list[subprocess.CompletedProcess]:
    """Each command in its own process, all started at once (each mostly waits on imports), in order."""
    running = [subprocess.Popen(args, cwd=cwd, env=installed_env(site), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for args in commands]
    finished = []
    for args, process in zip(commands, running):
        out, err = process.communicate(timeout=300)
        finished.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return finished


@pytest.mark.slow
def test_the_wheel_installs_one_import_name_and_no_shadowing_module(installed):
    top_level = {p.name.removesuffix(".py") for p in installed.iterdir() if not p.name.endswith((".dist-info", "bin"))}
    assert "llm4gen" in top_level
    assert not top_level & set(SHADOWING), top_level & set(SHADOWING)
    assert (installed / "llm4gen" / "configs" / "llm4gen_sd15.yaml").is_file()
    assert (installed / "llm4gen" / "configs" / "sweeps" / "shapes_evidence.yaml").is_file()


@pytest.mark.slow
def test_import_and_every_console_script_work_from_another_directory(installed, tmp_path):
    code = ("import llm4gen, llm4gen.cli.train, llm4gen.cli.shapes_evidence, llm4gen.cli.pretrain; "
            "print(llm4gen.__file__)")
    result = run_installed(installed, [sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(installed)), result.stdout  # the installed copy, not the checkout
    helps = run_installed_side_by_side(installed, [[str(installed / "bin" / s), "--help"] for s in SCRIPTS], tmp_path)
    for script, result in zip(SCRIPTS, helps):
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (script, result.stderr[-2000:])
    # the shipped experiment file, by the name the README gives, from a directory that has no configs/
    result = run_installed(installed, [str(installed / "bin" / "llm4gen-train"), "--config", "configs/llm4gen_sd15.yaml",
                                       "--print-config"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrained:" in result.stdout and "rankgen" in result.stdout.lower()


def test_the_wheel_carries_the_one_version():
    """setup.cfg reads the version from llm4gen.__version__: one number, in one place."""
    import configparser

    import llm4gen

    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    assert metadata["metadata"]["version"] == "attr: llm4gen.__version__"
    import re
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assignments = [name for name in tracked.split() if re.search(r"^__version__\s*=", (ROOT / name).read_text(), re.M)]
    assert assignments == ["llm4gen/__init__.py"], assignments
    assert llm4gen.__version__.count(".") == 2


@pytest.mark.slow
def test_the_wheel_versions_itself_from_the_package(installed):
    import llm4gen

    assert [p.name for p in installed.glob("llm4gen-*.dist-info")] == [f"llm4gen-{llm4gen.__version__}.dist-info"]


def test_bench_scripts_import_the_installed_package_without_path_edits():
    edits = [p.name for p in (ROOT / "bench").glob("*.py") if "sys.path" in p.read_text()]
    assert not edits, f"bench scripts that edit sys.path (they must import the installed llm4gen): {edits}"


@pytest.mark.slow
def test_experiments_a_sweep_and_a_bench_run_from_the_wheel_in_another_directory(installed, tmp_path):
    """The three experiments' command lines, one run of a sweep (the shipped tiny experiment file by name, trained
    by ``python -m llm4gen.cli.train``) and a benchmark from the checkout's bench/ importing the installed
    package, all from a directory that is not the checkout; started side by side."""
    (tmp_path / "sweep.yaml").write_text(
        "config: configs/tiny.yaml\noutput_root: sweep-out\n"
        "base_overrides: [trainer.max_steps=2, validation.every_n_steps=0, validation.at_start=false, data.batch_size=4,"
        " model.optim.warmup_steps=0, trainer.enable_progress_bar=false]\nruns: [{seed: 0}]\n")
    experiments = ("shapes_evidence", "connectors", "real_llm")
    *helps, sweep, bench = run_installed_side_by_side(installed, [
        *([sys.executable, "-m", f"llm4gen.cli.{e}", "--help"] for e in experiments),
        [str(installed / "bin" / "llm4gen-sweep"), "sweep.yaml"],
        [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--smoke", "--models", "tiny"]], tmp_path)
    for experiment, result in zip(experiments, helps):
        assert result.returncode == 0 and "usage" in result.stdout, (experiment, result.stderr[-2000:])
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-3000:]
    assert json.loads((tmp_path / "sweep-out" / "seed=0" / "final_metrics.json").read_text())["global_step"] == 2
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "ratio Lightning / plain" in bench.stdout
