"""The one reader of torch files (lightning_modules/safe_loading.py): a file crafted to run code when unpickled is
refused before its payload runs, in every reader of checkpoints below the entry points (checkpoint files, sharded
folders' meta.pt, DCP index and entries, the resume search and the non-finite scan, Lightning's resume hook,
module building); what this project writes reads without trust; --trust-checkpoint runs the payload (the crafted
files are live). And, read from the source: no module of the package unpickles anything without
``weights_only=True`` outside that one reader, or decodes shards with webdataset's default (pickle) handlers."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest
import torch

from llm4gen.lightning_modules.callbacks import AtomicCheckpointIO
from llm4gen.lightning_modules.checkpoint_files import read_checkpoint
from llm4gen.lightning_modules.llm4gen import LLM4GenModule
from llm4gen.lightning_modules.run_checkpoints import (
    checkpoint_step,
    find_resume_checkpoint,
    nonfinite_in,
    prune_signal_checkpoints,
)
from llm4gen.lightning_modules.safe_loading import (
    TRUST_FLAG,
    UntrustedCheckpointError,
    dcp_load,
    load_torch_file,
    read_dcp_index,
    trusted_checkpoints,
)
from llm4gen.lightning_modules.sampler import load_checkpoint_module
from llm4gen.lightning_modules.sharding import consolidated_checkpoint
from tests.helpers.untrusted import CreatesFile, crafted_checkpoint, crafted_dcp_index, sharded_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "pre_redesign" / "step2.ckpt"


def refused(call, marker: Path) -> str:
    """The refusal's message; the payload did not run."""
    with pytest.raises(UntrustedCheckpointError) as caught:
        call()
    assert not marker.exists(), "the crafted file's payload ran"
    message = str(caught.value)
    assert "holds more than tensors and plain Python values" in message and TRUST_FLAG in message
    return message


def test_a_crafted_checkpoint_is_refused_naming_what_it_holds(tmp_path):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "x.ckpt", marker)
    message = refused(lambda: load_torch_file(path), marker)
    assert "it names io.open" in message and str(path) in message


def test_trusting_a_crafted_checkpoint_runs_it_and_only_within_the_flag(tmp_path):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "x.ckpt", marker)
    with trusted_checkpoints():
        load_torch_file(path)
    assert marker.exists()  # the file is live: reading it fully runs its payload
    marker.unlink()
    refused(lambda: load_torch_file(path), marker)  # trust ends with the flag's scope


def test_what_this_project_wrote_reads_without_trust():
    checkpoint = load_torch_file(FIXTURE, mmap=True)  # a checkpoint of an earlier version (tests/fixtures)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["model"]["base"]["family"] == "sd15"
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert len(checkpoint["ema"]["shadow_params"]) == len(checkpoint["state_dict"])


def test_every_checkpoint_reader_refuses_a_crafted_file(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    monkeypatch.setattr(LLM4GenModule, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    for read in (lambda: read_checkpoint(path), lambda: checkpoint_step(path), lambda: nonfinite_in(path),
                 lambda: find_resume_checkpoint(tmp_path / "run"), lambda: load_checkpoint_module(path),
                 lambda: AtomicCheckpointIO().load_checkpoint(path)):  # the last: trainer.fit(ckpt_path=...)
        refused(read, marker)


def test_pruning_leaves_a_crafted_signal_checkpoint_for_resume_to_refuse(tmp_path):
    marker = tmp_path / "ran"
    crafted = crafted_checkpoint(tmp_path / "hpc_ckpt_3.ckpt", marker, step=3)
    torch.save({"global_step": 4, "state_dict": {}}, tmp_path / "saved.ckpt")
    assert prune_signal_checkpoints(tmp_path, 4, tmp_path / "saved.ckpt") == [] and crafted.exists()
    assert not marker.exists()


def test_a_sharded_folder_reads_as_the_strategy_wrote_it(tmp_path):
    folder = sharded_checkpoint(tmp_path / "last.ckpt", step=7)
    checkpoint = consolidated_checkpoint(folder)
    weight = torch.arange(4.0).reshape(2, 2)
    assert checkpoint["global_step"] == 7 and torch.equal(checkpoint["state_dict"]["adapter.blocks.0.q_proj.weight"], weight)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert checkpoint["ema"]["decay"] == 0.999 and torch.equal(checkpoint["ema"]["shadow_params"][0], weight + 1)
    assert checkpoint_step(folder) == 7 and list(read_checkpoint(folder)["state_dict"]) == ["adapter.blocks.0.q_proj.weight"]
    # what ShardedStrategy.load_checkpoint reads: into the given state, resharded
    state = {"state_dict": {"adapter.blocks.0.q_proj.weight": torch.zeros(2, 2)}, "ema": {
        "decay": 0.0, "optimization_step": 0, "shadow_params": [torch.zeros(2, 2)]}}
    dcp_load(state, folder)
    assert torch.equal(state["state_dict"]["adapter.blocks.0.q_proj.weight"], weight) and state["ema"]["decay"] == 0.999


@pytest.mark.parametrize("part", ["meta.pt", "index", "entry"])
def test_a_sharded_folder_with_a_crafted_part_is_refused(tmp_path, part):
    marker = tmp_path / "ran"
    folder = sharded_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt",
                                meta_extra={"loops": CreatesFile(marker)} if part == "meta.pt" else None,
                                entry_extra={"power": CreatesFile(marker)} if part == "entry" else None)
    if part == "index":
        crafted_dcp_index(folder, marker)
    message = refused(lambda: consolidated_checkpoint(folder), marker)
    assert {"meta.pt": "(its meta.pt)", "index": "(its .metadata)", "entry": "entry 'ema.power'"}[part] in message
    refused(lambda: find_resume_checkpoint(tmp_path / "run"), marker)  # resume=auto: its step, then its scan
    if part != "entry":  # the index and meta.pt are what --checkpoint reads before any weight
        refused(lambda: read_checkpoint(folder), marker)
    else:  # what a resumed sharded run reads into its state
        state = {"ema": {"decay": 0.0, "power": 0.0, "optimization_step": 0, "shadow_params": [torch.zeros(2, 2)]}}
        refused(lambda: dcp_load(state, folder), marker)
    with trusted_checkpoints():
        consolidated_checkpoint(folder) if part != "index" else read_dcp_index(folder)
    assert marker.exists()  # trusted, the crafted part runs: it was live


# ---------------------------------------------------------------- the source: one reader unpickles


UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "load"),
              ("_pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"),
              ("dill", "loads"), ("joblib", "load"), ("pandas", "read_pickle"), ("shelve", "open"),
              ("torch.serialization", "load")}
