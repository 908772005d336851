import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Every test runs at this count; the kernel-set tier (tests/test_kernel_sets.py) sets another through
# LLM4GEN_TEST_THREADS, since a thread count changes how reductions are split and so their rounding.
SUITE_THREADS = int(os.environ.get("LLM4GEN_TEST_THREADS", "2"))
torch.set_num_threads(SUITE_THREADS)

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def pytest_collection_modifyitems(config, items):
    """The kernel-set tier (tests/test_kernel_sets.py) runs when asked for, by its marker (``-m kernel_sets``, as
    .ci/run does) or its file: a plain run has already run the float-sensitive tests on this machine's kernels."""
    if "kernel_sets" in (config.getoption("markexpr") or "") or any("test_kernel_sets" in a for a in config.args):
        return
    tier = [item for item in items if item.get_closest_marker("kernel_sets")]
    if tier:
        config.hook.pytest_deselected(items=tier)
        items[:] = [item for item in items if not item.get_closest_marker("kernel_sets")]


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A test that starts a process group in the test process ends it and restores the launch variables Lightning
    writes to os.environ: a later test's SLURM job or subprocess would inherit a port this process still holds."""
    before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    torch.set_num_threads(SUITE_THREADS)  # benchmarks run in-process set their own count; later tests compare at the suite's
    leaked = torch.distributed.is_available() and torch.distributed.is_initialized()
    changed = [k for k in LAUNCH_VARIABLES if os.environ.get(k) != before[k]]
    assert not leaked and not changed, f"the test left a process group ({leaked}) or launch variables {changed} behind"


@pytest.fixture(scope="session")
def tiny_model_config():
    """The embedded tiny default's model section, as a plain dict, over the random-weight tiny SD
    (embedded:tiny-sd): the tests' expectations (a near-uniform attention at initialisation, losses
    near 1) are those of random weights, not of the pretrained shapes base the default now uses."""
    from omegaconf import OmegaConf

    from llm4gen.configs.schema import load_config

    return OmegaConf.to_container(load_config(overrides=["model.base.pretrained=embedded:tiny-sd"]).model, resolve=True)
