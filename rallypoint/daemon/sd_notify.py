"""systemd's notify protocol in a few lines: one datagram to ``$NOTIFY_SOCKET`` per message.

A leading ``@`` in the socket path names an abstract socket. Outside systemd (no variable set)
every call is a no-op, so the daemon can call it unconditionally.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and ``STOPPING=1`` to systemd."""

    def __init__(self, path: str | None = None) -> None:
        path = path if path is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = ("\0" + path[1:]) if path and path.startswith("@") else path
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving gen 3")``."""
        if self._sock is None or self.address is None:
            return
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self.address)
        except OSError:
            pass  # systemd went away; nothing useful to do

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings that systemd asks for (half its WatchdogSec), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6
