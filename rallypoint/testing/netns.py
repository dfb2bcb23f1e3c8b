"""Network partitions on one machine: every party in a network namespace of its own, all joined
by one bridge, and cuts made by routes inside the namespaces.

Needs root (``ip netns``). Nothing touches the host's own network: the bridge lives in a hub
namespace made for the lab, and every address (10.77.0.0/24) exists only inside the lab's
namespaces. A cut between two parties is a blackhole route in each, both ways: packets of
established connections are dropped without a word (the peers find out by their own timeouts,
as in a real partition), and new connections fail at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.77.0"


def available() -> str | None:
    """None when this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"rp-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class NetLab:
    """Parties by name, each in namespace ``rp<id>-<name>`` with address ``10.77.0.<k>`` on its
    ``eth0``; ``cuts`` holds the pairs cut now."""

    names: list[str]
    lab_id: str = field(default_factory=lambda: secrets.token_hex(2))
    cuts: set[tuple[str, str]] = field(default_factory=set)

    @property
    def hub(self) -> str:
        return f"rp{self.lab_id}-hub"

    def ns(self, name: str) -> str:
        return f"rp{self.lab_id}-{name}"

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def prefix(self, name: str) -> list[str]:
        """The command prefix that runs a program inside ``name``'s namespace."""
        return ["ip", "netns", "exec", self.ns(name)]

    def create(self) -> NetLab:
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for k, name in enumerate(self.names):
                ns, port = self.ns(name), f"p{k}"
                _ip("netns", "add", ns)
                _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except Exception:
            self.destroy()
            raise
        return self

    def cut(self, a: str, b: str) -> None:
        """No packet between ``a`` and ``b``, either way, until ``heal``."""
        for x, y in ((a, b), (b, a)):
            _ip("-n", self.ns(x), "route", "add", "blackhole", f"{self.address(y)}/32")
        self.cuts.add((a, b))

    def heal(self, a: str, b: str) -> None:
        for x, y in ((a, b), (b, a)):
            subprocess.run(["ip", "-n", self.ns(x), "route", "del", "blackhole", f"{self.address(y)}/32"],
                           check=False, capture_output=True)
        self.cuts.discard((a, b))
        self.cuts.discard((b, a))

    def isolate(self, name: str) -> list[tuple[str, str]]:
        """Cut ``name`` from every other party; returns the pairs, for ``heal``."""
        pairs = [(name, other) for other in self.names if other != name]
        for a, b in pairs:
            self.cut(a, b)
        return pairs

    def heal_all(self) -> None:
        for a, b in list(self.cuts):
            self.heal(a, b)

    def destroy(self) -> None:
        """SIGKILL whatever still runs in the lab's namespaces, then delete them (a namespace with
        a process in it outlives its name)."""
        for ns in [self.ns(n) for n in self.names] + [self.hub]:
            pids = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    # -- handing the lab to a process that runs inside it ------------------------------------

    def to_json(self) -> str:
        return json.dumps({"names": self.names, "lab_id": self.lab_id})

    @classmethod
    def from_json(cls, text: str) -> NetLab:
        d = json.loads(text)
        return cls(list(d["names"]), str(d["lab_id"]))
