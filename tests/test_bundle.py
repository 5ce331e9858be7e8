"""Offline installation: the bundle and the Debian package, installed with no network.

`scripts/bundle` builds the bundle (this needs the package index; pip's cache makes it quick), and
`scripts/deb` the package from it. Each is then installed into a throwaway copy of this machine (see
tests/throwaway_root.py: writes vanish with it, only loopback is up, so no index or mirror is reachable),
carries a transfer from curl through the installed gateway to an upstream there, and is removed again.

Not shown here: a Debian 13 root (this machine is Debian 12, whose python3 is 3.11, so the package is
built with DEB_PYTHON naming the Python 3.12+ found here instead of depending on Debian's python3), and
systemd starting the units (no systemd runs inside; the gateway is started as the `gateway` user the way
the unit starts it; tests/test_systemd.py verifies the units).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from gateway.ops.lab import lab_supported
from tests.gatewayproc import REPO, UPSTREAM_SERVER, Process
from tests.throwaway_root import SHARED, ThrowawayRoot

ID_NUMBER = "11010519491231002X"
TARGET_VERSION = "%d.%d" % sys.version_info[:2]
# Paths installers may leave behind for good: package manager records and logs.
BOOKKEEPING = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/", "/var/log/", "/etc/ld.so.cache")


def _missing_capability() -> str | None:
    reason = lab_supported()
    if reason:
        return reason
    for tool in ("unshare", "nsenter", "dpkg-deb", "apt-get", "curl"):
        if not shutil.which(tool):
            return f"{tool} is missing"
    if "overlay" not in open("/proc/filesystems").read():
        return "this kernel has no overlay filesystem"
    return None


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """The folder carried across: the bundle, its .sha256, and two package versions made from it."""
    reason = _missing_capability()
    if reason:
        pytest.skip(f"cannot install into a throwaway root: {reason}")
    shared = tmp_path_factory.mktemp("carried")
    python = subprocess.run([REPO / "scripts" / "find-python", TARGET_VERSION], capture_output=True, text=True,
                            check=True).stdout.strip()
    built = subprocess.run([REPO / "scripts" / "bundle"], env={**os.environ, "PYTHON": python, "OUT": str(shared)},
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    for version in ("0.1.0", "0.1.1"):
        deb = subprocess.run([REPO / "scripts" / "deb", *shared.glob("gateway-*.tar.gz")], capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "DEB_PYTHON": python, "DEB_VERSION": version})
        assert deb.returncode == 0, deb.stderr
    shutil.copy(UPSTREAM_SERVER, shared / "upstream_server.py")
    (shared / "python").write_text(python)
    return shared


def carried_python(carried) -> str:
    """The Python the bundle and the packages were built for (and the package's postinst uses)."""
    return (carried / "python").read_text()


def python_closed_to_others(carried) -> bool:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", carried_python(carried),
                           "-c", ""]).returncode != 0


@pytest.fixture
def throwaway(carried, tmp_path):
    root = ThrowawayRoot(tmp_path, carried, f"gwoff{os.getpid() % 100000}")
    try:
        yield root.up()
    finally:
        root.down()


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def serve_one_transfer(root: ThrowawayRoot, venv: str, config: str) -> None:
    """Start the installed gateway as the unit would (user gateway, its state and log folders made), send a
    clean transfer and one carrying an ID number through it, stop it."""
    check(root.sh("install -d -o gateway -g gateway -m 700 /var/lib/gateway /var/log/gateway"))
    upstream = Process([f"{venv}/bin/python", f"{SHARED}/upstream_server.py", "--bind", "127.0.0.2",
                        "--port", "8000", "--log", "/tmp/upstream.log"], root.prefix()).started("ready", timeout=15)
    proxy = Process(["runuser", "-u", "gateway", "--", f"{venv}/bin/gateway", "run", "-c", config], root.prefix(),
                    ).started("alerts:", timeout=60)
    try:
        curl = ["curl", "-sS", "--max-time", "10", "-x", "http://127.0.0.1:8080", "-w", " %{http_code}"]
        echoed = check(root.run([*curl, "--data-binary", "offline transfer", "http://127.0.0.2:8000/echo"]))
        assert echoed == "offline transfer 200"
        blocked = check(root.run([*curl, "-H", "content-type: application/json", "-d",
                                  json.dumps({"sfzh": ID_NUMBER}), "http://127.0.0.2:8000/echo"]))
        assert blocked.endswith(" 403") and "cn_id_card" in blocked
    finally:
        proxy.stop()
        upstream.stop()


