"""The evidence experiment's fixed settings: its arms, prompt sets and subsets, and each protocol's rules and
evaluation scenes (docs/evidence/protocol.md, protocol_v3.md, protocol_v4.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = "docs/evidence/protocol.md"

ARMS = {
    "a": "(a) base",
    "a_chunked": "(a chunked) base, CLIP over 3 windows, untrained",
    "b": "(b) UNet ft",
    "b2": "(b2) UNet ft, chunked CLIP",
    "c": "(c) CAM, UNet frozen",
    "c_shuffled": "(c), LLM features of another scene",
    "d": "(d) CAM, then CAM + UNet",
    "e": "(e) (d) + entity loss",
    "d_shuffled": "(d), LLM features of another prompt",
    "c_gated": "(c) gated CAM, UNet frozen",
    "d_gated": "(d) gated CAM, then + UNet",
}
SETS = ("seen_1", "heldout_2", "phrased_2", "phrased_3", "verbose_2", "verbose_3")
# Arms that need fewer sets: (b2) differs from (b) only past CLIP's window; the ablation asks about verbose prompts.
ARM_SETS = {"b2": ("seen_1", "verbose_2", "verbose_3"), "d_shuffled": ("verbose_2", "verbose_3"),
            "c_shuffled": ("verbose_2", "verbose_3"), "a_chunked": ("verbose_2", "verbose_3")}
V4_SETS = ("seen_1", "phrased_2", "phrased_3", "verbose_2", "verbose_3")  # v4 decides nothing on heldout_2
SET_LIMITS = {"heldout_2": 24}           # continuity only: its first half
POST_NOMINAL = ("colored", "dense")      # "a circle colored red": CLIP's causal noun cannot see its colour
PRE_NOMINAL = ("list", "beside")         # "a red circle": it can


@dataclass(frozen=True)
class Protocol:
    """The settings a protocol document fixes (the training recipe lives in the configs): protocol.md (v2)
    by default, protocol_v3.md in ``PROTOCOLS["v3"]``, protocol_v4.md in ``PROTOCOLS["v4"]``."""
    document: str = PROTOCOL
    data_samples: int = 4096
    data_seed: int = 2025               # pretraining drew from "pretrain/0": disjoint scenes
    verbose_share: float = 0.75
    samples_per_shard: int = 512
    sampling_steps: int = 10
    guidance_scale: float = 5.0
    eval_batch: int = 48
    prompts_per_set: Optional[int] = None  # None: every prompt of a set (but SET_LIMITS); tests take a few
    scene_draw: int = 0                    # 0: the fixed evaluation scenes; > 0: freshly drawn ones (a replication)
    sets: tuple[str, ...] = SETS           # what arms (a) and the connector arms sample
    set_sizes: tuple[tuple[str, int], ...] = ()  # (set, prompts) where the protocol sizes a set itself (v4)
    rules: str = "v2"                      # whose decision rules: "v2" (v2 and v3, gates first) or "v4"
    shuffled_arm: str = "d"                # the arm whose checkpoint the shuffled-feature ablation samples
    chunked_base: bool = False             # v4: arm (a chunked), the base on CLIP over three windows, untrained
    training_jobs: Optional[int] = None    # training runs at a time (None: --jobs, as the evaluations)

    def prompts(self, name: str) -> Optional[int]:
        """How many of set ``name``'s prompts are sampled (the first ones)."""
        sized = dict(self.set_sizes).get(name, SET_LIMITS.get(name))
        limits = [n for n in (self.prompts_per_set, sized) if n is not None]
        return min(limits) if limits else None

    def set_size(self, name: str) -> Optional[int]:
        """The prompts the protocol itself gives set ``name`` (None: the set as it is), ignoring test limits."""
        return dict(self.set_sizes).get(name)
    gate_base_drop: float = -0.03        # (b) - (a) on seen_1 and the short sets, at least
    gate_probe: float = 0.95             # the probe's own-colour accuracy at the chosen layer, at least
    primary_effect: float = 0.10         # (d) - (b) on outside-window objects, at least
    primary_refuted_below: float = 0.05  # the primary CI's upper bound under this refutes
    keep_inside: float = -0.03           # (d) - (b) on inside-window objects and seen_1, at least
    secondary_effect: float = 0.04       # (d) - (b) on post-nominal short prompts, at least
    secondary_refuted_below: float = 0.02
    damage: Optional[float] = None       # v3: an arm more than this below the base on seen_1 "damages the base"


PROTOCOL_SETTINGS = Protocol()
PROTOCOLS = {  # --protocol: what each study reads its rules and evaluation scenes from
    "v2": PROTOCOL_SETTINGS,
    "v3": Protocol(document="docs/evidence/protocol_v3.md", damage=0.03),
    "v3-replication": Protocol(document="docs/evidence/protocol_v3.md", damage=0.03, scene_draw=1),
    # the confirmatory study: arms (a), (a chunked), (c), (c shuffled); set sizes from v3's variance (the
    # protocol's "Evaluation sets"); scenes of draw 3; the three 1500-step runs side by side on 2 cores
    "v4": Protocol(document="docs/evidence/protocol_v4.md", damage=0.03, scene_draw=3, sets=V4_SETS,
                   set_sizes=(("seen_1", 96), ("verbose_2", 96), ("verbose_3", 96)), rules="v4", shuffled_arm="c",
                   chunked_base=True, training_jobs=3),
}


