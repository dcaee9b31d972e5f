"""The layer contract and the plugin tables (docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from psr.core.recipe import lookup
from psr.core.registry import Registry, load_dotted
from psr.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "psr"


def test_the_layer_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def _function_level_psr_imports(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(id(n) for n in ast.walk(node))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("psr") \
                or isinstance(node, ast.Import) and any(a.name.startswith("psr") for a in node.names):
            if node.col_offset > 0 and id(node) not in guarded:
                lines.append(node.lineno)
    return lines


def test_only_the_cli_imports_psr_modules_inside_functions():
    # Elsewhere a function-level import of a psr module hides a cycle; the CLI keeps its
    # commands' imports inside them so `psr --help` loads no workflow.
    found = {str(p.relative_to(ROOT)): lines for p in PACKAGE.rglob("*.py")
             if (lines := _function_level_psr_imports(p))}
    assert set(found) <= {"psr/cli/__init__.py"}, found
    assert sum(len(v) for v in found.values()) < 30


@pytest.mark.parametrize("module, absent", [
    ("psr.core.features", "psr.toyworld"),      # the toyworld extractor is named by path
    ("psr.core.detect", "psr.toyworld"),
    ("psr.cli", "psr.workflows"),                # --help imports no workflow
    ("psr.cli", "torch"),
    ("psr.synth.stages", "torch"),               # the stage table, read by recipe checks
    ("psr.fit", "psr.fit.vae"),                  # the fitter table names its fitters by path
])
def test_tables_name_plugins_without_importing_them(module, absent):
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_registry_loads_a_dotted_entry_once_and_on_first_use():
    table = Registry("thing", {"direct": len, "by path": "json:dumps"})
    assert list(table) == ["direct", "by path"] and len(table) == 2 and "by path" in table
    import json

    assert table["by path"] is json.dumps and table["direct"] is len
    assert table._entries["by path"] is json.dumps  # cached: the path is resolved once
    table["mine"] = abs  # extension is one assignment
    assert lookup(table, "mine", "thing") is abs
    del table["mine"]
    with pytest.raises(UserError, match=r"thing 'by pat': unknown \(did you mean 'by path'\?\)"):
        lookup(table, "by pat", "thing")


def test_a_malformed_dotted_path_says_what_it_must_look_like():
    with pytest.raises(ValueError, match="package.module:attribute"):
        load_dotted("json.dumps")
