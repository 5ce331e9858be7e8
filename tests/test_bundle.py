"""Offline installation: the bundle and the Debian package, installed with no network.

`scripts/bundle` builds the bundle (this needs the package index; pip's cache makes it quick), and
`scripts/deb` the package from it. Each is then installed into a throwaway copy of this machine (see
tests/throwaway_root.py: writes vanish with it, only loopback is up, so no index or mirror is reachable),
carries a transfer from curl through the installed gateway to an upstream there, and is removed again.

The package is upgraded to a next release that differs as a patch release does (its code reports another
version, its default gateway.yaml changes a value) while the gateway serves a slow transfer, and rolled
back. Systemd does not run inside: the maintainer scripts' `systemctl` calls go to a stand-in that records
them and stops the gateway the way the unit's stop does (SIGTERM to the main process; the unit itself is
checked by tests/test_systemd.py). This machine is Debian 12 (python3 is 3.11), so the package installed
here is built with DEB_PYTHON naming the Python 3.12+ found here; the package as built for Debian 13
(depending on its python3) is installed into a Debian 13 root made by debootstrap, cached in TRIXIE_ROOT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from gateway.ops.lab import lab_supported
from tests.gatewayproc import REPO, UPSTREAM_SERVER, Process
from tests.throwaway_root import CLEAN_ENV, SHARED, ThrowawayRoot

ID_NUMBER = "11010519491231002X"
TARGET_VERSION = "%d.%d" % sys.version_info[:2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NEXT_VERSION = re.sub(r"\d+$", lambda patch: str(int(patch.group()) + 1), VERSION)
# Paths installers may leave behind for good: package manager records and logs.
BOOKKEEPING = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/", "/var/log/", "/etc/ld.so.cache")
# The admin's edit of /etc/gateway/gateway.yaml: two workers (a supervisor and a trace writer, as on a
# real machine) and a shutdown grace the slow transfer below fits in.
ADMIN_EDIT = "sed -i -e 's/^  # workers: 2 /  workers: 2   /' -e 's/^  # shutdown_grace: 10s /  shutdown_grace: 8s  /'"
# apt without a terminal: keep a configuration file the admin changed, put the new default beside it.
KEEP_CONFIG = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
# Every gateway module imports in the installed virtualenv: a dependency missing from the wheelhouse fails
# here, also one that only a rarely run command imports (psutil for `gateway drain`, joserfc for grants).
IMPORT_ALL = """
import importlib, pkgutil, gateway
names = [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules")
"""
# systemd's part in the maintainer scripts, played in the throwaway root: each call is recorded; `is-active`
# and `stop` act on the gateway the test started (its main pid in /run/gateway.pid) as the unit's stop does
# (KillMode=mixed: SIGTERM to the main process only, then wait, TimeoutStopSec at most). While
# /run/systemctl.hold exists, `stop` waits before signalling: the test starts a slow transfer meanwhile.
SYSTEMCTL = r"""#!/bin/sh
echo "$*" >> /run/systemctl.calls
pid=$(cat /run/gateway.pid 2>/dev/null) || pid=
running() { [ -n "$pid" ] && [ -e /proc/$pid ] && [ "$(sed 's/.*) //' /proc/$pid/stat | cut -c1)" != Z ]; }
case "$*" in
    "is-active --quiet gateway.service") running ;;
    "is-active --quiet "*) exit 3 ;;  # the sentinel is not started here
    "stop gateway.service")
        while [ -e /run/systemctl.hold ]; do sleep 0.1; done
        kill -TERM "$pid"
        for tick in $(seq 300); do running || { rm /run/gateway.pid; exit 0; }; sleep 0.1; done
        echo "gateway pid $pid still running 30 s after SIGTERM" >&2; exit 1 ;;
