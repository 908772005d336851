"""T2I-CompBench as published, pinned: its attribute-binding prompt files at two upstream commits, and the
two protocols a score can be measured under.

The benchmark moved after its paper (github.com/Karine-Huang/T2I-CompBench):

- ``t2i-compbench-2023``: what the published tables (and LLM4GEN's) were measured with. The July 2023
  prompt files (commit 7710d05), the first ``BLIPvqa_eval/BLIP_vqa.py``: the first 2 noun phrases of a
  prompt (``--np_num 2``), no ignored phrases; images from ``GORS_finetune/inference_eval.py``: 30 DDIM
  steps, guidance 7.5 (the pipeline's default), image n of *every* prompt with seed 42 + n, 10 images.
- ``t2i-compbench``: today's official scorer. Up to 8 noun phrases (December 2023), the spatial phrases
  "top", "the side", "the left", "the right" dropped (January 2024), and ``color_val.txt`` with 5 of its
  prompts replaced (commit 3310c2f, September 2025); generation unchanged.

The files ship in ``data/t2i_compbench/<version>/`` under the benchmark's MIT licence (``LICENSE`` there).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

UPSTREAM = "https://github.com/Karine-Huang/T2I-CompBench"
DATA = Path(__file__).resolve().parent / "data" / "t2i_compbench"
CATEGORIES = ("color", "shape", "texture")

# sha256 of each upstream file at its commit (what ships in DATA/<version>/)
PROMPT_FILES: dict[str, dict] = {
    "2023-07": {"commit": "7710d059c3391fe97fbf9e2ad3813ed0e7d87979", "files": {
        "color_val.txt": "1e37a12c1861bf6b11623eaffb0bf6d6eeea9702caf45b95d040f1721bba7f4f",
        "shape_val.txt": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
        "texture_val.txt": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f"}},
    "2025-09": {"commit": "3310c2f1f43cc173505fc40cf6cc70762f090c07", "files": {
        "color_val.txt": "1634259756dbc77d13093d907d414480080ec9790a8c97ad09efaea7b2534f2d",
        "shape_val.txt": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
        "texture_val.txt": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f"}},
}
OFFICIAL_SPACY = "3.5.0"  # the version T2I-CompBench's environment pins (en_core_web_sm 3.5.0)


@dataclass(frozen=True)
class Protocol:
    name: str
    prompt_version: str          # a key of PROMPT_FILES
    noun_phrase_cap: int         # the first N noun phrases are asked (np_num)
    ignore_spatial: bool         # drop "top", "the side", "the left", "the right"
    seed: int = 42               # image n of every prompt: seed + n
    images_per_prompt: int = 10
    steps: int = 30
    scheduler: str = "DDIMScheduler"
    guidance_scale: float = 7.5

    def record(self) -> dict:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "t2i-compbench-2023": Protocol("t2i-compbench-2023", "2023-07", noun_phrase_cap=2, ignore_spatial=False),
    "t2i-compbench": Protocol("t2i-compbench", "2025-09", noun_phrase_cap=8, ignore_spatial=True),
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_folder(version: str) -> Path:
    """The pinned prompt files of ``version`` (a key of PROMPT_FILES)."""
    if version not in PROMPT_FILES:
        raise ValueError(f"T2I-CompBench prompt version {version!r}: expected one of {', '.join(PROMPT_FILES)}")
    return DATA / version


def matching_versions(path: Path) -> list[str]:
    """The pinned versions a user's category file is byte-identical to ([] for none)."""
    digest = sha256_of(path)
    return [v for v, pinned in PROMPT_FILES.items() if pinned["files"].get(Path(path).name) == digest]


def check_prompt_file(path: Path, protocol: Optional[Protocol]) -> Optional[str]:
    """A warning for a user-given category file that is not the protocol's pinned one (None: it is, or no
    protocol and it matches some pinned version)."""
    versions = matching_versions(path)
    name = Path(path).name
    if protocol is not None and protocol.prompt_version in versions:
        return None
    if protocol is None and versions:
        return None
    found = f"it matches the pinned {', '.join(versions)} files" if versions else "it matches no pinned version"
    wanted = (f"--protocol {protocol.name} uses the {protocol.prompt_version} files" if protocol
              else "scores are comparable with published rows only on a pinned version")
    return (f"{path}: {found} (sha256 {sha256_of(path)[:12]}...); {wanted}. Omit --compbench to use the shipped "
            f"files ({shipped_folder(protocol.prompt_version if protocol else '2023-07')}) for {name}.")
