"""The evidence experiment's statistics and rules, pure functions of the per-object records: subsets, rates,
paired differences, the gates and the decision rules as the protocols write them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from llm4gen.evaluation.paired import Difference, Observation, paired_difference
from llm4gen.experiments.evidence_protocol import ARMS, POST_NOMINAL, PRE_NOMINAL, PROTOCOL_SETTINGS, Protocol
from llm4gen.experiments.evidence_tasks import ObjectRecord


# ---------------------------------------------------------------- subsets, rates and comparisons (pure)

# name -> (what it is, predicate over an ObjectRecord)
SUBSETS = {
    "outside": ("verbose prompts, objects past CLIP's window", lambda r: r.window == "outside"),
    "inside": ("verbose prompts, objects CLIP's window holds", lambda r: r.window == "inside"),
    "seen_1": ("single objects (seen_1)", lambda r: r.set == "seen_1"),
    "heldout_2": ("two objects, a held-out pair (heldout_2)", lambda r: r.set == "heldout_2"),
    "short": ("short prompts, every phrasing (phrased_2/3)", lambda r: r.set.startswith("phrased_")),
    "post_nominal": ("short prompts, colour after its noun (colored, dense)",
                     lambda r: r.set.startswith("phrased_") and r.phrasing in POST_NOMINAL),
    "pre_nominal": ("short prompts, colour before its noun (list, beside)",
                    lambda r: r.set.startswith("phrased_") and r.phrasing in PRE_NOMINAL),
}


def select(records: list[ObjectRecord], arm: str, subset: str) -> list[ObjectRecord]:
    keep = SUBSETS[subset][1]
    return [r for r in records if r.arm == arm and keep(r)]


def observations(records: list[ObjectRecord], category: str = "bound") -> list[Observation]:
    """1.0 where an object's outcome is ``category``, keyed so two arms' records pair up."""
    return [Observation((r.seed, r.set, r.prompt, r.object), r.scene, r.seed, float(r.category == category))
            for r in records]


def rate(records: list[ObjectRecord], category: str = "bound") -> Optional[float]:
    return sum(r.category == category for r in records) / len(records) if records else None


def per_seed_rates(records: list[ObjectRecord], category: str = "bound") -> dict[int, float]:
    seeds = sorted({r.seed for r in records})
    return {s: rate([r for r in records if r.seed == s], category) for s in seeds}


def compare(records: list[ObjectRecord], a: str, b: str, subset: str, category: str = "bound",
            samples: int = 2000) -> Optional[Difference]:
    """``a - b`` on ``subset``'s objects (share in ``category``), paired; None when either arm lacks it."""
    first, second = select(records, a, subset), select(records, b, subset)
    if not first or not second:
        return None
    return paired_difference(observations(first, category), observations(second, category), samples=samples)


def leaks(records: list[ObjectRecord]) -> list[ObjectRecord]:
    """The records with "leaked" as their category when the object leaked a colour or shape (for rates)."""
    return [r if r.category not in ("leaked_color", "leaked_shape") else
            ObjectRecord(**{**asdict(r), "category": "leaked"}) for r in records]


# ---------------------------------------------------------------- gates and decision rules (pure)


@dataclass
class Check:
    name: str
    passed: Optional[bool]   # None: could not be measured
    detail: str
    guards: tuple[str, ...] = ("primary", "secondary")  # the decision rules this gate is a precondition of


def gates(records: list[ObjectRecord], probe: Optional[dict], truncated: int, attention: dict[str, float],
          protocol: Protocol = PROTOCOL_SETTINGS) -> list[Check]:
    """The protocol's gates; a failed gate makes the rules it guards inconclusive. The probe gate is read
    per claim (protocol.md, pilot 2): the short phrasings guard the binding rule; the issue's literal
    reading, every phrasing pooled, is reported beside them and guards nothing by itself."""
    checks = []
    for subset in ("seen_1", "short"):
        diff = compare(records, "b", "a", subset)
        checks.append(Check(f"(b) - (a) on {subset} >= {protocol.gate_base_drop}",
                            None if diff is None else diff.mean >= protocol.gate_base_drop,
                            "not measured" if diff is None else fmt(diff)))
    if probe is None:
        checks.append(Check(f"probe own colour >= {protocol.gate_probe}", None, "not measured", ("secondary",)))
    else:
        test = probe["test"]
        per_phrasing = ", ".join(f"{k} {v['own']:.2f}" for k, v in test.items() if k not in ("all", "short"))
        checks.append(Check(f"probe own colour at layer {probe['layer']} >= {protocol.gate_probe}, short phrasings "
                            f"(the binding claim's precondition)", test["short"]["own"] >= protocol.gate_probe,
                            f"{test['short']['own']:.3f} ({per_phrasing})", ("secondary",)))
        checks.append(Check(f"probe own colour at layer {probe['layer']} >= {protocol.gate_probe}, every phrasing "
                            f"pooled (the issue's literal gate; reported, guards no rule by itself)",
                            test["all"]["own"] >= protocol.gate_probe, f"{test['all']['own']:.3f}", ()))
    checks.append(Check("no caption truncated by the LLM (the long-description claim's precondition)", truncated == 0,
                        f"{truncated} captions over max_length"))
    checks.append(Check("cross-attention on CLIP / the CAM's tokens / LLM padding measured", bool(attention) or None,
                        ", ".join(f"{ARMS[a]} {v['clip']:.2f} / {v['llm']:.2f} / {v['padding']:.2f}"
                                  for a, v in attention.items()) or "not measured"))
    return checks


