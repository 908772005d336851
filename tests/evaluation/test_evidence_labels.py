"""The evidence report names every arm apart: the shuffled-features ablation of (d) is "(d shuffled)", and a
report written before that (its results.json says "(d),") replots under the new name."""

import gzip
import json

from PIL import Image

from llm4gen.experiments.evidence_protocol import ARMS
from llm4gen.experiments.evidence_report import COMPARISONS, arm_tag, difference_label, replot


def test_every_compared_arm_has_its_own_tag():
    tags = {arm: arm_tag(arm) for arm in ARMS}
    assert len(set(tags.values())) == len(tags) and tags["d_shuffled"] == "(d shuffled)" and tags["d"] == "(d)"
    labels = [difference_label(a, b, s) for a, b, s in COMPARISONS]
    assert len(set(labels)) == len(labels) and "(d shuffled) - (b), outside" in labels


def test_replot_reads_a_report_and_relabels_the_legacy_name(tmp_path):
    recorded = {"differences": {
        "(d) - (b), outside": {"mean": 0.03, "low": 0.01, "high": 0.05, "n": 10, "clusters": 5, "per_seed": {"0": 0.03}},
        "(d), - (b), outside": {"mean": 0.02, "low": 0.0, "high": 0.04, "n": 10, "clusters": 5, "per_seed": {"0": 0.02}}}}
    path = tmp_path / "results.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(recorded, handle)
    out = replot(path, tmp_path / "differences.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[1] > 100