esac
"""
# Debian 13 for the package built with the python3 dependency; made once (about 2 min), reused after.
TRIXIE_ROOT = Path(os.environ.get("GATEWAY_TEST_TRIXIE_ROOT", "/var/cache/gateway-test/trixie"))
TRIXIE_PACKAGES = "systemd,python3,python3-venv,libpcap0.8t64,ca-certificates,curl"


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


def next_release(bundle: Path, out: Path) -> Path:
    """The bundle of the next patch release, made from `bundle` the way such a release changes: its code
    (the version it reports) and its default configuration (a changed default: dpkg must keep the admin's
    gateway.yaml and put the new one beside it). Same wheels; checksums made again as scripts/bundle does."""
    work = out / "next"
    work.mkdir()
    subprocess.run(["tar", "-C", work, "-xzf", bundle], check=True)
    old = next(work.iterdir())
    tree = old.rename(work / old.name.replace(f"-{VERSION}-", f"-{NEXT_VERSION}-"))
    for path, old_text, new_text in [
        ("src/pyproject.toml", f'version = "{VERSION}"', f'version = "{NEXT_VERSION}"'),
        ("src/gateway/__init__.py", f'__version__ = "{VERSION}"', f'__version__ = "{NEXT_VERSION}"'),
        ("src/config/gateway.yaml", "inspection_budget: 5s ", "inspection_budget: 6s "),
        ("TARGET", f"VERSION={VERSION}\n", f"VERSION={NEXT_VERSION}\n"),
    ]:
        text = (tree / path).read_text()
        assert text.count(old_text) == 1, (path, old_text)
        (tree / path).write_text(text.replace(old_text, new_text))
    subprocess.run("rm SHA256SUMS && find . -type f -printf '%P\\0' | sort -z | xargs -0 sha256sum > ../SHA256SUMS"
                   " && mv ../SHA256SUMS .", shell=True, cwd=tree, check=True)
    made = out / f"{tree.name}.tar.gz"
    subprocess.run(["tar", "-C", work, "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-czf", made,
                    tree.name], check=True)
    shutil.rmtree(work)
    return made


def build_deb(bundle: Path, **env: str) -> None:
    deb = subprocess.run([REPO / "scripts" / "deb", bundle], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert deb.returncode == 0, deb.stderr


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """The folder carried across: the bundle, its .sha256, the packages of this version and the next."""
    reason = _missing_capability()
    if reason:
        pytest.skip(f"cannot install into a throwaway root: {reason}")
    shared = tmp_path_factory.mktemp("carried")
    python = subprocess.run([REPO / "scripts" / "find-python", TARGET_VERSION], capture_output=True, text=True,
                            check=True).stdout.strip()
    built = subprocess.run([REPO / "scripts" / "bundle"], env={**os.environ, "PYTHON": python, "OUT": str(shared)},
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    bundle = next(shared.glob(f"gateway-{VERSION}-*.tar.gz"))
    for made in (bundle, next_release(bundle, shared)):
        build_deb(made, DEB_PYTHON=python)
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


def check_installed(root: ThrowawayRoot, venv: str, config: str) -> None:
    """Every module imports (IMPORT_ALL) and the installed configuration passes `gateway check`."""
    assert check(root.run([f"{venv}/bin/python", "-c", IMPORT_ALL])).endswith(" modules\n")
    check(root.run([f"{venv}/bin/gateway", "check", "-c", config]))


def start_upstream(root: ThrowawayRoot) -> Process:
    return Process(["python3", f"{SHARED}/upstream_server.py", "--bind", "127.0.0.2", "--port", "8000",
                    "--log", "/tmp/upstream.log"], root.prefix()).started("ready", timeout=15)


def start_gateway(root: ThrowawayRoot, venv: str, config: str) -> Process:
    """The installed gateway started as the unit starts it: user gateway, its state and log folders made;
    its main pid where the systemctl stand-in finds it."""
    check(root.sh("install -d -o gateway -g gateway -m 700 /var/lib/gateway /var/log/gateway"))
    proxy = Process(["setpriv", "--reuid=gateway", "--regid=gateway", "--init-groups", f"{venv}/bin/gateway", "run",
                     "-c", config], root.prefix()).started("alerts:", timeout=60)
    check(root.sh(f"echo {proxy.proc.pid} > /run/gateway.pid"))
    return proxy


CURL = ["curl", "-sS", "--max-time", "20", "-x", "http://127.0.0.1:8080", "-w", " %{http_code}"]


def send_transfers(root: ThrowawayRoot) -> None:
    """A clean transfer and one carrying an ID number, through the running gateway."""
    echoed = check(root.run([*CURL, "--data-binary", "offline transfer", "http://127.0.0.2:8000/echo"]))
    assert echoed == "offline transfer 200"
    blocked = check(root.run([*CURL, "-H", "content-type: application/json", "-d", json.dumps({"sfzh": ID_NUMBER}),
                              "http://127.0.0.2:8000/echo"]))
    assert blocked.endswith(" 403") and "cn_id_card" in blocked


def serve_one_transfer(root: ThrowawayRoot, venv: str, config: str) -> None:
    upstream = start_upstream(root)
    proxy = start_gateway(root, venv, config)
    try:
        send_transfers(root)
    finally:
        proxy.stop()
        upstream.stop()


def metrics(root: ThrowawayRoot) -> dict[str, float]:
    """The gateway's /metrics, series (with labels) -> value."""
    text = check(root.run(["curl", "-sS", "--max-time", "10", "http://127.0.0.1:9464/metrics"]))
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def transfers_total(series: dict[str, float]) -> float:
    return sum(value for name, value in series.items() if name.startswith("gateway_transfers_total"))