def decisions(records: list[ObjectRecord], gate_checks: list[Check],
              protocol: Protocol = PROTOCOL_SETTINGS) -> dict[str, dict]:
    """Both pre-registered rules applied: each "shown", "refuted" or "inconclusive", with the reasons; and
    what each would be if every gate, the literal probe gate included, guarded it."""
    def gates_pass(rule: str, literal: bool = False) -> bool:
        return all(c.passed for c in gate_checks if rule in c.guards or (literal and not c.guards))

    d_b = compare(records, "d", "b", "outside")
    d_b2 = compare(records, "d", "b2", "outside")
    shuffled = compare(records, "d_shuffled", "b", "outside")
    inside = compare(records, "d", "b", "inside")
    single = compare(records, "d", "b", "seen_1")
    primary_checks = []
    if d_b is not None:
        primary_checks += [
            Check(f"(d) - (b) on outside-window objects >= +{protocol.primary_effect}, CI above 0, positive in every seed",
                  d_b.mean >= protocol.primary_effect and d_b.low > 0 and d_b.positive_in_every_seed, fmt(d_b))]
    if d_b2 is not None:
        primary_checks.append(Check("(d) - (b2) on outside-window objects > 0, CI above 0", d_b2.mean > 0 and d_b2.low > 0,
                                    fmt(d_b2)))
    if shuffled is not None and d_b is not None:
        primary_checks.append(Check("the shuffled-feature ablation loses most of the gain: (d shuffled) - (b) <= half of (d) - (b)",
                                    shuffled.mean <= d_b.mean / 2, f"{shuffled.mean:+.3f} vs half of {d_b.mean:+.3f}"))
    for diff, what in ((inside, "inside-window objects"), (single, "seen_1")):
        if diff is not None:
            primary_checks.append(Check(f"(d) - (b) on {what} >= {protocol.keep_inside}", diff.mean >= protocol.keep_inside,
                                        fmt(diff)))
    refuted = d_b is not None and (d_b.high < protocol.primary_refuted_below or
                                   (d_b2 is not None and d_b2.high < protocol.primary_refuted_below))

    post = compare(records, "d", "b", "post_nominal")
    pre = compare(records, "d", "b", "pre_nominal")
    secondary_checks = []
    if post is not None:
        secondary_checks.append(Check(f"(d) - (b) on post-nominal short prompts >= +{protocol.secondary_effect}, CI above 0",
                                      post.mean >= protocol.secondary_effect and post.low > 0, fmt(post)))
        fewer_leaks = compare_categories(records, "post_nominal", ("leaked_color", "leaked_shape"))
        fewer_missing = compare_categories(records, "post_nominal", ("missing_object",))
        secondary_checks.append(Check("from fewer leaks rather than fewer missing objects: (b) - (d) leaks > (b) - (d) missing",
                                      fewer_leaks > fewer_missing, f"leaks {fewer_leaks:+.3f}, missing {fewer_missing:+.3f}"))
        if pre is not None:
            secondary_checks.append(Check("larger than on pre-nominal prompts", post.mean > pre.mean,
                                          f"post {post.mean:+.3f} vs pre {pre.mean:+.3f}"))
    secondary_refuted = post is not None and post.high < protocol.secondary_refuted_below
    return {
        "primary": {**verdict(gates_pass("primary"), primary_checks, refuted, expected=5),
                    "literal": verdict(gates_pass("primary", True), primary_checks, refuted, expected=5)["outcome"]},
        "secondary": {**verdict(gates_pass("secondary"), secondary_checks, secondary_refuted, expected=3),
                      "literal": verdict(gates_pass("secondary", True), secondary_checks, secondary_refuted, expected=3)["outcome"]},
    }


