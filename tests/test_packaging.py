"""The wheel installs one top-level name, ``ptqflow``: a user's own ``tasks.py`` or ``storage/`` stays theirs."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FOLDERS = {"flows", "tasks", "storage"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("ptqflow-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_adds_exactly_one_top_level_name(wheel):
    names = {name.split("/", 1)[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert names == {"ptqflow"}
    entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")))
    assert b"ptqflow = ptqflow.flows.entry:main" in entry_points


def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    """A subpackage missing from pyproject.toml's package list installs without error and fails at import."""
    folders = {"ptqflow": ROOT / "ptqflow", **{f"ptqflow/{name}": ROOT / name for name in PROJECT_FOLDERS}}
    expected = {
        f"{package}/{path.relative_to(folder).as_posix()}"
        for package, folder in folders.items()
        for path in folder.rglob("*.py")
    }
    assert expected - set(wheel.namelist()) == set()
    assert "ptqflow/flows/cli/__init__.py" in expected


def test_no_installed_module_imports_a_project_folder_by_its_old_top_level_name(wheel):
    offenders = []
    for name in wheel.namelist():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(wheel.read(name))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module]
            else:
                continue
            offenders += [f"{name}: {m}" for m in imported if m.split(".")[0] in PROJECT_FOLDERS]
    assert offenders == []


def test_a_users_own_tasks_module_is_left_alone(tmp_path):
    (tmp_path / "tasks.py").write_text("WHOSE = 'the user'\n")
    done = subprocess.run(
        [sys.executable, "-c", "import ptqflow, ptqflow.tasks.core.parameters, tasks; print(tasks.WHOSE)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the user"
