"""Every comparison of a test against a file stored under tests/fixtures, with its tolerance.

Float results differ between CPUs (an AMD EPYC and the CPU that wrote a fixture differ by up to 7.5e-9 in a
weight after three optimizer steps, by up to 7e-6 in an image sampled in 3 DDIM steps): a stored fixture is
compared within a tolerance, never bitwise. Each tolerance is far above that noise and far below what a real
change moves (the tests that use them show a real change, one more optimizer step, moving the weights past
theirs); bitwise comparisons stay between two runs of one test.
"""

from pathlib import Path

from tests.helpers.tolerances import IMAGES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# fixture file (relative to tests/fixtures) -> absolute tolerance of the comparison, and why that much
TOLERANCES = {
    "pre_redesign/reference.npy": (IMAGES.atol, "pixels in [0, 1] after 3 DDIM steps (tests/helpers/tolerances.py "
                                                "IMAGES): measured up to 7e-6 on three kernel sets; the raw weights "
                                                "sampled in place of the EMA ones move it by 3.7e-4"),
    "pre_redesign/step3_weights.safetensors": (1e-6, "CAM weights one AdamW step (warm-up lr 1.5e-5) past the "
                                                     "checkpoint; CPU noise <= 7.5e-9, one more step moves "
                                                     "them by ~1e-5"),
}


def tolerance(name: str) -> float:
    return TOLERANCES[name][0]