def trace_records(root: ThrowawayRoot, venv: str) -> list[dict]:
    shown = check(root.run([f"{venv}/bin/gateway", "trace", "show", "/var/lib/gateway/trace"]))
    return [json.loads(line)["record"] for line in shown.splitlines()]


def state_digests(root: ThrowawayRoot, *skipped: str) -> str:
    """SHA-256 of every file in /var/lib/gateway but those in the `skipped` folders."""
    pruned = "".join(f" ! -path './{folder}/*'" for folder in skipped)
    return check(root.sh(f"cd /var/lib/gateway && find . -type f{pruned} | sort | xargs sha256sum"))


def test_bundle_installs_verifies_serves_and_uninstalls_with_no_network(carried, throwaway):
    root = throwaway
    assert root.run(["curl", "-sS", "--max-time", "3", "https://pypi.org/simple/"]).returncode != 0
    name = next(carried.glob(f"gateway-{VERSION}-*.tar.gz")).name
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
    check_installed(root, "/srv/gw/.venv", "/srv/gw-etc/gateway.yaml")
    serve_one_transfer(root, "/srv/gw/.venv", "/srv/gw-etc/gateway.yaml")

    check(root.run(["env", *env, f"{bundle}/src/scripts/uninstall", "--purge"]))
    assert root.run(["getent", "passwd", "gateway"]).returncode == 2
    left = [path for path in root.added_files() if not path.startswith(BOOKKEEPING) and path not in before]
    assert left == []


# apt runs dpkg with PATH set to its DPkg::Path, without /usr/local/sbin: the systemctl stand-in's folder.
APT_WITH_STANDIN = ["apt-get", "-o", f"DPkg::Path={CLEAN_ENV['PATH']}"]


def wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def apt_install(root: ThrowawayRoot, deb: str) -> str:
    """`apt-get install` a package file with no network and no terminal; the systemctl calls it made."""
    check(root.sh(": > /run/systemctl.calls"))
    check(root.run([*APT_WITH_STANDIN, "install", "-y", "--allow-downgrades", *KEEP_CONFIG, deb], timeout=300))
    return check(root.run(["cat", "/run/systemctl.calls"]))


