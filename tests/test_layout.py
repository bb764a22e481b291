"""The package layout's promises: the raee library knows nothing of gRPC or the service, importing any module writes
no file, and the service says what to run when the generated gRPC code is missing."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "generated" in parts:
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_neither_the_service_nor_grpc():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_names(p) if n.split(".")[0] in ("service",
                                                                                                    "grpc"))
                 for p in (ROOT / "raee").rglob("*.py")}
    assert {p: n for p, n in offenders.items() if n} == {}


def snapshot(root: Path) -> dict[str, float]:
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".venv", ".git", "__pycache__", ".pytest_cache",
                                                        ".mypy_cache", ".ruff_cache")]
        for name in filenames:
            path = Path(dirpath) / name
            seen[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return seen


@pytest.mark.slow
def test_importing_every_module_writes_no_file_and_loads_no_grpc_for_the_library(tmp_path):
    """One fresh interpreter imports every raee module (and checks that neither grpc nor service came with them),
    then every indexer and service module; the tree and a fresh cache directory stay as they were."""
    cache = tmp_path / "cache"
    script = (
        "import importlib, json, sys\n"
        f"for m in {modules('raee')!r}: importlib.import_module(m)\n"
        "library = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'service'))\n"
        f"for m in {modules('indexer') + modules('service')!r}: importlib.import_module(m)\n"
        "print(json.dumps(library))\n")
    before = snapshot(ROOT)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "RAEE_CACHE_DIR": str(cache), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    after = snapshot(ROOT)
    assert {p: t for p, t in after.items() if before.get(p) != t} == {}
    assert not cache.exists() or not any(cache.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["cache"])


def test_missing_generated_code_says_to_run_make_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "service.api", raising=False)
    monkeypatch.setitem(sys.modules, "service.generated.raee.v1", None)  # None in sys.modules: the import fails
    with pytest.raises(ImportError, match=r"run `make install` or `make proto`"):
        import service.api  # noqa: F401
