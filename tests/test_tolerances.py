"""The suite's float tolerances (tests/helpers/tolerances.py) sit far below what they guard and are documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tolerances import EPS32, TOLERANCES, rounding_bound

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tests.md"


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_each_tolerance_is_far_below_the_effect_it_guards(name):
    tolerance = TOLERANCES[name]
    assert tolerance.atol > 0 and tolerance.rtol >= 0
    # the smallest change its comparisons exist to catch is at least 5 times the tolerance at that size
    assert tolerance.effect >= 5 * (tolerance.atol + tolerance.rtol * tolerance.effect), (name, tolerance)
    assert tolerance.derivation and tolerance.effect_is


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_docs_list_each_tolerance_with_its_value_and_effect(name):
    tolerance = TOLERANCES[name]
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith(f"| `{name}`")]
    assert len(rows) == 1, f"docs/tests.md's tolerance table has no single row for {name}"
    assert f"{tolerance.atol:g}" in rows[0] and f"{tolerance.effect:g}" in rows[0], rows[0]


def test_the_rounding_bound_counts_roundings_at_the_magnitude():
    assert rounding_bound(1.0) == EPS32
    assert rounding_bound(2.0, terms=10) == pytest.approx(20 * EPS32)
    # the bound holds for a real reordered float32 sum of 4096 terms
    import torch

    values = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    forward, backward = torch.zeros(()), torch.zeros(())
    for v in values:
        forward += v
    for v in values.flip(0):
        backward += v
    assert abs(float(forward - backward)) <= rounding_bound(float(forward), terms=4096)
