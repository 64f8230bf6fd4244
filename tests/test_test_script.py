"""scripts/test.sh, the README's test command: installs the missing system packages, then
runs ruff and pytest with its arguments. Stub commands on a private PATH stand in for
apt-get, the packages, ruff and pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "test.sh"
TOOLS = ("bash", "dirname", "env", "grep")


def _bin(tmp_path: Path, *, uid: int, present: tuple[str, ...], stubs: dict[str, int]) -> Path:
    """A PATH directory: the few real tools the script uses, ``id -u`` printing ``uid``, the
    ``present`` packages' commands, and ``stubs`` (name -> exit status) that log their
    arguments to calls.txt."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in TOOLS:
        (directory / tool).symlink_to(shutil.which(tool))
    scripts = {"id": f"echo {uid}"} | dict.fromkeys(present, "exit 0")
    for name, status in stubs.items():
        scripts[name] = f'echo "{name} $*" >> {tmp_path}/calls.txt; exit {status}'
    for name, body in scripts.items():
        (directory / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (directory / name).chmod(0o755)
    return directory


def _run(directory: Path, *args: str, dry: bool = False) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(directory), "HOME": os.environ.get("HOME", "/tmp")}
    if dry:
        env["EVL_TEST_DRY_RUN"] = "1"
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT), *args], env=env, capture_output=True, text=True
    )


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.txt"
    return [line.rstrip() for line in path.read_text().splitlines()] if path.exists() else []


def test_as_root_it_installs_what_is_missing_then_runs_ruff_and_pytest(tmp_path: Path) -> None:
    stubs = {"apt-get": 0, "ruff": 0, "pytest": 0}
    result = _run(_bin(tmp_path, uid=0, present=("ffmpeg",), stubs=stubs), "-k", "report")
    assert result.returncode == 0, result.stderr
    lock = "-o DPkg::Lock::Timeout=300"
    assert _calls(tmp_path) == [
        f"apt-get {lock} update -qq",
        f"apt-get {lock} install -y -qq --no-install-recommends chromium",
        "ruff check .",
        "ruff format --check .",
        "pytest -k report",
    ]


def test_nothing_is_installed_when_everything_is_there(tmp_path: Path) -> None:
    stubs = {"apt-get": 0, "ruff": 0, "pytest": 0}
    directory = _bin(tmp_path, uid=0, present=("chromium", "ffmpeg"), stubs=stubs)
    assert _run(directory).returncode == 0
    assert _calls(tmp_path) == ["ruff check .", "ruff format --check .", "pytest"]


@pytest.mark.parametrize(("failing", "status"), [("pytest", 5), ("pytest", 1), ("ruff", 1)])
def test_the_status_of_ruff_or_pytest_is_the_script_s(
    tmp_path: Path, failing: str, status: int
) -> None:
    """pytest's 5 (no tests collected) fails CI as any other failure does."""
    stubs = {"ruff": 0, "pytest": 0} | {failing: status}
    directory = _bin(tmp_path, uid=0, present=("chromium", "ffmpeg"), stubs=stubs)
    assert _run(directory, "-x").returncode == status


def test_without_root_or_sudo_it_names_what_to_install(tmp_path: Path) -> None:
    directory = _bin(tmp_path, uid=1000, present=(), stubs={"apt-get": 0, "pytest": 0})
    result = _run(directory)
    assert result.returncode == 1
    assert "the tests need chromium ffmpeg" in result.stderr
    assert "apt-get install -y --no-install-recommends chromium ffmpeg" in result.stderr
    assert _calls(tmp_path) == []  # neither apt-get nor the tests ran


def test_a_dry_run_prints_the_commands_and_runs_none(tmp_path: Path) -> None:
    directory = _bin(tmp_path, uid=0, present=(), stubs={"apt-get": 0, "ruff": 0, "pytest": 0})
    result = _run(directory, "-q", dry=True)
    assert result.returncode == 0
    assert "+ pytest -q" in result.stderr and "chromium ffmpeg" in result.stderr
    assert _calls(tmp_path) == []