WEBDATASET_DECODING = {"decode", "autodecode", "Decoder", "torch_loads", "basichandlers", "default_handlers",
                       "handle_extension"}
ONE_READER = "llm4gen.lightning_modules.safe_loading"


def unsafe_reads(source: str) -> list[tuple[int, str, bool]]:
    """(line, what, guarded) for each read in ``source`` that can run code: an unpickler, ``torch.load``
    without ``weights_only=True``, ``np.load(allow_pickle=True)``, webdataset's decoding (its default
    handlers unpickle .pyd and .pickle members). ``guarded``: inside an ``if _trusted:`` block."""
    tree = ast.parse(source)
    names: dict[str, str] = {}  # local name -> module.attribute or module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def dotted(node) -> str | None:
        if isinstance(node, ast.Name):
            return names.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = []

    def visit(node, guarded: bool) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "_trusted":
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, guarded)
            return
        if isinstance(node, ast.Call):
            name = dotted(node.func) or ""
            module, _, attribute = name.rpartition(".")
            keywords = {k.arg: k.value for k in node.keywords}
            safe_weights = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            if name in ("torch.load", "torch.serialization.load") and not safe_weights:
                found.append((node.lineno, name, guarded))
            elif (module, attribute) in UNPICKLERS:
                found.append((node.lineno, name, guarded))
            elif name in ("numpy.load", "np.load") and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                    and keywords["allow_pickle"].value is not False:
                found.append((node.lineno, name, guarded))
            elif isinstance(node.func, ast.Attribute) and node.func.attr == "decode" and isinstance(node.func.value, ast.Call) \
                    and (dotted(node.func.value.func) or "").startswith("webdataset."):
                found.append((node.lineno, "webdataset decode", guarded))
        if isinstance(node, ast.ClassDef) and any(dotted(base) == "pickle.Unpickler" for base in node.bases):
            found.append((node.lineno, "pickle.Unpickler subclass", guarded))
        if isinstance(node, ast.Attribute) and node.attr in WEBDATASET_DECODING and dotted(node.value) == "webdataset":
            found.append((node.lineno, f"webdataset.{node.attr}", guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_the_scan_finds_what_it_looks_for():
    assert [what for _, what, _ in unsafe_reads(
        "import torch, pickle\nimport numpy as np\nimport webdataset as wds\nfrom pickle import loads\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\npickle.load(f)\n"
        "loads(b)\nnp.load(f, allow_pickle=True)\nnp.load(f)\nwds.WebDataset(u).decode('pil')\n"
        "wds.WebDataset(u)\nwds.autodecode.Decoder([])\nclass U(pickle.Unpickler):\n    pass\n")] == [
        "torch.load", "torch.load", "pickle.load", "pickle.loads", "numpy.load", "webdataset decode",
        "webdataset.autodecode", "pickle.Unpickler subclass"]
    assert unsafe_reads("_trusted = 1\nimport torch\nif _trusted:\n    torch.load(p)\n") == [(4, "torch.load", True)]


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, from setup.cfg's package_dir (the folders that become llm4gen.*)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    found = {}
    for line in config["options"]["package_dir"].strip().splitlines():
        package, folder = (part.strip() for part in line.split("="))
        for path in (ROOT / folder).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def test_no_module_unpickles_outside_the_one_reader_and_it_only_when_trusted():
    found = {name: unsafe_reads(path.read_text()) for name, path in package_modules().items()}
    assert len(found) > 100 and ONE_READER in found
    outside = {name: reads for name, reads in found.items() if reads and name != ONE_READER}
    assert outside == {}, f"reads that can run code outside {ONE_READER}: {outside}"
    # inside it: full unpickling only under --trust-checkpoint, and the DCP index's unpickler, which resolves
    # only the classes it names
    unguarded = [read for read in found[ONE_READER] if not read[2] and read[1] != "pickle.Unpickler subclass"]
    assert len(found[ONE_READER]) == 3 and unguarded == [], found[ONE_READER]
