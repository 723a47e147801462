"""The test suite's own import rule: modules share helpers through tests/support, never by
importing a test module or conftest.py (which holds only fixtures, found by pytest)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODULES = sorted([*TESTS.glob("*.py"), *(TESTS / "support").glob("*.py")])


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, by its full name (`from tests import x` names tests.x)."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module)
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    return imported


def is_forbidden(module: str) -> bool:
    return module == "tests.conftest" or module.startswith("tests.test_")


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(TESTS)))
def test_no_module_imports_a_test_module_or_conftest(path: Path) -> None:
    assert sorted(filter(is_forbidden, imported_modules(path))) == []


def test_the_rule_sees_each_spelling_of_such_an_import(tmp_path: Path) -> None:
    spellings = {
        "from tests.conftest import Server": "tests.conftest",
        "from tests.test_faults import create": "tests.test_faults",
        "from tests import test_faults": "tests.test_faults",
        "import tests.test_faults": "tests.test_faults",
    }
    for source, module in spellings.items():
        path = tmp_path / "module.py"
        path.write_text(source + "\n")
        assert module in set(filter(is_forbidden, imported_modules(path))), source
