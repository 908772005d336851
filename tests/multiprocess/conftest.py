"""Helpers for the cluster-operation tests: the real train.py as a subprocess on tiny shared shards.

Every run here is the embedded tiny default (CPU, fp32) with batch 4, validation sampling cut to one
denoising step, and a learning rate high enough (1e-3) that one missed or repeated step moves the
weights by far more than the 1e-6 the comparisons allow. Runs record the sample keys of every training
batch through ``LLM4GEN_RECORD_KEYS`` (tests/train_recording_keys.py: train.py plus a KeyRecorder).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "tests" / "train_recording_keys.py"  # train.py + the key record
RUN_TIMEOUT_S = 240  # one tiny run takes ~10-30 s on 2 busy cores; a hang fails instead of blocking CI
FAST = [
    "data.synthetic_if_missing=false", "data.batch_size=4", "validation.every_n_steps=0",
    "validation.num_inference_steps=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "model.optim.lr=1e-3", "model.optim.warmup_steps=6",
]  # fmt: skip


def read_records(path: Path) -> list[dict]:
    assert path.is_file(), f"no key record at {path}: was LLM4GEN_RECORD_KEYS honoured?"
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch_records(path: Path) -> list[dict]:
    return [r for r in read_records(path) if "keys" in r]


def keys_by_step(*record_files: Path) -> dict[int, list[str]]:
    """global_step -> keys, from the runs in order: a later run that trained a step again wins."""
    steps: dict[int, list[str]] = {}
    for path in record_files:
        for record in batch_records(path):
            steps[record["global_step"]] = record["keys"]
    return steps


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), f"different keys: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def resumed_from(output: str) -> Path | None:
    """The checkpoint train.py said it resumes from ("resuming from <path>"), if any."""
    for line in output.splitlines():
        if line.startswith("resuming from "):
            return Path(re.sub(r" \(step -?\d+\)$", "", line.removeprefix("resuming from ").strip()))
    return None


class TinyRuns:
    """Starts train.py runs over one shared shard folder; the test modules get it as ``tiny_runs``.

    Helpers are methods (not a module to import) because pytest gives every test directory's
    conftest the same module name. ``baseline`` caches uninterrupted runs for the whole session.
    """

    read_records = staticmethod(read_records)
    batch_records = staticmethod(batch_records)
    keys_by_step = staticmethod(keys_by_step)
    load_checkpoint = staticmethod(load_checkpoint)
    max_abs_difference = staticmethod(max_abs_difference)
    resumed_from = staticmethod(resumed_from)

    def __init__(self, shards_dir: Path, root: Path):
        self.shards_dir, self.root = shards_dir, root
        self._baselines: dict[tuple[str, ...], Path] = {}

    def argv(self, output_dir: Path, *overrides: str, shards_dir: Path | None = None, config: str = "tiny.yaml") -> list[str]:
        return [sys.executable, str(TRAIN_SCRIPT), "--config", str(REPO_ROOT / "configs" / config),
                f"output_dir={output_dir}", f"data.shards={shards_dir or self.shards_dir}", *FAST, *overrides]

    @staticmethod
    def env(record_keys: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLM4GEN_"))}
        env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
        if record_keys is not None:
            env["LLM4GEN_RECORD_KEYS"] = str(record_keys)
        return env

    @staticmethod
    def run(argv: list[str], env: dict[str, str], timeout_s: float = RUN_TIMEOUT_S) -> str:
        """Run train.py to its end; returns stdout+stderr, fails the test with its tail otherwise."""
        try:
            result = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            tail = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
            pytest.fail(f"train.py did not finish within {timeout_s}s: {' '.join(argv)}\n{tail[-3000:]}")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"train.py exited with {result.returncode}: {' '.join(argv)}\n{output[-4000:]}"
        return output

    @staticmethod
    def start_and_kill_after(argv: list[str], env: dict[str, str], checkpoint: Path, log: Path,
                             timeout_s: float = RUN_TIMEOUT_S) -> None:
        """Start train.py, wait until ``checkpoint`` exists, then SIGKILL it (no chance to clean up)."""
        with open(log, "w") as handle:
            process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        try:
            while not checkpoint.exists():
                if process.poll() is not None:
                    pytest.fail(f"train.py ended (code {process.returncode}) before writing {checkpoint.name}:\n"
                                f"{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{checkpoint.name} not written within {timeout_s}s:\n{log.read_text()[-4000:]}")
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL, (
            f"train.py ended by itself (code {process.returncode}) before the kill:\n{log.read_text()[-4000:]}")

    def baseline(self, *overrides: str, timeout_s: float = RUN_TIMEOUT_S) -> Path:
        """An uninterrupted run with these overrides (keys recorded to ``<run>/keys.jsonl``, what it printed to
        ``<run>/output.txt``), run once."""
        if overrides not in self._baselines:
            out = self.root / f"baseline-{len(self._baselines)}"
            output = self.run(self.argv(out, *overrides), self.env(out / "keys.jsonl"), timeout_s)
            (out / "output.txt").write_text(output)
            self._baselines[overrides] = out
        return self._baselines[overrides]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> TinyRuns:
    """Runs over 4 synthetic shards of 32 samples (32x32 px), written once for the session."""
    from llm4gen.datamodules.synthetic import write_synthetic_shards

    directory = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(directory), num_samples=128, samples_per_shard=32, resolution=32, seed=0)
    return TinyRuns(directory, tmp_path_factory.mktemp("baselines"))
