"""Docstrings and comments cite papers, upstream code and this repository, never a machine's paths."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"/work/|/home/\w+|/root/|shared/notes|/Users/\w+")
SKIP = {".venv", "build", "runs", ".git", "docs"}


def test_no_source_file_names_a_machine_path():
    found = []
    for path in ROOT.rglob("*.py"):
        if SKIP & set(path.relative_to(ROOT).parts) or path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


# Names that look like this repository's but belong to another project, each with where it is from.
FOREIGN = {"evaluation/evaluate_images.py": "GenEval's own evaluation script (djghosh13/geneval)"}
PACKAGES = ("adapters", "configs", "datamodules", "encoders", "lightning_modules", "losses", "launch", "embedded",
            "evaluation", "shapes", "tools", "experiments", "cli", "pipelines")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:%s|bench|tests)/[\w/]+\.py)\b" % "|".join(PACKAGES))
MODULE_NAME = re.compile(r"(?<![/\w.])llm4gen((?:\.[a-z_]\w*)+)")


def is_module(parts: list[str]) -> bool:
    folder = ROOT / "llm4gen" if parts[0] not in PACKAGES else ROOT
    path = folder.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def stale_names(text: str) -> list[str]:
    """Repository paths (``folder/file.py``) and module names (``llm4gen.x.y``: the package and, when the next
    name is lower case, its module) in ``text`` that name nothing here."""
    stale = [p for p in REPO_PATH.findall(text) if p not in FOREIGN and not (ROOT / p).is_file()]
    for dotted in MODULE_NAME.findall(text):
        parts = dotted.strip(".").split(".")
        if parts[0].startswith("__") or parts[0] == "x":  # llm4gen.__version__; a docstring's llm4gen.x.y example
            continue
        module = parts[:2] if parts[0] in PACKAGES and len(parts) > 1 and parts[1].islower() else parts[:1]
        if not is_module(module):
            stale.append("llm4gen." + ".".join(parts))
    return stale


def test_the_stale_name_finder_sees_moved_modules():
    assert stale_names("see cli/nowhere.py and llm4gen.datamodules.gone, not tools/prepare.py") == [
        "cli/nowhere.py", "llm4gen.datamodules.gone"]
    assert stale_names("llm4gen.datamodules.batch.Batch and llm4gen.__version__ and evaluation/evaluate_images.py") == []


def test_comments_and_docs_name_only_modules_and_files_that_exist():
    """A comment that names a module after it moved sends the reader nowhere. The committed protocols and
    reports under docs/evidence/ and docs/connectors/ keep the names of their time."""
    found = []
    for path in [*ROOT.rglob("*.py"), *ROOT.rglob("*.yaml"), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]:
        if (SKIP - {"docs"}) & set(path.relative_to(ROOT).parts) or path.name == Path(__file__).name:
            continue
        found += [f"{path.relative_to(ROOT)}: {name}" for name in stale_names(path.read_text(errors="replace"))]
    assert not found, "\n".join(found)
