"""An AST scan of every ``raise`` in the library's packages, and what its guarding ``if`` reads
(tests/test_refusal_parity.py holds the sites against their verdicts)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import NamedTuple, Optional

from llm4gen.configs import schema

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("adapters", "encoders", "datamodules", "lightning_modules")


class RaiseSite(NamedTuple):
    file: str
    function: str
    words: str
    node: ast.Raise
    guards: Optional[list[ast.expr]]  # the tests of the ifs it sits under; None inside an except clause
    config_names: frozenset  # names and dotted chains bound to a config section in its function

    @property
    def key(self) -> str:
        return f"{self.file}::{self.function}::{self.words}"


def message_words(node: ast.Raise) -> str:
    """The first words of a raise's message (its first literal text), the function that makes its message, or
    the exception raised: what keys a site in INVENTORY, whatever line it moves to."""
    exc = node.exc
    if exc is None:
        return "re-raise"
    if not isinstance(exc, ast.Call):
        return ast.unparse(exc)
    if exc.args:
        first = exc.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.strip()[:40]
        if isinstance(first, ast.JoinedStr):
            text = next((part.value.strip() for part in first.values
                         if isinstance(part, ast.Constant) and len(part.value.strip()) >= 3), "")
            return text[:40]
        if isinstance(first, ast.Call):
            return f"{ast.unparse(first.func)}()"
    return f"{ast.unparse(exc.func)}()"


SCHEMA_SECTIONS = {cls.__name__ for cls in vars(schema).values()
                   if isinstance(cls, type) and dataclasses.is_dataclass(cls)}
# the config sections' usual names: the module's ModelConfig, the datamodule's and the stream's DataConfig
CONFIG_NAMES = {"cfg", "acfg", "self.cfg", "self.data", "self.config.data"}


def dotted(node: ast.expr) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def config_names_of(function: ast.FunctionDef) -> frozenset:
    """Names and dotted chains bound to a config section in ``function``: the usual ones, parameters annotated
    with a schema section, and local names assigned from a chain (``kind = acfg.kind``; ``c = self.config`` makes
    ``c.data`` one)."""
    names = set(CONFIG_NAMES)
    for arg in [*function.args.args, *function.args.kwonlyargs]:
        if arg.annotation is not None and any(s in ast.unparse(arg.annotation) for s in SCHEMA_SECTIONS):
            names.add(arg.arg)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            chain, alias = dotted(node.value), node.targets[0].id
            if chain is None:
                continue
            names |= {alias + name[len(chain):] for name in list(names)
                      if name == chain or name.startswith(chain + ".")}  # c = self.config: c.data
            if any(chain == n or chain.startswith(n + ".") for n in names):
                names.add(alias)  # kind = acfg.kind
    return frozenset(names)


SAFE_CALLS = {"len", "isinstance", "set", "sorted", "any", "all", "min", "max", "str", "int", "float", "bool",
              "list", "tuple"}


def reads_only_config(test: ast.expr, config_names: frozenset) -> bool:
    """Whether an ``if`` test reads nothing but config values (and constants, comprehension variables, builtins)."""
    bound = {t.id for comp in ast.walk(test) if isinstance(comp, ast.comprehension)
             for t in ast.walk(comp.target) if isinstance(t, ast.Name)}

    def only_config(node: ast.AST) -> bool:
        chain = dotted(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if chain is not None:
            root = chain.split(".")[0]
            return (any(chain == n or chain.startswith(n + ".") for n in config_names) or root in bound
                    or root.isupper() or (root in SAFE_CALLS and chain == root))
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in SAFE_CALLS):
            return False
        return all(only_config(child) for child in ast.iter_child_nodes(node)
                   if not (isinstance(node, ast.Call) and child is node.func))

    return only_config(test)


def raise_sites() -> list[RaiseSite]:
    sites = []

    def visit(node: ast.AST, file: str, names: list[str], function, guards: Optional[list], config_names):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, file, names + [child.name], child, [], config_names_of(child))
            elif isinstance(child, ast.ClassDef):
                visit(child, file, names + [child.name], function, guards, config_names)
            elif isinstance(child, ast.Raise):
                sites.append(RaiseSite(file, ".".join(names), message_words(child), child, guards, config_names))
                visit(child, file, names, function, guards, config_names)
            elif isinstance(child, (ast.If, ast.While)):
                inner = None if guards is None else guards + [child.test]
                for stmt in child.body + child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), file, names, function, inner, config_names)
            elif isinstance(child, ast.ExceptHandler):
                visit(child, file, names, function, None, config_names)
            else:
                visit(child, file, names, function, guards, config_names)

    for package in SCANNED:
        for path in sorted((REPO_ROOT / package).glob("*.py")):
            relative = str(path.relative_to(REPO_ROOT))
            visit(ast.parse(path.read_text()), relative, [], None, [], frozenset(CONFIG_NAMES))
    return sites


def calls_in(tree: ast.AST) -> set[str]:
    return {ast.unparse(node.func).split(".")[-1] for node in ast.walk(tree) if isinstance(node, ast.Call)}


def function_node(file: str, qualname: str) -> ast.AST:
    node: ast.AST = ast.parse((REPO_ROOT / file).read_text())
    for name in qualname.split("."):
        node = next(child for child in ast.iter_child_nodes(node)
                    if isinstance(child, (ast.FunctionDef, ast.ClassDef)) and child.name == name)
    return node