def test_deb_upgrades_while_serving_and_rolls_back_keeping_config_state_and_log(carried, throwaway):
    root = throwaway
    venv, config = "/opt/gateway/.venv", "/etc/gateway/gateway.yaml"
    this, following = (f"{SHARED}/gateway_{version}_amd64.deb" for version in (VERSION, NEXT_VERSION))
    listing = check(root.run(["dpkg-deb", "-I", this, "conffiles"]))
    assert "/etc/gateway/gateway.yaml" in listing.split() and "/etc/default/gateway" in listing.split()
    check(root.sh(f"mkdir -p /run/systemd/system && cat > /usr/local/sbin/systemctl <<'EOF'\n{SYSTEMCTL}EOF\n"
                  "chmod 755 /usr/local/sbin/systemctl"))
    before = root.added_files()
    if python_closed_to_others(carried):  # see the bundle's test
        check(root.sh("chmod 711 /root"))

    # Version N installed, its configuration edited by the admin, serving.
    apt_install(root, this)
    assert os.path.basename(check(root.run(["readlink", "-f", "/usr/lib/systemd/system/gateway.service"]))) \
        == "gateway.service\n"
    check_installed(root, venv, config)
    check(root.sh(f"{ADMIN_EDIT} {config} && grep -q '^  workers: 2' {config} "
                  f"&& grep -q '^  shutdown_grace: 8s' {config}"))
    admins = check(root.run(["cat", config]))
    upstream = start_upstream(root)
    proxy = start_gateway(root, venv, config)
    send_transfers(root)
    key = check(root.run(["cat", "/var/lib/gateway/trace/trace-signing.pub"]))  # the auditor's copy of the verifier key
    ca = state_digests(root, "trace", "metrics")  # the CA and the keys (the log grows; counters are runtime)
    assert "mitmproxy-ca.pem" in ca, ca
    wait_until(lambda: transfers_total(metrics(root)) == 2, timeout=10)  # counted as each ends

    # Upgrade to N+1 while a slow transfer is in flight: the old prerm stops the gateway, which drains.
    check(root.run(["touch", "/run/systemctl.hold"]))
    done: dict[str, subprocess.CompletedProcess] = {}
    apt = threading.Thread(target=lambda: done.update(apt=root.run(
        [*APT_WITH_STANDIN, "install", "-y", *KEEP_CONFIG, following], timeout=300)))
    check(root.sh(": > /run/systemctl.calls"))
    apt.start()
    wait_until(lambda: "stop gateway.service" in check(root.run(["cat", "/run/systemctl.calls"])))
    client = threading.Thread(target=lambda: done.update(slow=root.run(
        [*CURL, "http://127.0.0.2:8000/text?body=slow&delay=3&m=slow"])))
    client.start()
    wait_until(lambda: "m=slow" in check(root.run(["cat", "/tmp/upstream.log"])))
    check(root.run(["rm", "/run/systemctl.hold"]))  # the stop's SIGTERM, 3 s before the answer
    client.join(30)
    apt.join(300)
    assert check(done["slow"]) == "slow 200"  # finished, not cut
    check(done["apt"])
    upgraded = check(root.run(["cat", "/run/systemctl.calls"]))
    assert "waiting up to" in proxy.wait_for("s for 1 transfers in flight", timeout=1)  # the grace, less the stop so far
    assert proxy.proc.wait(timeout=10) == 0
    # prerm of N stopped it (before the code and the virtualenv were replaced), postinst of N+1 started it.
    assert upgraded.splitlines() == [
        "is-active --quiet gateway-sentinel.service", "is-active --quiet gateway.service", "stop gateway.service",
        "daemon-reload",  # postrm of N
        "daemon-reload", "start gateway.service", "try-restart gateway-sentinel.service"]
    assert check(root.run(["dpkg-query", "-W", "-f", "${Version}", "gateway"])) == NEXT_VERSION
    assert check(root.run([f"{venv}/bin/gateway", "--version"])).strip() == f"gateway {NEXT_VERSION}"
    # The admin's file kept byte for byte; N+1's new default beside it; the CA and keys untouched.
    assert check(root.run(["cat", config])) == admins
    assert "inspection_budget: 6s " in check(root.run(["cat", f"{config}.dpkg-dist"]))
    assert state_digests(root, "trace", "metrics") == ca
    check_installed(root, venv, config)

    # N+1 serves on: the trace log goes on where N stopped (its size gauge too); counters start from zero.
    size = len(trace_records(root, venv))
    proxy = start_gateway(root, venv, config)
    series = metrics(root)
    assert series[f'gateway_build_info{{version="{NEXT_VERSION}"}}'] == 1
    assert transfers_total(series) == 0
    send_transfers(root)
    wait_until(lambda: transfers_total(metrics(root)) == 2, timeout=10)
    assert metrics(root)["gateway_trace_tree_size"] >= size + 2
    proxy.stop()
    state = state_digests(root)

    # Roll back to N: nothing running, so nothing stopped; configuration and state byte for byte.
    rolled_back = apt_install(root, this)
    assert "stop gateway.service" not in rolled_back
    assert check(root.run(["dpkg-query", "-W", "-f", "${Version}", "gateway"])) == VERSION
    assert check(root.run([f"{venv}/bin/gateway", "--version"])).strip() == f"gateway {VERSION}"
    assert check(root.run(["cat", config])) == admins
    assert "inspection_budget: 5s " in check(root.run(["cat", f"{config}.dpkg-dist"]))
    assert state_digests(root) == state
    # N writes on to the log N+1 wrote, and N's tools verify the whole of it with the auditor's key.
    proxy = start_gateway(root, venv, config)
    send_transfers(root)
    proxy.stop()
    upstream.stop()
    check(root.sh(f"echo '{key.strip()}' > /tmp/auditor.pub"))
    check(root.run([f"{venv}/bin/gateway", "trace", "verify", "/var/lib/gateway/trace", "--pubkey",
                    "/tmp/auditor.pub"]))
    records = trace_records(root, venv)
    slow_records = [(r.get("phase"), r.get("status")) for r in records if "m=slow" in (r.get("url") or "")]
    assert slow_records == [("open", None), ("done", 200)], slow_records
    echoed = {r["id"] for r in records if (r.get("url") or "").endswith("/echo")}
    assert len(echoed) == 6, records  # two transfers from each of N, N+1 and N again

    check(root.run([*APT_WITH_STANDIN, "purge", "-y", "gateway"], timeout=120))
    assert root.run(["getent", "passwd", "gateway"]).returncode == 2
    left = [path for path in root.added_files() if not path.startswith(BOOKKEEPING) and path not in before]
    assert left == []


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (deb.debian.org when none is named)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text() if path.is_file() else ""
        for uri in re.findall(r"^(?:URIs:|deb(?:\s+\[[^]]*\])?)\s+(\S+)", text, re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def trixie_root() -> Path:
    """A Debian 13 root folder (minbase and the package's dependencies), made once by debootstrap through
    this machine's Debian mirror (about 2 min, 290 MB) and reused by later runs; its tests never write to it."""
    stamp = TRIXIE_ROOT.with_name(TRIXIE_ROOT.name + ".packages")
    if stamp.is_file() and stamp.read_text() == TRIXIE_PACKAGES and TRIXIE_ROOT.is_dir():
        return TRIXIE_ROOT
    if not shutil.which("debootstrap"):
        pytest.skip(f"no Debian 13 root in {TRIXIE_ROOT} and debootstrap is missing (Debian package debootstrap)")
    partial = TRIXIE_ROOT.with_name(f".{TRIXIE_ROOT.name}.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    made = subprocess.run(["debootstrap", "--variant=minbase", f"--include={TRIXIE_PACKAGES}", "trixie", partial,
                           debian_mirror()], capture_output=True, text=True, timeout=900)
    if made.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.skip(f"debootstrap trixie from {debian_mirror()} failed (no mirror reachable?): {made.stdout[-500:]}")
    shutil.rmtree(TRIXIE_ROOT, ignore_errors=True)  # one made for other packages
    partial.rename(TRIXIE_ROOT)
    stamp.write_text(TRIXIE_PACKAGES)
    return TRIXIE_ROOT