def test_bundle_installs_verifies_serves_and_uninstalls_with_no_network(carried, throwaway):
    root = throwaway
    assert root.run(["curl", "-sS", "--max-time", "3", "https://pypi.org/simple/"]).returncode != 0
    name = next(carried.glob("gateway-*.tar.gz")).name
    bundle = f"/var/tmp/{name.removesuffix('.tar.gz')}"
    check(root.sh(f"cd {SHARED} && sha256sum --check {name}.sha256 && tar -C /var/tmp -xzf {name}"))
    paths = {"PREFIX": "/srv/gw", "CONFDIR": "/srv/gw-etc"}  # units in the default /etc/systemd/system
    env = [f"{key}={value}" for key, value in paths.items()]
    before = root.added_files()
    # Refused before anything is written: an added wheel, an altered file, a Python of another version.
    check(root.sh(f"touch {bundle}/wheelhouse/extra-1.0-py3-none-any.whl"))
    refused = root.run(["env", *env, f"{bundle}/install"])
    assert refused.returncode == 1 and "extra-1.0-py3-none-any.whl" in refused.stderr, refused.stderr
    check(root.sh(f"rm {bundle}/wheelhouse/extra-1.0-py3-none-any.whl; cp {bundle}/TARGET /tmp/TARGET;"
                  f"echo >> {bundle}/TARGET"))
    refused = root.run(["env", *env, f"{bundle}/install"])
    assert refused.returncode == 1 and "differ from SHA256SUMS" in refused.stderr, refused.stderr
    check(root.sh(f"cp /tmp/TARGET {bundle}/TARGET"))
    other = "/usr/bin/python3.11" if TARGET_VERSION != "3.11" and os.path.exists("/usr/bin/python3.11") else "/bin/true"
    refused = root.run(["env", *env, f"PYTHON={other}", f"{bundle}/install"])
    assert refused.returncode == 1 and f"not a Python {TARGET_VERSION}" in refused.stderr, refused.stderr
    if python_closed_to_others(carried):
        # pyenv's Python, under /root: refused (the service user could not run it). Open /root in this
        # throwaway copy only, standing in for a Python installed under /opt as docs/deploy.md says.
        refused = root.run(["env", *env, f"{bundle}/install"])
        assert refused.returncode == 1 and "cannot be run by other users" in refused.stderr, refused.stderr
        check(root.sh("chmod 711 /root"))
    assert root.added_files() == before

    installed = check(root.run(["env", *env, f"{bundle}/install"], timeout=300))
    assert "installed. Next:" in installed
    unit = check(root.run(["cat", "/etc/systemd/system/gateway.service"]))
    assert "ExecStart=/srv/gw/.venv/bin/gateway run -c /srv/gw-etc/gateway.yaml" in unit
    check(root.run(["getent", "passwd", "gateway"]))
    serve_one_transfer(root, "/srv/gw/.venv", "/srv/gw-etc/gateway.yaml")

    check(root.run(["env", *env, f"{bundle}/src/scripts/uninstall", "--purge"]))
    assert root.run(["getent", "passwd", "gateway"]).returncode == 2
    left = [path for path in root.added_files() if not path.startswith(BOOKKEEPING) and path not in before]
    assert left == []


def test_deb_installs_upgrades_rolls_back_and_purges_with_no_network(carried, throwaway):
    root = throwaway
    apt = ["apt-get", "install", "-y", "--allow-downgrades"]  # no network: nothing to download
    before = root.added_files()
    listing = check(root.run(["dpkg-deb", "-I", f"{SHARED}/gateway_0.1.0_amd64.deb", "conffiles"]))
    assert "/etc/gateway/gateway.yaml" in listing.split() and "/etc/default/gateway" in listing.split()

    if python_closed_to_others(carried):  # see the bundle's test
        check(root.sh("chmod 711 /root"))
    check(root.run([*apt, f"{SHARED}/gateway_0.1.0_amd64.deb"], timeout=300))
    assert os.path.basename(check(root.run(["readlink", "-f", "/usr/lib/systemd/system/gateway.service"]))) \
        == "gateway.service\n"
    serve_one_transfer(root, "/opt/gateway/.venv", "/etc/gateway/gateway.yaml")
    check(root.sh("echo '# edited by the admin' >> /etc/gateway/gateway.yaml"))
    state = check(root.sh("cd /var/lib/gateway && find . -type f | sort | xargs sha256sum"))
    assert "./trace/" in state, state  # the CA, the trace log and its key, written by the first run

    for version in ("0.1.1", "0.1.0"):  # upgrade, then roll back
        check(root.run([*apt, f"{SHARED}/gateway_{version}_amd64.deb"], timeout=300))
        assert check(root.run(["dpkg-query", "-W", "-f", "${Version}", "gateway"])) == version
        assert check(root.run(["tail", "-1", "/etc/gateway/gateway.yaml"])) == "# edited by the admin\n"
        assert check(root.sh("cd /var/lib/gateway && find . -type f | sort | xargs sha256sum")) == state
    serve_one_transfer(root, "/opt/gateway/.venv", "/etc/gateway/gateway.yaml")
    check(root.run(["/opt/gateway/.venv/bin/gateway", "trace", "verify", "/var/lib/gateway/trace"]))

    check(root.run(["apt-get", "purge", "-y", "gateway"], timeout=120))
    assert root.run(["getent", "passwd", "gateway"]).returncode == 2
    left = [path for path in root.added_files() if not path.startswith(BOOKKEEPING) and path not in before]
    assert left == []
