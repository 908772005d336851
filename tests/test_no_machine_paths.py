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
