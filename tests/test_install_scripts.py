"""scripts/install and scripts/uninstall on their own (the whole offline installation: tests/test_bundle.py).

What a checkout holds beside its tracked files (a key, a test configuration, an export someone scanned)
never reaches an install, a bundle or a package; and uninstall removes only folders that install made."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.gatewayproc import REPO


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_the_code_step_copies_the_files_git_tracks_and_nothing_beside_them(tmp_path):
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True, timeout=120)
    shutil.copy(REPO / "scripts" / "install", checkout / "scripts" / "install")  # the script under test
    (checkout / "config" / "mgmt.key").write_text("-----BEGIN PRIVATE KEY-----\n")  # untracked, beside config
    (checkout / "export.csv").write_text("sfzh\n11010519491231002X\n")
    readme = (checkout / "README.md").read_text() + "\nan edit not committed yet\n"
    (checkout / "README.md").write_text(readme)
    (checkout / "Vagrantfile").unlink()  # tracked, deleted in the work tree
    made = run([str(checkout / "scripts" / "install"), "code"], DESTDIR=str(tmp_path / "stage"), PREFIX="/src")
    assert made.returncode == 0, made.stderr
    copied = {str(path.relative_to(tmp_path / "stage" / "src")) for path in (tmp_path / "stage" / "src").rglob("*")
              if path.is_file()}
    tracked = set(subprocess.run(["git", "ls-files"], cwd=checkout, capture_output=True, text=True,
                                 check=True).stdout.split())
    assert copied == tracked - {"Vagrantfile"}
    assert (tmp_path / "stage" / "src" / "README.md").read_text() == readme


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.skip("scripts/uninstall runs as root only (CI runs as root)")


def test_uninstall_removes_nothing_install_did_not_make(tmp_path, as_root):
    kept = tmp_path / "opt"
    (kept / "data").mkdir(parents=True)
    (kept / "data" / "important.txt").write_text("not the gateway's")
    units = tmp_path / "units"
    units.mkdir()
    uninstall = str(REPO / "scripts" / "uninstall")
    for prefix, said in ((str(kept), "is not a gateway install"), ("relative/path", "must be an absolute path"),
                         ("/", "must be an absolute path")):
        refused = run([uninstall], PREFIX=prefix, CONFDIR=str(tmp_path / "etc"), UNITDIR=str(units))
        assert refused.returncode == 1 and said in refused.stderr, (prefix, refused.stderr)
    assert (kept / "data" / "important.txt").read_text() == "not the gateway's"
    # --purge: a CONFDIR that holds no gateway configuration is refused before anything is removed.
    made = run([str(REPO / "scripts" / "install"), "code"], DESTDIR=str(tmp_path / "stage"), PREFIX="/gw")
    assert made.returncode == 0, made.stderr
    (units / "gateway.service").write_text("[Unit]\n")
    refused = run([uninstall, "--purge"], PREFIX=str(tmp_path / "stage" / "gw"), CONFDIR=str(kept), UNITDIR=str(units))
    assert refused.returncode == 1 and "not a gateway configuration" in refused.stderr, refused.stderr
    assert (kept / "data" / "important.txt").exists() and (tmp_path / "stage" / "gw" / "pyproject.toml").exists()
    assert (units / "gateway.service").exists()


def test_help_is_printed_not_taken_for_a_step():
    for script, said in (("install", "scripts/install [STEP...]"), ("bundle-install", "./install [STEP...]")):
        shown = run([str(REPO / "scripts" / script), "--help"])
        assert shown.returncode == 0 and said in shown.stdout and "error" not in shown.stderr, shown
