"""Which modules import which: reading a corpus or training never loads the generation engine, the
package itself loads no PyTorch, and the library never imports the service.

Each check runs in a fresh interpreter, so that what another test imported cannot hide an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "charlm"
ENGINE = ("charlm.engine", "charlm.decoder", "charlm.native")


def imported_after(statement: str) -> set[str]:
    """The modules in sys.modules after `statement` runs in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def under(modules: set[str], *packages: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize("module", ["charlm.corpora", "charlm.text", "charlm.train", "charlm.exit_codes",
                                    "charlm.inputs", "charlm.evaluate", "charlm.train_config"])
def test_reading_and_training_do_not_load_the_engine(module: str) -> None:
    loaded = imported_after(f"import {module}")
    assert module in loaded
    assert under(loaded, *ENGINE) == [], f"importing {module} loads the generation engine"


def test_the_input_helpers_import_nothing_of_charlm() -> None:
    assert under(imported_after("import charlm.inputs"), "charlm", "torch") == ["charlm", "charlm.inputs"]


def test_the_package_imports_no_torch() -> None:
    """`import charlm` (e.g. for __version__, or the CLI's `--help`) stays light: its API imports lazily."""
    loaded = imported_after("import charlm; assert charlm.__version__")
    assert under(loaded, "torch", "numpy", "safetensors") == []
    assert under(loaded, "charlm") == ["charlm"]


def test_the_library_never_imports_the_service() -> None:
    """No `import app` or fastapi anywhere in charlm/, not even inside a function (read from the source)..."""
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in ("app", "fastapi", "starlette", "uvicorn")]
    assert found == []


def test_importing_every_library_module_loads_no_service() -> None:
    """... and importing every module of charlm/ at once loads none of it."""
    modules = sorted(f"charlm.{p.stem}" for p in LIBRARY.glob("*.py") if p.stem not in ("__init__", "__main__"))
    loaded = imported_after("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded
    assert under(loaded, "app", "fastapi", "starlette", "uvicorn") == []
