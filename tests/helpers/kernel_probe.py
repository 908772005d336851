"""Which kernels this process computes with, and a fingerprint of what they compute.

Run as a script (``python -m tests.helpers.kernel_probe``) under a kernel set's environment, it prints one JSON
line: torch's CPU capability, the instruction set oneDNN reports, MKL's reproducibility branch, the thread count,
and a hash of each of four results (an MKL matrix product, a oneDNN convolution, torch's attention kernel, a long
sum). tests/test_kernel_sets.py compares them with this process's own: a kernel set that computes bit for bit
what the native one does would test nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch


def fingerprints() -> dict[str, str]:
    """A short hash of each result. The inputs come from numpy: torch.randn's own values depend on the capability
    (its plain-code sampler draws other numbers than the AVX2 one), which would change every hash for a reason
    that says nothing about the kernels."""
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    tokens = normal(2, 4, 300, 40)  # (batch, heads, tokens, head dim)
    results = {
        "matmul": normal(300, 777) @ normal(777, 301),
        "conv2d": torch.nn.functional.conv2d(normal(2, 32, 32, 32), normal(32, 32, 3, 3), padding=1),
        "attention": torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens),
        "sum": normal(100_000).sum(),
    }
    return {name: hashlib.sha256(x.numpy().tobytes()).hexdigest()[:12] for name, x in results.items()}


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to, from its verbose header (printed by the C library: a child process
    catches it)."""
    code = ("import torch\nwith torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):\n"
            "    torch.nn.functional.conv2d(torch.ones(2, 32, 32, 32), torch.ones(32, 32, 3, 3), padding=1)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"onednn_verbose,.*cpu,isa:([^\n]+)", out)
    return found.group(1).strip() if found else "unknown"


def mkl_branch() -> str:
    """MKL's conditional-numerical-reproducibility branch, from its verbose line of one matrix product ("OFF": MKL
    picks its kernels by the CPU)."""
    code = "import torch\ntorch.ones(64, 64) @ torch.ones(64, 64)\n"
    env = os.environ | {"MKL_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env).stdout
    found = re.search(r"CNR:(\S+)", out)
    return found.group(1) if found else "unknown"


def probe(threads: int) -> dict:
    torch.set_num_threads(threads)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "onednn_isa": onednn_isa(),
            "mkl_branch": mkl_branch(), "threads": torch.get_num_threads(), "fingerprints": fingerprints()}


if __name__ == "__main__":
    print(json.dumps(probe(int(os.environ.get("LLM4GEN_TEST_THREADS", "2")))))
