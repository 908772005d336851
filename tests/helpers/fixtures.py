"""Every comparison of a test against a file stored under tests/fixtures, with its tolerance.

Float results differ between CPUs (an AMD EPYC and the CPU that wrote a fixture differ by up to 7.5e-9 in a
weight after three optimizer steps): a stored fixture is compared within a tolerance, never bitwise. Each
tolerance is far above that noise and far below what a real change moves (the test that uses it shows a
real change, one more optimizer step, moving the result past it); bitwise comparisons stay between two runs
of one test.
"""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# fixture file (relative to tests/fixtures) -> absolute tolerance of the comparison, and why that much
TOLERANCES = {
    "pre_redesign/reference.npy": (1e-5, "pixels in [0, 1] after 3 DDIM steps; CPU noise ~1e-7"),
    "pre_redesign/step3_weights.safetensors": (1e-6, "CAM weights one AdamW step (warm-up lr 1.5e-5) past the "
                                                     "checkpoint; CPU noise <= 7.5e-9, one more step moves "
                                                     "them by ~1e-5"),
}


def tolerance(name: str) -> float:
    return TOLERANCES[name][0]
