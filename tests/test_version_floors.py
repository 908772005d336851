"""setup.cfg's version floors are what the code needs.

Offline, a lowest-versions resolution cannot be installed here (it needs the registry's old wheels, and
PyPI's old torch wheels are multi-GB CUDA builds). Instead :data:`REQUIRED_APIS` lists the APIs the code
relies on whose age matters, each with the release that introduced it, the file that uses it and a
probe on the installed version. The test refuses a floor below what the table needs, a table entry
whose use has left the code (so the table stays true), a requirement without a floor, and a pin in
constraints.txt outside the declared range.

How the versions were established: transformers ``key_mapping`` and ``dtype=`` by reading the 4.48.0,
4.50.0 and 4.56.0 wheels from PyPI (absent, present / absent, present); CLIPTokenizer's base class in
the 4.56.0 wheel (``PreTrainedTokenizer``, the slow one) against 5.x's Rust backend; webdataset
``ShardWriter(mtime=)`` in the 0.2.86 wheel; the rest from the libraries' release notes.
"""

from __future__ import annotations

import configparser
import importlib
import inspect
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _has_parameter(func: Callable, name: str) -> bool:
    return name in inspect.signature(func).parameters or name in inspect.getsource(func)


def _clip_tokenizer_is_fast() -> bool:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ROOT / "embedded" / "clip_tokenizer").is_fast


@dataclass(frozen=True)
class Api:
    package: str
    introduced: str
    what: str
    used_in: str        # file that uses it
    use_pattern: str    # regex found in that file
    probe: Callable[[], bool]


REQUIRED_APIS = [
    Api("transformers", "5.0", "CLIPTokenizer is the fast (Rust) tokenizer: word alignment for the entity loss "
        "needs return_offsets_mapping (4.x's CLIPTokenizer is the slow one)", "encoders/stable_diffusion.py",
        r"part\(CLIPTokenizer, \"tokenizer\"\)", _clip_tokenizer_is_fast),
    Api("transformers", "4.56", "from_pretrained(dtype=...) (earlier releases read torch_dtype and ignore dtype: "
        "the frozen models would load in fp32)", "encoders/llm.py", r"dtype=dtype",
        lambda: _has_parameter(importlib.import_module("transformers").PreTrainedModel.from_pretrained.__func__, "dtype")),
    Api("transformers", "4.50", "from_pretrained(key_mapping=...) maps RankGen's t5_encoder. prefix",
        "encoders/llm.py", r"key_mapping=RANKGEN_KEY_MAPPING",
        lambda: _has_parameter(importlib.import_module("transformers").PreTrainedModel.from_pretrained.__func__, "key_mapping")),
    Api("torch", "2.1", "nn.Module.load_state_dict(assign=)", "lightning_modules/llm4gen.py", r"assign=assign",
        lambda: "assign" in inspect.signature(importlib.import_module("torch").nn.Module.load_state_dict).parameters),
    Api("torch", "2.0", "F.scaled_dot_product_attention", "adapters/cross_adapter.py", r"F\.scaled_dot_product_attention",
        lambda: hasattr(importlib.import_module("torch.nn.functional"), "scaled_dot_product_attention")),
    Api("diffusers", "0.27", "diffusers.training_utils.cast_training_params", "lightning_modules/llm4gen.py",
        r"cast_training_params", lambda: hasattr(importlib.import_module("diffusers.training_utils"), "cast_training_params")),
    Api("diffusers", "0.26", "diffusers.models.autoencoders.vae (the module moved there)", "lightning_modules/llm4gen.py",
        r"from diffusers\.models\.autoencoders\.vae import",
        lambda: hasattr(importlib.import_module("diffusers.models.autoencoders.vae"), "DiagonalGaussianDistribution")),
    Api("lightning", "2.1", "ModelCheckpoint(enable_version_counter=)", "cli/train.py", r"enable_version_counter=",
        lambda: "enable_version_counter" in inspect.signature(
            importlib.import_module("lightning.pytorch.callbacks").ModelCheckpoint.__init__).parameters),
    Api("webdataset", "0.2.86", "ShardWriter(mtime=) for reproducible tars", "datamodules/synthetic.py", r"mtime=0\.0",
        lambda: "mtime" in inspect.signature(importlib.import_module("webdataset").TarWriter.__init__).parameters),
    Api("pillow", "9.1", "Image.Resampling", "datamodules/transforms.py", r"Image\.Resampling\.",
        lambda: hasattr(importlib.import_module("PIL.Image"), "Resampling")),
]


def declared_requirements() -> dict[str, Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {r.name.lower(): r for r in requirements}


def floor(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_every_requirement_has_a_floor():
    missing = [name for name, req in declared_requirements().items() if floor(req) is None]
    assert not missing, f"setup.cfg requirements without a >= floor: {missing}"


@pytest.mark.parametrize("api", REQUIRED_APIS, ids=lambda a: f"{a.package}>={a.introduced}:{a.used_in}")
def test_floor_covers_the_api(api):
    requirement = declared_requirements()[api.package]
    assert floor(requirement) >= Version(api.introduced), (
        f"setup.cfg has {requirement}, but {api.used_in} uses {api.what}, introduced in {api.package} {api.introduced}")
    source = (ROOT / api.used_in).read_text()
    assert re.search(api.use_pattern, source), (
        f"{api.used_in} no longer matches {api.use_pattern!r}: update REQUIRED_APIS (and maybe the floor)")
    assert api.probe(), f"the installed {api.package} {metadata.version(api.package)} lacks {api.what}"


def test_pinned_versions_lie_in_the_declared_ranges():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    outside = [f"{name}=={pins[name]} not in {req}" for name, req in declared_requirements().items()
               if name in pins and not req.specifier.contains(pins[name], prereleases=True)]
    assert not outside, outside
    unpinned = sorted(set(declared_requirements()) - set(pins))
    assert not unpinned, f"requirements CI does not pin in constraints.txt: {unpinned}"


def test_the_check_refuses_a_low_floor():
    """The floor comparison itself: transformers>=4.44 (the old floor) is below what the table needs."""
    needed = max(Version(a.introduced) for a in REQUIRED_APIS if a.package == "transformers")
    assert needed == Version("5.0")
    assert not floor(Requirement("transformers>=4.44")) >= needed
    assert floor(Requirement("transformers>=5.0,<6")) >= needed
