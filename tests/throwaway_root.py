"""A throwaway copy of this machine (or of another root folder, such as a Debian 13 made by debootstrap) to
install into, with no network.

Its root filesystem is this machine's (or that folder's) seen through an overlay whose writes land in a
tmpfs, mounted in a private mount namespace; its network namespace has only loopback up, so nothing run
there reaches a package index or mirror. Installers run as root at their real paths (/opt/gateway,
/etc/gateway, the gateway user, dpkg's database) and all they write vanishes with it: the machine itself
(and that folder) is untouched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pyroute2 import IPRoute, netns

from gateway.ops.lab import _pids_in_netns, _terminate

SHARED = "/mnt/shared"  # where the test's shared folder appears inside
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


class ThrowawayRoot:
    def __init__(self, workdir: Path, shared: Path, name: str, lower: Path = Path("/")) -> None:
        self.name = name
        self.lower = lower  # the root filesystem it is a copy of
        self.shared = shared
        self.root = workdir / "root"
        self.layers = workdir / "layers"  # tmpfs holding the overlay's upper (written) layer
        self.ns_dir = workdir / "ns"
        self.mount_ns = self.ns_dir / "mnt"

    def up(self) -> "ThrowawayRoot":
        netns.create(self.name)
        with IPRoute(netns=self.name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for folder in (self.root, self.layers, self.ns_dir):
            folder.mkdir(parents=True)
        # `unshare --mount=FILE` keeps the namespace on FILE, which must sit on a private mount.
        subprocess.run(["mount", "--bind", self.ns_dir, self.ns_dir], check=True)
        subprocess.run(["mount", "--make-private", self.ns_dir], check=True)
        self.mount_ns.touch()
        root, layers = self.root, self.layers
        script = f"""
            mount -t tmpfs tmpfs {layers} && mkdir {layers}/upper {layers}/work
            mount -t overlay overlay -o lowerdir={self.lower},upperdir={layers}/upper,workdir={layers}/work {root}
            mount -t proc proc {root}/proc
            mount --rbind /dev {root}/dev
            mount -t tmpfs tmpfs {root}/run
            mount -t tmpfs tmpfs {root}/tmp
            mkdir -p {root}{SHARED} && mount --bind {self.shared} {root}{SHARED}
        """
        subprocess.run(["unshare", f"--mount={self.mount_ns}", "--propagation", "private", "sh", "-ec", script],
                       check=True, timeout=30)
        return self

    def prefix(self) -> list[str]:
        """argv prefix running a command inside, as root, at its root, with a clean environment."""
        return ["nsenter", f"--mount={self.mount_ns}", f"--net=/var/run/netns/{self.name}",
                "chroot", str(self.root), "env", "-i", *(f"{k}={v}" for k, v in CLEAN_ENV.items())]

    def run(self, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(), *argv], capture_output=True, text=True, timeout=timeout, **kwargs)

    def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["sh", "-ec", script], timeout=timeout)

    def added_files(self) -> list[str]:
        """Paths written inside that do not exist in the root it copies: what an installer added."""
        listing = subprocess.run(["nsenter", f"--mount={self.mount_ns}", "find", f"{self.layers}/upper",
                                  "-mindepth", "1", "!", "-type", "c", "-printf", "/%P\n"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.split()
        return sorted(path for path in listing if not os.path.lexists(f"{self.lower}{path}"))

    def down(self) -> None:
        _terminate(_pids_in_netns(self.name))
        subprocess.run(["umount", "--lazy", self.mount_ns], check=False)
        subprocess.run(["umount", "--lazy", self.ns_dir], check=False)
        if self.name in netns.listnetns():
            netns.remove(self.name)
