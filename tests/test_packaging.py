"""The project installs: a wheel built from the tracked files holds every package, the prompt
file and the licence, and its console commands run from outside the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("baselines", "commands", "datasets", "evaluation", "networks", "prediction",
            "preprocessing", "prompts", "training")
COMMANDS = ("immseg-preprocess", "immseg-train", "immseg-test", "immseg-predict",
            "immseg-encode-priors", "immseg-phantom", "immseg-score")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tracked files")
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    archive = source / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        for name in files:
            if (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name)
    tree = source / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps",
                    "--no-build-isolation", "--quiet", "-w", str(out)], check=True)
    (built,) = out.glob("immseg-*.whl")
    return built


def test_the_wheel_holds_the_code_the_prompts_and_the_licence(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).glob("*.py")}
        assert modules and modules <= names, package
    assert {"trainer.py", "utils.py", "prompts/priors.toml"} <= names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    # Root scripts are thin callers; a top-level "test" module would be shadowed by Python's.
    assert not any(name.startswith(("tests/", "bench/")) for name in names)
    assert "test.py" not in names and "train.py" not in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{command} = " in text for command in COMMANDS)


def test_installed_commands_run_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                    "--target", str(site), str(wheel)], check=True)
    # Every console command's --help, from a folder without the sources, one interpreter.
    probe = (
        "import sys\n"
        "from importlib.metadata import distribution\n"
        "for ep in distribution('immseg').entry_points:\n"
        "    if ep.group != 'console_scripts':\n"
        "        continue\n"
        "    main = ep.load()\n"
        "    assert main.__module__.split('.')[0] != 'tests'\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code in (0, None), (ep.name, stop.code)\n"
        "    print(ep.name, main.__code__.co_filename)\n")
    away = tmp_path / "elsewhere"
    away.mkdir()
    result = subprocess.run([sys.executable, "-c", probe], cwd=away, capture_output=True,
                            text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    ran = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line
               and line.split(" ", 1)[0] in COMMANDS)
    assert set(ran) == set(COMMANDS)
    assert all(path.startswith(str(site)) for path in ran.values())
