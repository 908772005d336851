"""bench/gpu_bench.py --smoke: the GPU bench's own code, every scenario, on the tiny models on a CPU."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_runs_every_scenario_and_writes_the_report(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--smoke", "--profile", "--steps", "1", "--peak-tflops", "1.0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    scenarios = report["scenarios"]
    assert list(scenarios) == ["a", "b", "c", "d", "e", "i", "j", "k"]  # i, j, k: SDXL, on the tiny SDXL here
    for name, result in scenarios.items():
        best = result["best"]
        assert best["status"] == "ok" and best["images_per_sec"] > 0, name
        assert best["mfu"] == pytest.approx(best["tflops_per_sec"] / 1.0)
        assert best["tflops_per_sec"] == pytest.approx(best["images_per_sec"] * result["flops_per_sample"]["total"] / 1e12)
    flops = {name: result["flops_per_sample"] for name, result in scenarios.items()}
    assert flops["a"]["vae"] == flops["a"]["llm"] == 0 and flops["b"]["vae"] > 0 and flops["b"]["llm"] > 0
    assert flops["e"]["trained"] > 1.3 * flops["a"]["trained"]  # the UNet's weight gradients
    assert flops["i"]["clip"] > 0 and flops["i"]["vae"] == 0 and flops["j"]["vae"] > 0  # SDXL: online CLIPs, cached VAE
    assert "aten::" in scenarios["a"]["profile"]


def test_unknown_scenario_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_bench().parse_args(["--smoke", "--scenarios", "a,z"])
    assert "unknown scenarios ['z']" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_runs_the_sharded_scenario_with_the_sharded_strategy(tmp_path):
    """Scenario l (trainer.strategy=fsdp2 on one device) runs through ShardedStrategy: its UNet's blocks sharded."""
    import os

    import torch.distributed as dist

    bench = load_bench()
    before = dict(os.environ)
    report = bench.main(["--smoke", "--scenarios", "l", "--steps", "1", "--peak-tflops", "1.0",
                         "--out", str(tmp_path / "bench.json")])
    # its process group is gone and os.environ as it was: a SLURM job submitted later gets no port this process holds
    assert not dist.is_initialized() and dict(os.environ) == before
    best = report["scenarios"]["l"]["best"]
    assert best["status"] == "ok" and best["images_per_sec"] > 0
    assert report["scenarios"]["l"]["flops_per_sample"]["trained"] > 0