def compare_categories(records: list[ObjectRecord], subset: str, categories: tuple[str, ...]) -> float:
    """(b)'s share of ``subset``'s objects in ``categories`` minus (d)'s (positive: (d) has fewer)."""
    def share(arm):
        chosen = select(records, arm, subset)
        return sum(r.category in categories for r in chosen) / len(chosen) if chosen else 0.0
    return share("b") - share("d")


# ---------------------------------------------------------------- protocol v4 (docs/evidence/protocol_v4.md)


def decisions_v4(records: list[ObjectRecord], protocol: Protocol) -> dict[str, dict]:
    """Protocol v4's two rules, no gates: the primary (the CAM over the frozen base draws what CLIP's window
    cuts off, from the description, beyond what chunked CLIP gives, and costs the base nothing) and the secondary
    (binding on post-nominal short prompts). Each "shown", "refuted" or "inconclusive"; ``because`` says what
    made it so."""
    gain = compare(records, "c", "a", "outside")
    shuffled = compare(records, "c_shuffled", "a", "outside")
    chunked = compare(records, "c", "a_chunked", "outside")
    damage = {subset: compare(records, "c", "a", subset) for subset in ("seen_1", "short")}
    checks, refutations = [], []
    if gain is not None:
        checks.append(Check(f"gain: (c) - (a) on outside-window objects >= +{protocol.primary_effect}, CI above 0, "
                            f"positive in every seed", gain.mean >= protocol.primary_effect and gain.low > 0
                            and gain.positive_in_every_seed, fmt(gain)))
        if gain.high < protocol.primary_refuted_below:
            refutations.append(f"the gain's CI ends below +{protocol.primary_refuted_below} ({gain.high:+.3f})")
    if shuffled is not None and gain is not None:
        checks.append(Check("from the description: (c shuffled) - (a) on outside-window objects <= half of (c) - (a)",
                            shuffled.mean <= gain.mean / 2, f"{fmt(shuffled)} vs half of {gain.mean:+.3f}"))
    if chunked is not None:
        checks.append(Check("beyond chunked CLIP: (c) - (a chunked) on outside-window objects > 0, CI above 0",
                            chunked.mean > 0 and chunked.low > 0, fmt(chunked)))
        if chunked.high < 0:
            refutations.append(f"chunked CLIP draws more past the window: (c) - (a chunked) CI ends at {chunked.high:+.3f}")
    for subset, diff in damage.items():
        if diff is None:
            continue
        checks.append(Check(f"no damage: (c) - (a) on {subset} >= {protocol.keep_inside} (point estimate; the CI's "
                            f"lower end reported)", diff.mean >= protocol.keep_inside, fmt(diff)))
        if diff.mean < protocol.keep_inside and diff.high < 0:
            refutations.append(f"(c) damages the base on {subset}: {diff.mean:+.3f}, CI ends at {diff.high:+.3f}")

    post = compare(records, "c", "a", "post_nominal")
    secondary_checks, secondary_refutations = [], []
    if post is not None:
        secondary_checks.append(Check(f"(c) - (a) on post-nominal short prompts >= +{protocol.secondary_effect}, CI above 0",
                                      post.mean >= protocol.secondary_effect and post.low > 0, fmt(post)))
        if post.high < protocol.secondary_refuted_below:
            secondary_refutations.append(f"its CI ends below +{protocol.secondary_refuted_below} ({post.high:+.3f})")
    return {"primary": outcome_v4(checks, refutations, expected=5),
            "secondary": outcome_v4(secondary_checks, secondary_refutations, expected=1)}


def outcome_v4(checks: list[Check], refutations: list[str], expected: int) -> dict:
    """Shown when every check was measured and passed; refuted when any refutation holds; else inconclusive."""
    failed = [c.name for c in checks if not c.passed]
    if len(checks) == expected and not failed:
        outcome, because = "shown", ["every check passed"]
    elif refutations:
        outcome, because = "refuted", refutations
    else:
        outcome = "inconclusive"
        because = [f"failed: {name}" for name in failed] + (
            [f"{expected - len(checks)} of {expected} checks not measured"] if len(checks) < expected else [])
        because.append("no refutation holds")
    return {"outcome": outcome, "because": because, "checks": [asdict(c) for c in checks]}


def verdict(gates_pass: bool, checks: list[Check], refuted: bool, expected: int) -> dict:
    if not gates_pass:
        outcome = "inconclusive (a gate failed)"
    elif len(checks) == expected and all(c.passed for c in checks):
        outcome = "shown"
    elif refuted:
        outcome = "refuted"
    else:
        outcome = "inconclusive"
    return {"outcome": outcome, "checks": [asdict(c) for c in checks]}


def fmt(diff: Difference) -> str:
    seeds = ", ".join(f"{v:+.3f}" for v in diff.per_seed.values())
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] (per seed {seeds}; {diff.n} objects, {diff.clusters} scenes)"


