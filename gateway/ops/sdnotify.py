"""systemd's notify protocol (Type=notify, WatchdogSec): a few datagrams, no dependency."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> None:
    """Send a state line such as READY=1 to systemd; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:  # the listener is gone (a supervisor killed outright): nobody left to tell
            pass


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half systemd's WatchdogSec), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 2e6 if usec and usec.isdigit() and int(usec) > 0 else None
