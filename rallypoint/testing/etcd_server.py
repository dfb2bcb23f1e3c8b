"""Run the real ``etcd`` binary: one member or a cluster, on free loopback ports, in temp dirs.

Used by the tests, the demo and the benchmarks. Members are started with a 10 ms heartbeat and a
100 ms election timeout so a cluster elects a leader in well under a second, and are torn down
with SIGKILL by PID. Debian's ``etcd-server`` package provides the binary.

A secured control plane, as an operator runs it: ``tls`` (``make_tls``: a CA made by ``trustme``)
serves clients over TLS and requires a client certificate signed by that CA; ``enable_auth``
turns on etcd's authentication with a root user and one user per cluster whose role may touch only
``/rallypoint/<cluster>/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rallypoint.rendezvous.etcd import EtcdSettings

INSTALL_HINT = "etcd is not installed: `sudo apt-get install etcd-server` (Debian/Ubuntu)"


def etcd_binary() -> str | None:
    """Path of the etcd binary, or None when it is not installed."""
    return os.environ.get("RALLYPOINT_ETCD_BIN") or shutil.which("etcd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MemberExited(RuntimeError):
    """An etcd member exited while it was expected to come up; the message holds its log's end."""

    def __init__(self, member: EtcdMember) -> None:
        try:
            self.log_tail = member.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            self.log_tail = ""
        super().__init__(f"etcd {member.name} exited; log: {member.log_path}")


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files of a test CA, the servers' certificate and a client certificate it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> EtcdTLS:
    """A fresh CA (``trustme``) and the certificates etcd and its clients need, under ``directory``."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="rallypoint test CA")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("rallypoint-client")  # trustme's certificates serve both ends (EKU)
    tls = EtcdTLS(*(directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(tls.ca))
    server.cert_chain_pems[0].write_to_path(str(tls.server_cert))
    server.private_key_pem.write_to_path(str(tls.server_key))
    client.cert_chain_pems[0].write_to_path(str(tls.client_cert))
    client.private_key_pem.write_to_path(str(tls.client_key))
    return tls


def cluster_role(cluster: str) -> str:
    return f"rallypoint-{cluster}"


@dataclass
class EtcdMember:
    """One etcd process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()  # runs the member elsewhere, e.g. in a network namespace (testing.netns)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "member not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    """A real etcd cluster of ``size`` members on loopback (size 1 is a plain single server)."""

    size: int = 1
    root: Path | None = None
    # etcd's --auto-compaction-retention in periodic mode ("1m"): superseded revisions go, so a
    # long run's database stops growing (what an operator's etcd should run with). None: never.
    compaction: str | None = None
    tls: EtcdTLS | None = None  # clients over TLS, with a client certificate from its CA
    # member i listens on hosts[i] and runs under prefixes[i] (a network namespace's address and
    # ``ip netns exec``: testing.netns); loopback and this process's namespace when not given
    hosts: list[str] | None = None
    prefixes: list[list[str]] | None = None
    members: list[EtcdMember] = field(default_factory=list)
    root_auth: tuple[str, str] | None = None  # (user, password) once enable_auth ran
    _own_root: bool = False

    def __post_init__(self) -> None:
        if self.root is None:
            # tmpfs when there is one: etcd fsyncs every write, and a busy disk stalls it for seconds.
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self.root = Path(tempfile.mkdtemp(prefix="rallypoint-etcd-", dir=shm))
            self._own_root = True
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            name = f"m{i}"
            self.members.append(EtcdMember(
                name, free_port(), free_port(), self.root / f"{name}.etcd", self.root / f"{name}.log",
                host=self.hosts[i] if self.hosts else "127.0.0.1",
                prefix=tuple(self.prefixes[i]) if self.prefixes else (),
            ))

    def _client_url(self, m: EtcdMember) -> str:
        return ("https://" if self.tls else "") + m.endpoint

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._client_url(m) for m in self.members)

    def client_settings(self, members: list[EtcdMember] | None = None, user: str | None = None,
                        password: str | None = None, **kw: object) -> EtcdSettings:
        """Settings that reach ``members`` (default all) with this cluster's TLS; as ``user``, or
        as root once auth is on and no user is given."""
        from rallypoint.rendezvous.etcd import EtcdSettings

        if user is None and self.root_auth is not None:
            user, password = self.root_auth
        tls = {"ca_cert": str(self.tls.ca), "cert_cert": str(self.tls.client_cert),
               "cert_key": str(self.tls.client_key)} if self.tls else {}
        return EtcdSettings(endpoints=tuple(self._client_url(m) for m in (members or self.members)),
                            user=user, password=password, **tls, **kw)  # type: ignore[arg-type]

    def enable_auth(self, root_password: str, users: dict[str, tuple[str, str]]) -> None:
        """Turn on etcd's authentication: a root user, and for each ``user: (password, cluster)``
        a role that may read and write ``/rallypoint/<cluster>/`` only."""
        from pyetcd import etcdrpc
        from pyetcd.utils import prefix_range_end

        from rallypoint.rendezvous.etcd import EtcdClient

        client = EtcdClient(self.client_settings())
        try:
            auth = client.call("auth setup", lambda c: c.authstub)
            timeout = 5.0
            auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=root_password), timeout)
            auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout)
            for user, (password, cluster) in users.items():
                role, prefix = cluster_role(cluster), f"/rallypoint/{cluster}/".encode()
                auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name=role), timeout)
                perm = etcdrpc.Permission(permType=etcdrpc.Permission.READWRITE, key=prefix,
                                          range_end=prefix_range_end(prefix))
                auth.RoleGrantPermission(etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=perm), timeout)
                auth.UserAdd(etcdrpc.AuthUserAddRequest(name=user, password=password), timeout)
                auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=user, role=role), timeout)
            auth.AuthEnable(etcdrpc.AuthEnableRequest(), timeout)
        finally:
            client.close()
        self.root_auth = ("root", root_password)

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in self.members)

    def start_member(self, member: EtcdMember, state: str = "new") -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        scheme = "https" if self.tls else "http"
        h = member.host
        args = [
            *member.prefix, binary, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", f"{scheme}://{h}:{member.client_port}",
            "--advertise-client-urls", f"{scheme}://{h}:{member.client_port}",
            "--listen-peer-urls", f"http://{h}:{member.peer_port}",
            "--initial-advertise-peer-urls", f"http://{h}:{member.peer_port}",
            "--initial-cluster", self._initial_cluster(), "--initial-cluster-state", state,
            "--initial-cluster-token", f"rallypoint-{id(self):x}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--listen-metrics-urls", "", "--logger", "zap", "--log-outputs", str(member.log_path),
        ]
        if self.tls:
            args += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                     "--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        if self.compaction:
            args += ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", self.compaction]
        member.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self, timeout: float = 15.0, attempts: int = 3) -> EtcdCluster:
        """Start every member and wait until each one answers.

        ``free_port`` only says a port was free a moment ago: when a member finds one of its ports
        taken by then, the whole cluster starts again on fresh ports (a cluster missing a member
        would pass for healthy and lose its quorum at the first member a test kills).
        """
        for attempt in range(attempts):
            try:
                for m in self.members:
                    self.start_member(m)
                self.wait_healthy(timeout, self.members)
                return self
            except BaseException as exc:
                self.stop(remove=False)  # never leave a half-started cluster behind
                lost_port = isinstance(exc, MemberExited) and "address already in use" in exc.log_tail
                if not lost_port or attempt == attempts - 1:
                    if self._own_root and self.root is not None:
                        shutil.rmtree(self.root, ignore_errors=True)
                    raise
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                    m.log_path.unlink(missing_ok=True)
                    m.client_port, m.peer_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def wait_healthy(self, timeout: float = 15.0, members: list[EtcdMember] | None = None) -> None:
        """Block until each (alive) member serves a linearizable read."""
        from rallypoint.errors import EtcdError
        from rallypoint.rendezvous.etcd import EtcdClient

        deadline = time.monotonic() + timeout
        for m in members or [m for m in self.members if m.alive()]:
            client = EtcdClient(self.client_settings([m], request_timeout=0.5, endpoint_retry=0.0, retry_deadline=0))
            try:
                while True:
                    try:
                        client.get("/rallypoint-health")
                        break
                    except EtcdError as exc:
                        if not m.alive():
                            raise MemberExited(m) from exc
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"etcd {m.name} not healthy in {timeout}s; log: {m.log_path}") from exc
                        time.sleep(0.02)
            finally:
                client.close()

    def leader(self) -> EtcdMember:
        """The member that currently leads the raft group."""
        from rallypoint.rendezvous.etcd import EtcdClient

        for m in self.members:
            if not m.alive():
                continue
            client = EtcdClient(self.client_settings([m], request_timeout=1.0, endpoint_retry=0.0))
            try:
                raw = client.raw
                leader_id = raw.status().leader.id
                for mm in raw.members:
                    if mm.id == leader_id:
                        return next(x for x in self.members if x.name == mm.name)
            except Exception:
                continue
            finally:
                client.close()
        raise RuntimeError("no etcd leader found")

    def kill(self, member: EtcdMember, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one member (SIGKILL by default) and reap it if it died."""
        if member.proc is None:
            return
        try:
            os.kill(member.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            member.proc.wait(timeout=10)

    def restart(self, member: EtcdMember, timeout: float = 15.0) -> None:
        """Start a killed member again on its old data dir and ports."""
        self.start_member(member, state="existing")
        self.wait_healthy(timeout, [member])

    def stop(self, remove: bool = True) -> None:
        """SIGKILL every member and (``remove``) the temp dirs this cluster made."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                try:
                    os.kill(m.proc.pid, signal.SIGCONT)
                    os.kill(m.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                m.proc.wait(timeout=10)
        if remove and self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
