"""The layering of the package: dependencies point one way (cli -> runs -> methods -> prompts,
backbones, data, objective -> losses, metrics), checked on every import statement, including
imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import calibprompt

PACKAGE = Path(calibprompt.__file__).parent

#: what each part of the package may import of calibprompt (besides itself and __version__)
ALLOWED = {
    "metrics": set(),
    "losses": set(),
    "files": set(),
    "progress": set(),
    "backbones": set(),
    "calibrators": {"metrics"},
    "decisions": {"metrics"},
    "plots": {"metrics", "files"},
    "objective": {"losses"},
    "data": {"files", "progress"},
    "prompts": {"backbones"},
    "methods": {"backbones", "prompts", "objective", "losses", "progress"},
    "runs": {"metrics", "losses", "files", "progress", "backbones", "calibrators", "decisions", "plots", "objective",
             "data", "prompts", "methods"},
    "demo": {"runs", "metrics", "files", "calibrators", "decisions", "plots", "data", "backbones", "objective"},
    "cli": {"runs", "metrics", "files", "calibrators", "decisions", "plots", "data", "backbones", "objective", "demo"},
    "__main__": {"cli"},  # python -m calibprompt
}


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of calibprompt that ``path`` imports (anywhere in the file)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("calibprompt"):
            names = node.module.split(".")
            if len(names) > 1:
                parts.add(names[1])
            else:  # from calibprompt import x
                parts.update(a.name for a in node.names if a.name != "__version__")
        elif isinstance(node, ast.Import):
            parts.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("calibprompt.") and "." in a.name)
    return parts


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                                        or p.parent != PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    part = part_of(path)
    assert part in ALLOWED, f"{part}: a new part of the package needs its place in ALLOWED"
    upward = imported_parts(path) - ALLOWED[part] - {part}
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)} (allowed: {sorted(ALLOWED[part])})"


def test_the_layers_themselves_have_no_cycle():
    # the allowed graph is acyclic: a part never (transitively) allows itself
    def reach(part, seen):
        for dep in ALLOWED[part]:
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    for part in ALLOWED:
        assert part not in reach(part, set()), part
