"""configs/llm4gen_sdxl.yaml end to end on a CPU, from full-size folders written here with random weights:
SDXL base 1.0's architecture (2.6B UNet, both CLIP encoders, the VAE) and a T5-XL encoder, loaded through
the same from_pretrained path the hub folders take. Prints the wall time of each phase and the training
process's peak RSS.

    python bench/sdxl_cpu_run.py --workdir /tmp/sdxl-cpu            # ~7 + 2.5 GB of folders, then 2 steps

What differs from a GPU run, so it fits a 24 GB, 2-core machine: 256 px instead of 1024 (latents 32 x 32), batch 1,
the frozen UNet and CLIP in fp32 (bf16 is unusably slow on this CPU; the LLM stays bf16 as configured), no
validation sampling, 2 optimizer steps, synthetic shards. Everything else is the config's: the RankGen-style
T5-XL reading (256 tokens, "pre ", pad outputs kept), one 8-head CAM block at 2048 wide, EMA, SDXL's size
conditioning and aspect buckets.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent


def write_folders(workdir: Path) -> dict[str, float]:
    import torch

    from llm4gen.embedded.full_size import write_random_sdxl, write_random_t5_xl

    seconds = {}
    for name, write in (("sdxl", write_random_sdxl), ("t5-xl", write_random_t5_xl)):
        if not (workdir / name).is_dir():
            started = time.perf_counter()
            write(workdir / name, dtype=torch.bfloat16)
            seconds[f"write {name}"] = time.perf_counter() - started
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the random full-size folders and the run go")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    phases = write_folders(workdir)
    command = [sys.executable, "-m", "llm4gen.cli.train", "--config", "configs/llm4gen_sdxl.yaml", "--quiet",
               f"output_dir={workdir / 'run'}", "resume=never",
               f"model.base.pretrained={workdir / 'sdxl'}", "model.base.dtype=float32",
               f"model.llm.pretrained={workdir / 't5-xl'}", "model.llm.tokenizer=null",
               f"data.shards={workdir / 'shards'}", "data.synthetic_if_missing=true", "data.batch_size=1",
               "data.num_workers=0", f"data.resolution={args.resolution}", "data.shuffle_buffer=4",
               "validation.every_n_steps=0", f"checkpoint.every_n_steps={args.steps}",
               "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
               f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1", "model.performance.tf32=false",
               "model.performance.channels_last=false", "model.performance.optimizer=adamw"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    phases["train (load + steps + checkpoint + export)"] = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        return result.returncode
    print(f"llm4gen_sdxl on CPU, {args.resolution} px, batch 1, {args.steps} steps (from full-size random folders)\n")
    print("| phase | wall time |\n| --- | --- |")
    for name, seconds in phases.items():
        print(f"| {name} | {seconds:.0f} s |")
    print(f"\npeak RSS of the training process: {peak_gib:.1f} GiB")
    metrics = (workdir / "run" / "final_metrics.json")
    if metrics.is_file():
        print(f"final metrics: {metrics.read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
