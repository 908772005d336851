"""Samples/s, TFLOP/s and MFU in every run: Lightning's ``ThroughputMonitor`` fed with this run's
FLOPs per sample (``lightning_modules.flops``) and the device's dense bf16 peak.

Logged every ``log_every_n_steps`` once ``window_size`` steps have run (rolling over them), per device:
``train/device/samples_per_sec``, ``train/device/flops_per_sec``, ``train/device/tflops_per_sec``,
``train/device/mfu`` (when the peak is known), plus ``throughput/flops_per_sample`` once at the start.

Why our own peak table: Lightning's lists sparse figures for some chips (H200, H100 NVL) and reads an
"NVIDIA L40S" as an L4. MFU here is against the *dense* bf16 tensor-core peak of the datasheets,
the convention of the MFU literature. ``model.performance.peak_tflops`` overrides the lookup.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from llm4gen.datamodules.batch import Batch
from llm4gen.lightning_modules.flops import StepFlops, module_step_flops

# Dense bf16 tensor-core peak in TFLOP/s, from NVIDIA/AMD datasheets (sparsity figures halved).
# Matched against the lower-cased device name, first match wins: specific names precede general ones.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gb200", 2500.0), ("b200", 2250.0), ("b100", 1750.0),
    ("h200 nvl", 835.0), ("gh200", 989.0), ("h200", 989.0),
    ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.0), ("h800", 989.0), ("h20", 148.0),
    ("a100", 312.0), ("a800", 312.0), ("a40", 149.7), ("a30", 165.0), ("a10g", 70.0), ("a10", 125.0),
    ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0),
    ("rtx 6000 ada", 364.0), ("a6000", 154.8),
    ("rtx 5090", 209.5), ("rtx 4090", 165.2), ("rtx 4080", 97.5), ("rtx 3090", 71.0),
    ("mi300x", 1307.0), ("mi250x", 383.0),
)


def peak_tflops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a device, by name ("NVIDIA H100 80GB HBM3" -> 989.0); None when unknown."""
    name = device_name.lower()
    if "h100" in name and "pcie" not in name and "nvl" not in name and "hbm2e" in name:
        return 756.0  # the PCIe card reports itself as "H100 PCIe" or by its HBM2e memory
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def device_peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """FLOP/s available on one device: the override, else the table for CUDA devices, else None."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"model.performance.peak_tflops={override_tflops}: expected a positive TFLOP/s figure")
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = peak_tflops_for(name)
        if tflops is None:
            rank_zero_warn(f"no bf16 peak known for {name!r}: MFU is not logged; set model.performance.peak_tflops")
            return None
        return tflops * 1e12
    return None


def batch_size_of(batch: Batch) -> int:
    return len(batch)


class TrainingThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` with FLOPs counted once at setup for the run's configuration.

    Args:
        resolution: training image side (``data.resolution``).
        precomputed_keys: cached fields (``data.precomputed_keys``): their encoders are not counted.
        peak_tflops: device peak override (``model.performance.peak_tflops``).
    """

    def __init__(self, resolution: int, precomputed_keys: Sequence[str] = (), peak_tflops: Optional[float] = None,
                 window_size: int = 50):
        super().__init__(batch_size_fn=batch_size_of, window_size=window_size)
        self.resolution, self.precomputed_keys, self.peak_tflops = resolution, tuple(precomputed_keys), peak_tflops
        self.step_flops: Optional[StepFlops] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = device_peak_flops(trainer.strategy.root_device, self.peak_tflops)
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak
        if self.step_flops is None:
            self.step_flops = module_step_flops(pl_module, self.resolution, self.precomputed_keys)

    def on_train_start(self, trainer, pl_module, *args: Any) -> None:
        super().on_train_start(trainer, pl_module, *args)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"throughput/flops_per_sample": float(self.step_flops.total)},
                                       step=trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # ThroughputMonitor reads the module's flops_per_batch at each update
        pl_module.flops_per_batch = self.step_flops.total * batch_size_of(batch)

    def _compute(self, trainer, iter_num: Optional[int] = None) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        metrics = self._throughputs[stage].compute()
        if "device/flops_per_sec" in metrics:
            metrics["device/tflops_per_sec"] = metrics["device/flops_per_sec"] / 1e12
        metrics = {f"{stage.value}/{k}": v for k, v in metrics.items()}
        trainer._logger_connector.log_metrics(metrics, step=iter_num)
