"""The kernel-set tier: the float-sensitive tests (marked ``float_sensitive``: comparisons of two differently
computed float results within a tolerance) run again with torch's CPU dispatch, oneDNN and MKL forced to other
instruction sets and at another thread count, so that a tolerance fitted to one machine's kernels fails here,
where it can be seen, and not on the first AMD EPYC or AVX2 laptop that runs the suite (docs/tests.md).

``.ci/run`` runs it after the README's command (``python -m pytest -m kernel_sets``); a plain ``python -m pytest``
leaves it out (tests/conftest.py), as the float-sensitive tests already ran there on this machine's own kernels.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each set, as environment variables read once at process start (torch's dispatch, oneDNN, MKL) and the suite's
# thread count (tests/conftest.py). The values torch 2.13 accepts for ATEN_CPU_CAPABILITY on x86 are default,
# avx2 and avx512; an unknown one is ignored silently, hence the probe below.
KERNEL_SETS = {
    # plain x86-64: torch's unvectorised kernels, oneDNN at SSE4.1, MKL's reproducible baseline branch, one thread
    "x86-64": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
               "LLM4GEN_TEST_THREADS": "1"},
    # a CPU without AVX-512 (AMD Zen 2, Intel before Skylake-X), three threads
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "MKL_CBWR": "AVX2", "LLM4GEN_TEST_THREADS": "3"},
}
CAPABILITY_ORDER = ["DEFAULT", "AVX2", "AVX512"]
ONEDNN_ISA = {"SSE41": "SSE4.1", "AVX2": "AVX2"}  # how oneDNN's verbose header names each


def float_sensitive_files() -> list[str]:
    """The test files that hold a ``float_sensitive`` test: the subprocess collects only these."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if p.name != Path(__file__).name and "pytest.mark.float_sensitive" in p.read_text())


def run(command: list[str], environment: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=os.environ | environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def native() -> dict:
    """What this machine's own kernels compute, at the suite's thread count."""
    result = run([sys.executable, "-m", "tests.helpers.kernel_probe"], {"LLM4GEN_TEST_THREADS": "2"}, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.kernel_sets
@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel sets are x86-64's")
@pytest.mark.parametrize("name", list(KERNEL_SETS))
def test_the_float_sensitive_tests_pass_on_another_kernel_set(name, native):
    environment = KERNEL_SETS[name]
    probe = run([sys.executable, "-m", "tests.helpers.kernel_probe"], environment, 300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.splitlines()[-1])
    # The set took effect: torch dispatches where it was told (or lower, on a CPU without that instruction set),
    # oneDNN reports the instruction set, MKL its branch, and the kernels compute other bits than the native ones.
    requested = environment["ATEN_CPU_CAPABILITY"].upper()
    expected = min(requested, native["capability"], key=CAPABILITY_ORDER.index)
    assert seen["capability"] == expected, seen
    assert seen["threads"] == int(environment["LLM4GEN_TEST_THREADS"]) and seen["mkl_branch"] != "OFF", seen
    if native["onednn_isa"] != "unknown":
        assert ONEDNN_ISA[environment["DNNL_MAX_CPU_ISA"]] in seen["onednn_isa"], seen
    differing = [k for k in native["fingerprints"] if seen["fingerprints"][k] != native["fingerprints"][k]]
    assert differing, f"{name} computes bit for bit what this machine's own kernels do: it would test nothing"

    files = float_sensitive_files()
    assert files, "no test is marked float_sensitive"
    tests = run([sys.executable, "-m", "pytest", "-m", "float_sensitive", "-p", "no:cacheprovider", "-q",
                 "--durations=5", *files], environment, 900)
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    assert tests.returncode == 0, f"on the {name} kernel set ({environment}):\n{tests.stdout[-6000:]}{tests.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
