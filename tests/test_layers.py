"""The house: the layer contract and no import cycles (pyproject.toml's [tool.importlinter], run by import-linter's
own command), files under 500 lines and functions under 80."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_no_module_over_500_lines_and_no_function_over_80():
    too_long = []
    for path in sorted((PROJECT_ROOT / "imgret").rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 500:
            too_long.append(f"{path.relative_to(PROJECT_ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name}()")
    assert not too_long, too_long
