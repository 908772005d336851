"""Tolerances of the suite's comparisons between two differently computed float32 results, with their reasons.

Two results that exact arithmetic makes equal, computed along two paths (LLM features held at another length,
a written-out softmax against the fused kernel, a batch of 4 against a batch of 1, a reference implementation),
differ by rounding, and by how much depends on the CPU's kernels: torch's AVX-512, AVX2 or plain code, MKL's and
oneDNN's, the thread count. A bound read off one machine's output fails on the next machine, so each tolerance
here comes from the arithmetic and sits far below the effect its comparisons exist to catch:

- ``rounding_bound(magnitude, terms)`` = ``terms * EPS32 * magnitude``: the worst case of a float32 sum of
  ``terms`` terms whose partial sums reach ``magnitude``, summed in another order (each addition rounds by at
  most half a unit in the last place, in each of the two orders). For one reduction (a softmax row, one
  attention, a formula) it is used as it is, at the assertion, with the magnitude of the values compared.
- Through a deep network (the tiny UNet, the text encoders, a sampling run) that worst case compounds past
  anything useful. There the tolerance below is the largest difference measured on the kernel sets of the
  kernel-set tier (tests/test_kernel_sets.py: this CPU's AVX-512, AVX2 and plain x86-64 kernels, at 1, 2 and
  3 threads; the AMD EPYC and the Intel machines this project runs on differ in the same way), times a
  margin of about 10, written as the number of roundings at the compared values' size it allows.

Each entry names the smallest effect its comparisons exist to catch; tests/test_tolerances.py checks that the
effect is at least 5 times the tolerance and that docs/tests.md lists the table. "Bitwise" (``torch.equal``,
``atol=0``) stays where one computation runs twice on one machine (docs/tests.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: float32's spacing at 1


def rounding_bound(magnitude: float, terms: int = 1, eps: float = EPS32) -> float:
    """Worst-case difference between two float computations of one value, a sum of ``terms`` terms whose
    partial sums reach ``magnitude``, taken in different orders (or one fused and one written out)."""
    return terms * eps * float(magnitude)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    derivation: str  # where the number comes from
    effect: float  # the smallest change the comparisons using it exist to catch ...
    effect_is: str  # ... and what that change is

    @property
    def close(self) -> dict[str, float]:
        """Keywords for torch.testing.assert_close and np.testing.assert_allclose."""
        return {"atol": self.atol, "rtol": self.rtol}


UNET_OUTPUT = Tolerance(
    atol=2e-5, rtol=0.0,  # rounding_bound(1.4, 120)
    derivation="the tiny UNet's noise prediction (|x| <= 1.4) from contexts that differ by float rounding (LLM "
               "features held at another length reach the connector's matmuls in another memory layout: 1 ulp) "
               "or through a written-out softmax in place of the fused kernel: measured <= 2.4e-6 on the three "
               "kernel sets (x86-64, 1 thread: 2.2e-6; AVX2, 3 threads: 2.4e-6; AVX-512, 2 threads: 1.7e-6); "
               "2e-5 = 120 roundings at 1.4, 8 times that",
    effect=6.8e-3, effect_is="one padded key let into the softmax: 6.8e-3 (all of them: 0.019 on a random context; "
                             "0.06 to 0.33 through the connectors with noise at the padding)",
)

IMAGES = Tolerance(
    atol=5e-5, rtol=0.0,  # rounding_bound(1.0, 420)
    derivation="pixel values in [0, 1] after 2 or 3 DDIM steps of the tiny UNet and the VAE's decoder, along two "
               "paths (a reference implementation, a fused LoRA, a file written on another CPU): measured <= 7.0e-6 "
               "on the three kernel sets (5.7e-6 between two paths of one run); 5e-5 = 420 roundings at 1, 7 times "
               "that",
    effect=3.7e-4, effect_is="the raw weights sampled in place of the EMA ones two steps into a run: 3.7e-4 "
                             "(two training steps, a LoRA or unmasked padding: 0.3 to 0.44)",
)

ENCODER_OUTPUT = Tolerance(
    atol=1e-5, rtol=1e-5,  # rounding_bound(3.5, 24); rtol: 84 roundings
    derivation="hidden states of the text encoders, the VAE's encoder or a connector (|x| <= 8; MiniLM's up to 18) "
               "along two paths (a batch of 4 against a batch of 1, one pass for every layer, the cache writer's "
               "batches, a reference model): measured <= 9.3e-7 at |x| <= 3.5, <= 4.8e-6 at |x| <= 8, 2.5e-6 at "
               "18 on the three kernel sets; atol 1e-5 = 24 roundings at 3.5, rtol 1e-5 = 84 roundings at any "
               "size, more than 10 times what was measured",
    effect=0.05, effect_is="the wrong window, layer, head count or a padded token read: >= 0.05 (the released CAM "
                           "read with 4 heads for 8: 0.054; a swapped key and value: 0.35; CLIP's tail window "
                           "for the empty prompt's: 3.1)",
)

DIFFUSION_LOSS = Tolerance(
    atol=1e-5, rtol=0.0,  # rounding_bound(1.0, 84)
    derivation="the diffusion loss (a mean of 4096 squared errors, ~1) from inputs or a UNet path that differ by "
               "float rounding (cached against online features, captured attention against the fused kernel): "
               "measured <= 1.2e-7 on the three kernel sets; 1e-5 = 84 roundings at 1",
    effect=1e-3, effect_is="another posterior sample of the same latents: > 1e-3",
)

TOLERANCES = {"UNET_OUTPUT": UNET_OUTPUT, "IMAGES": IMAGES, "ENCODER_OUTPUT": ENCODER_OUTPUT,
              "DIFFUSION_LOSS": DIFFUSION_LOSS}
