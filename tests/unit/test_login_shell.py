"""images/builder.quiet_login_shells: Debian's /etc/profile and root's ~/.profile, as the default image has them, make a
bash login shell start no program (the E2B SDK runs every command as `bash -l -c`), and mean what they meant."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from images.builder import quiet_login_shells

DEBIAN_PROFILE = Path("/usr/share/base-files/profile")  # what debootstrap gives /etc/profile
DEBIAN_ROOT_PROFILE = Path("/usr/share/base-files/dot.profile")  # what debootstrap gives /root/.profile


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    if not (DEBIAN_PROFILE.is_file() and DEBIAN_ROOT_PROFILE.is_file()):
        pytest.skip("needs Debian's base-files (the host the images are built on)")
    (tmp_path / "etc").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "etc" / "profile").write_text(DEBIAN_PROFILE.read_text())
    (tmp_path / "root" / ".profile").write_text(DEBIAN_ROOT_PROFILE.read_text())
    return tmp_path


def spies(directory: Path) -> Path:
    """`id` and `mesg` that note each call and answer as the real ones would for root."""
    directory.mkdir()
    for name, answer in (("id", "echo 0"), ("mesg", "true")):
        spy = directory / name
        spy.write_text(f'#!/bin/sh\necho {name} >> "{directory}/calls"\n{answer}\n')
        spy.chmod(0o755)
    return directory


def source(shell: str, files: list[Path], spy_dir: Path) -> str:
    script = "; ".join(f". {path}" for path in files) + '; echo "$PATH"'
    env = {"PATH": str(spy_dir), "HOME": str(files[-1].parent)}
    run = subprocess.run(
        [f"/bin/{shell}", "-c", script], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def calls(spy_dir: Path) -> list[str]:
    return (spy_dir / "calls").read_text().split() if (spy_dir / "calls").exists() else []


def test_debian_profiles_spawn_programs_before(tree, tmp_path):
    # The point of the change: without it the same files run both programs.
    spy_dir = spies(tmp_path / "before")
    source("bash", [tree / "etc" / "profile"], spy_dir)
    source("bash", [tree / "root" / ".profile"], spy_dir)
    assert calls(spy_dir) == ["id", "mesg"]


def test_a_bash_login_shell_then_starts_no_program_and_gets_the_same_path(tree, tmp_path):
    quiet_login_shells(tree)
    spy_dir = spies(tmp_path / "after")
    path = source("bash", [tree / "etc" / "profile"], spy_dir)
    source("bash", [tree / "root" / ".profile"], spy_dir)
    assert calls(spy_dir) == []
    expected = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" if os.geteuid() == 0 else None
    if expected:
        assert path == expected


def test_dash_still_asks_id_and_applying_twice_changes_nothing(tree, tmp_path):
    quiet_login_shells(tree)
    once = (tree / "etc" / "profile").read_text(), (tree / "root" / ".profile").read_text()
    quiet_login_shells(tree)
    assert ((tree / "etc" / "profile").read_text(), (tree / "root" / ".profile").read_text()) == once
    spy_dir = spies(tmp_path / "dash")
    source("dash", [tree / "etc" / "profile"], spy_dir)
    assert calls(spy_dir) == ["id"]  # dash has no $EUID: the old way
