"""The package's layers: each subpackage imports only the layers below it (docs/architecture.md),
read from the source with `ast`, so a new import that climbs back up fails here; and the
uploader is an optional extra the server never loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tusserver"
# The top-level modules every layer may use: pure parsing, settings, errors, tokens, tasks,
# random ids, and the one module that touches aiohttp's private details.
FOUNDATION = {
    "errors",
    "protocol",
    "draft",
    "batching",
    "settings",
    "auth",
    "tasks",
    "aiohttp_private",
    "randomness",
}
# What each part may import from the package, besides itself and the foundation.
MAY_IMPORT: dict[str, set[str]] = {
    "foundation": set(),
    "files": set(),
    "store": set(),
    "events": {"store"},
    "uploads": {"store", "files"},
    "http": {"uploads", "events"},
    "server": {"http", "store"},
    "uploader": set(),
    "cli": {"server", "uploader"},
    "__main__": {"cli"},
    "__init__": set(),
}
# Besides the service, the parsers and the errors: the grant (auth), the app keys (http) and
# the 100 Continue and the 104 (aiohttp_private), all of the HTTP layer's own business; and
# the resumable-upload draft's pure parsing (draft).
HANDLERS_MAY_IMPORT = {"uploads", "protocol", "draft", "errors", "auth", "http", "aiohttp_private"}
HANDLERS_NEVER_IMPORT = {"redis", "aiofiles", "os", "pathlib"}


def _part_of(module: str) -> str:
    """The layer of a dotted module name below `tusserver` (`http.app` -> `http`)."""
    head = module.split(".")[0]
    return "foundation" if head in FOUNDATION else head


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (functions and TYPE_CHECKING included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module.startswith("tusserver"):  # a name may be a submodule
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules() -> list[tuple[str, Path]]:
    return [
        (".".join(path.relative_to(PACKAGE).with_suffix("").parts), path)
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _package_imports(path: Path) -> set[str]:
    return {
        name.removeprefix("tusserver.")
        for name in _imports(path)
        if name.startswith("tusserver.") and name != "tusserver"
    }


def test_every_subpackage_says_what_it_is_for() -> None:
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if folder.name == "static" or not any(folder.glob("*.py")):
            continue
        init = folder / "__init__.py"
        assert init.exists(), f"{folder.name}/ has no __init__.py"
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{folder.name}/__init__.py has no docstring saying its job"


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_each_module_imports_only_downward(module: str, path: Path) -> None:
    part = _part_of(module)
    allowed = MAY_IMPORT[part] | {part, "foundation"}
    wrong = sorted(name for name in _package_imports(path) if _part_of(name) not in allowed)
    assert not wrong, f"{module} ({part}) imports {wrong}; {part} may import {sorted(allowed)}"


@pytest.mark.parametrize(
    "name", ["handlers.py", "draft_handlers.py", "form_handlers.py", "batch_handlers.py"]
)
def test_handlers_import_only_the_service_protocol_and_errors(name: str) -> None:
    path = PACKAGE / "http" / name
    ours = {name.split(".")[0] for name in _package_imports(path)}
    assert ours <= HANDLERS_MAY_IMPORT, ours - HANDLERS_MAY_IMPORT
    assert "store" not in ours and "files" not in ours
    outside = {name.split(".")[0] for name in _imports(path)}
    assert not outside & HANDLERS_NEVER_IMPORT, outside & HANDLERS_NEVER_IMPORT


def test_nothing_but_the_command_line_imports_the_uploader() -> None:
    importers = [
        module
        for module, path in _modules()
        if not module.startswith("uploader")
        and any(name.startswith("uploader") for name in _package_imports(path))
    ]
    assert importers == ["cli"]


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checks above would see a store module that reaches up into the service."""
    upward = tmp_path / "bad.py"
    upward.write_text("def f() -> None:\n    from tusserver.uploads.service import Uploads\n")
    climbs = {name for name in _package_imports(upward) if _part_of(name) != "store"}
    assert "uploads.service" in climbs
    assert _part_of("uploads.service") not in MAY_IMPORT["store"]


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_serving_never_loads_the_uploader_libraries() -> None:
    result = _run_python(
        "import sys\n"
        "import tusserver.cli, tusserver.http.app, tusserver.server.supervisor\n"
        "print(sorted(m for m in ('tusclient', 'rich', 'requests') if m in sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_upload_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """`tusserver upload` where tuspy and rich are not installed (hidden from the import
    system here) exits 2 with the pip command, before touching the network."""
    (tmp_path / "a.txt").write_bytes(b"a")
    result = _run_python(
        "import sys\n"
        "sys.modules['tusclient'] = None\n"
        "sys.modules['rich'] = None\n"
        "from tusserver.cli import main\n"
        f"sys.exit(main(['upload', {str(tmp_path / 'a.txt')!r}, "
        "'--endpoint', 'http://127.0.0.1:9/files/']))\n"
    )
    assert result.returncode == 2, result.stderr
    assert "tuspy, rich" in result.stderr
    assert "pip install 'tusserver[uploader]'" in result.stderr


def test_no_two_modules_import_each_other() -> None:
    """A cycle means one module holds something it should have been handed (STYLE.md); the
    graph of the package's own imports has none."""
    modules = dict(_modules())
    graph = {
        module: {name for name in _package_imports(path) if name in modules}
        for module, path in modules.items()
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for name in sorted(graph[module]):
            visit(name, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
