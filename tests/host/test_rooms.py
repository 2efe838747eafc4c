"""The host package's rooms and what each may import (docs/architecture.md, "Rooms").

Read from the source's import statements, lazy imports inside functions included, so
an import that breaks the layering fails here before it becomes a habit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "host_tools" / "mpfleet"

# Each room and the rooms of mpfleet it may import; a room always may import itself.
# Bottom to top: a room may import only rooms listed before it (cli and demo last).
MAY_IMPORT = {
    "errors": set(),
    "paths": set(),
    "files": set(),
    "protocol": {"errors"},
    "db": {"errors"},
    "images": {"errors", "paths", "db"},
    "boards": {"errors", "paths", "images"},
    "broker": {"errors", "files", "protocol", "db"},
    "fleet": {"errors", "files", "paths", "protocol", "db", "images", "boards", "broker"},
    "usb": {"errors", "files", "paths", "protocol", "db", "images", "boards", "broker", "fleet"},
    "sim": {"errors", "files", "paths", "protocol", "db", "images", "boards", "broker", "fleet"},
    "tools": {"errors", "paths"},
    "demo": {"errors", "files", "paths", "protocol", "db", "images", "boards", "broker", "fleet", "sim"},
    "cli": {"errors", "files", "paths", "protocol", "db", "images", "boards", "broker", "fleet", "usb", "sim",
            "package"},
    "__main__": {"cli"},
    "package": set(),  # mpfleet/__init__.py: the version, nothing else
}
# Third-party packages that belong to one room's concern only.
ONLY_IN = {
    "click": {"cli"},
    "rich": {"cli", "demo"},
    "esptool": {"usb", "images", "sim"},
    "mpremote": {"usb"},
    "paho": {"broker", "fleet", "sim"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[:2] == ("sim", "mpy"):  # MicroPython that runs inside the device process
            continue
        yield rel, path


def _room(rel: Path) -> str:
    if rel == Path("__init__.py"):
        return "package"
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mpfleet":
                for alias in node.names:
                    yield node.lineno, f"mpfleet.{alias.name}" if alias.name != "__version__" else "mpfleet"
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.ImportFrom) and node.level:
            yield node.lineno, "." * node.level + (node.module or "")


def _target_room(name: str) -> str:
    parts = name.split(".")
    return "package" if len(parts) == 1 else parts[1]


MODULES = list(_modules())


def test_every_module_belongs_to_a_known_room():
    unknown = {str(rel) for rel, _ in MODULES if _room(rel) not in MAY_IMPORT}
    assert not unknown, f"modules outside every room (add the room to docs/architecture.md and here): {unknown}"


@pytest.mark.parametrize("rel,path", MODULES, ids=[str(rel) for rel, _ in MODULES])
def test_module_imports_only_the_rooms_below_its_own(rel, path):
    room = _room(rel)
    wrong = []
    for line, name in _imports(path):
        if name.startswith("."):
            wrong.append(f"{rel}:{line}: relative import {name!r} (write mpfleet.<room>...)")
            continue
        top = name.split(".")[0]
        if top == "mpfleet":
            target = _target_room(name)
            if target != room and target not in MAY_IMPORT.get(room, set()):
                wrong.append(f"{rel}:{line}: the {room} room imports {name}")
        elif top in ONLY_IN and room not in ONLY_IN[top]:
            wrong.append(f"{rel}:{line}: {top} belongs to {sorted(ONLY_IN[top])}, imported in {room}")
    assert not wrong, "\n".join(wrong)


def test_the_room_rules_have_no_cycle():
    seen: dict[str, int] = {}

    def depth(room: str, path: tuple[str, ...] = ()) -> int:
        assert room not in path, f"cycle: {' -> '.join(path + (room,))}"
        if room not in seen:
            seen[room] = 1 + max((depth(r, path + (room,)) for r in MAY_IMPORT[room]), default=0)
        return seen[room]

    for room in MAY_IMPORT:
        depth(room)


def test_each_room_says_in_its_docstring_what_it_may_import():
    silent = []
    for package in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        if "import" not in doc:
            silent.append(package.name)
    assert not silent, f"rooms whose docstring does not say what they may import: {silent}"
