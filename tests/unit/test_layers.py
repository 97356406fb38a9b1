"""The architecture as the tree shows it: layers of metahub/ import only layers below them, and
storage/ imports neither Twisted nor metahub (design.md, "Layout")."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Each layer may import itself and the layers after it in this list, never one before it.
LAYERS = ["app", "web", "cache", "upstream", "hardware", "config", "runtime", "oci"]
#: Layers that are side by side: neither imports the other.
SIBLINGS = {frozenset({"upstream", "hardware"}), frozenset({"config", "runtime"})}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_metahub_has_only_its_layers_at_the_top() -> None:
    top = sorted(p.name for p in (ROOT / "metahub").iterdir() if p.name != "__pycache__")
    assert top == sorted(["__init__.py", *LAYERS])


def test_each_layer_imports_only_layers_below_it() -> None:
    wrong = []
    for layer in LAYERS:
        for path in (ROOT / "metahub" / layer).glob("*.py"):
            for module in imports(path):
                parts = module.split(".")
                if parts[0] != "metahub" or len(parts) < 2:
                    continue
                other = parts[1]
                below = LAYERS.index(other) > LAYERS.index(layer) and frozenset({layer, other}) not in SIBLINGS
                if other != layer and not below:
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert wrong == []


def test_storage_imports_neither_twisted_nor_metahub() -> None:
    wrong = [f"{path.name}: {module}" for path in (ROOT / "storage").glob("*.py") for module in imports(path)
             if module.split(".")[0] in ("twisted", "metahub", "treq")]
    assert wrong == []


def test_no_test_module_imports_another() -> None:
    """Shared fakes live in tests/unit/fakes.py and harness.py, integration helpers in
    tests/integration/common.py: importing a test module runs its module-level setup and ties
    unrelated tests together."""
    wrong = []
    for path in (ROOT / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            # ``from .test_x import y``, ``import tests.unit.test_x`` and ``from . import test_x``
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *names]
            if any(part.startswith("test_") for name in names for part in name.split(".")):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert wrong == []


def test_the_cache_layer_knows_nothing_of_serving_http() -> None:
    """The cache answers in values (metahub.cache.blobs: a stored blob, a download to follow, a
    bypass) and the web layer writes them; the client side of twisted.web (upstream responses) is
    the cache's business, the server side (requests, resources, status codes) is not."""
    server_side = {"twisted.web.server", "twisted.web.resource", "twisted.web.http", "twisted.web.static"}
    wrong = [f"{path.name}: {module}" for path in (ROOT / "metahub" / "cache").glob("*.py")
             for module in imports(path) if module in server_side]
    assert wrong == []
