"""The shape of dpo_components, read from its source (no torch): no import circle between its modules (imports at
load time and inside functions alike), no
assignment to another module's attributes (a process-wide switch flipped as a side effect), and every module
named in docs/architecture.md, the one module index. Well under a second."""

import ast
import importlib.util
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "dpo_components"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_module(name: str) -> bool:
    return name in MODULES


def imports_of(tree: ast.Module) -> set[str]:
    """The dpo_components modules a module imports, when it loads or inside a function, each with the packages
    above it (which load first)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    loaded = set()
    for name in names:
        parts = name.split(".")
        loaded.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return {name for name in loaded if is_module(name)}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = imports_of(ast.parse(path.read_text(encoding="utf-8")))
        # a package's __init__ may load its own submodules; a submodule loading its package is that same edge
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_between_the_packages_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def module_aliases(tree: ast.Module) -> set[str]:
    """Names a module binds to other modules by ``import x`` / ``import x.y as z`` / ``from x import module``."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                try:
                    found = importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                except (ImportError, ValueError, AttributeError):
                    found = False
                if found:
                    aliases.add(alias.asname or alias.name)
    return aliases


def assignments_to_modules(source: str) -> list[str]:
    """``alias.attr = ...`` (or ``+=``) lines where ``alias`` is another module: a process-wide switch."""
    tree = ast.parse(source)
    aliases = module_aliases(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []  # fmt: skip
        for target in targets:
            base = target
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(target, ast.Attribute) and isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
    return found


def test_no_module_global_switch_is_flipped():
    flipped = [f"{path.relative_to(REPO_ROOT)} {line}" for path in MODULES.values()
               for line in assignments_to_modules(path.read_text(encoding="utf-8"))]  # fmt: skip
    assert not flipped, "assignments to another module's attributes: " + "; ".join(flipped)


def test_the_switch_finder_finds_one():  # the check above can fail
    source = "import torchtune.modules.attention_utils as au\nau.flex_attention_compiled = None\nlocal = {}\n"
    assert assignments_to_modules(source) == ["line 2: au.flex_attention_compiled"]


def test_docs_architecture_names_every_module_and_room():
    """Each module by its path under dpo_components/ (``data/collate.py``), each room (``data/``), in backticks."""
    page = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/.]+)`", page))
    missing = []
    for path in MODULES.values():
        relative = path.relative_to(PACKAGE)
        key = f"{relative.parent}/" if path.name == "__init__.py" else str(relative)
        if key != "./" and key not in named:
            missing.append(key)
    assert not missing, "docs/architecture.md does not name " + ", ".join(missing)