def test_deb_for_debian_13_installs_with_its_python3_and_serves(carried, trixie_root, tmp_path):
    if TARGET_VERSION != "3.13":
        pytest.skip(f"the bundle is built for this Python, {TARGET_VERSION}; Debian 13's python3 is 3.13")
    folder = carried / "trixie"
    folder.mkdir()
    bundle = next(carried.glob(f"gateway-{VERSION}-*.tar.gz"))
    shutil.copy(bundle, folder)
    build_deb(folder / bundle.name)  # DEB_PYTHON unset: the package depends on Debian's python3
    deb = f"{SHARED}/trixie/gateway_{VERSION}_amd64.deb"
    root = ThrowawayRoot(tmp_path, carried, f"gwdeb{os.getpid() % 100000}", lower=trixie_root)
    try:
        root.up()
        assert check(root.run(["cat", "/etc/debian_version"])).startswith("13.")
        assert "python3 (>= 3.13~), python3 (<< 3.14), python3-venv" in check(root.run(["dpkg-deb", "-f", deb,
                                                                                          "Depends"]))
        assert root.run(["curl", "-sS", "--max-time", "3", "https://pypi.org/simple/"]).returncode != 0
        before = root.added_files()
        check(root.run(["apt-get", "install", "-y", deb], timeout=300))
        check_installed(root, "/opt/gateway/.venv", "/etc/gateway/gateway.yaml")
        assert check(root.run(["readlink", "-f", "/opt/gateway/.venv/bin/python"])) == "/usr/bin/python3.13\n"
        serve_one_transfer(root, "/opt/gateway/.venv", "/etc/gateway/gateway.yaml")
        check(root.run(["apt-get", "purge", "-y", "gateway"], timeout=120))
        left = [path for path in root.added_files() if not path.startswith(BOOKKEEPING) and path not in before]
        assert left == []
    finally:
        root.down()
