"""A real rallypoint deployment on one machine, for the chaos suite: a 3-member etcd cluster, N
rallyd daemons (one rank slot each: a CPU rank, or one GPU of the host per node; every node with its
own copy of the tiny model, as nodes with local disks have), and a watch that records every plan
ever written."""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from rallypoint.errors import RallypointError
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery.events import Event, read_events
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.rendezvous.records import Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.testing.netns import NetLab
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.title import describe


@dataclass
class PlanWrite:
    key: str
    value: bytes
    revision: int


@dataclass
class Deployment:
    """Args: root: a scratch directory; nodes: how many rallyd; tp: ranks per replica; gpus: 0 for
    CPU ranks (gloo), else the host's GPUs: node ``n<i>`` sees GPU ``(i-1) % gpus`` alone (NCCL,
    float32 weights, so a resumed request draws the reference's tokens); arch: the tiny model's
    layout, ``llama`` or ``moe`` (Mixtral's: experts split over each replica's TP ranks, EP = TP);
    ep: ``dp`` spreads a ``moe``'s experts over every replica instead (TP = 1, two copies of each);
    lab: a network lab (``testing.netns``) to run in: every etcd member (``e1``..``e3``) and node in a
    namespace of its own, this process in ``ctl``, so the partition scenarios can cut them apart."""

    root: Path
    nodes: int = 3
    tp: int = 2
    cluster: str = field(default_factory=lambda: f"chaos-{secrets.token_hex(3)}")  # two runs never mix
    gpus: int = 0
    arch: str = "llama"
    ep: str = "tp"
    pd: bool = False  # disaggregated: TP=1, the first replica prefills every prompt, the others decode
    extra: tuple[str, ...] = ()
    lab: NetLab | None = None
    etcd: EtcdCluster | None = None
    daemons: dict[str, DaemonProcess] = field(default_factory=dict)
    plan_writes: list[PlanWrite] = field(default_factory=list)
    client: EtcdClient | None = None
    # (wall time, node, exit code) of every rallyd that exited on its own and was started again
    restarted_on_failure: list[tuple[float, str, int]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def keys(self) -> ClusterKeys:
        return ClusterKeys(self.cluster)

    def names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def start(self) -> Deployment:
        self.root.mkdir(parents=True, exist_ok=True)
        # compacted every minute, as a production etcd is: watches then meet compacted history
        members = [f"e{i}" for i in (1, 2, 3)]
        self.etcd = EtcdCluster(3, root=self.root / "etcd", compaction="1m",
                                hosts=[self.lab.address(m) for m in members] if self.lab else None,
                                prefixes=[self.lab.prefix(m) for m in members] if self.lab else None).start()
        self.client = EtcdClient(EtcdSettings(endpoints=self.etcd.endpoints, request_timeout=2.0, retry_deadline=30.0))
        make_model(self.root / "model", "tiny", seed=0, arch=self.arch)
        self._watch_plans()
        for name in self.names():
            self.start_node(name)
            if name == "n1":
                self.daemons[name].wait_log("became leader", timeout=30)
        threading.Thread(target=self._keep_daemons, name="chaos-systemd", daemon=True).start()
        return self

    def _keep_daemons(self) -> None:
        """Do what the unit file's ``Restart=on-failure`` / ``RestartSec=1s`` do in production: a
        rallyd that exits with an error of its own (it gave up joining while etcd was unreachable)
        is started again. Those the scenarios kill (a signal) or stop stay down until restored."""
        while not self._stopping.wait(0.5):
            for name in self.names():
                d = self.daemons.get(name)
                code = d.proc.poll() if d is not None and d.proc is not None else None
                if code is None or code <= 0:
                    continue
                time.sleep(1.0)  # deliberate: RestartSec=1s
                with self._lock:
                    if self._stopping.is_set() or self.daemons.get(name) is not d:
                        continue  # restored meanwhile, or the deployment is stopping
                    self.restarted_on_failure.append((time.time(), name, code))
                    self._start_node(name)

    def model_of(self, node: str) -> Path:
        path = self.root / node / "model"
        if not path.exists():
            shutil.copytree(self.root / "model", path)
        return path

    def start_node(self, name: str) -> DaemonProcess:
        """Start (or restart) node ``name``'s rallyd; its log is appended to."""
        with self._lock:
            return self._start_node(name)

    def _start_node(self, name: str) -> DaemonProcess:
        slots = ["--gpus", "1", "--worker-dtype", "float32"] if self.gpus else ["--cpu-ranks", "1"]
        args = daemon_args(self.etcd.endpoints, self.cluster, "--tp", str(self.tp), *slots,
                           "--state-dir", str(self.root / name), "--worker-model", str(self.model_of(name)),
                           "--worker-restart-budget", "2", "--worker-restart-window", "20",
                           *(("--ep", "dp", "--expert-copies", "2") if self.ep == "dp" else ()),
                           *(("--prefill-replicas", "1", "--worker-disaggregate-tokens", "8") if self.pd else ()),
                           *self.extra)
        for stale in ("gateway.url", "metrics.url"):
            (self.root / name / stale).unlink(missing_ok=True)
        env = {"CUDA_VISIBLE_DEVICES": str((int(name[1:]) - 1) % self.gpus)} if self.gpus else {}
        prefix: tuple[str, ...] = ()
        if self.lab is not None:  # reachable at its namespace's address; gloo on its one interface
            address = self.lab.address(name)
            args += ["--address", address, "--worker-api-host", address]
            env["GLOO_SOCKET_IFNAME"] = "eth0"
            prefix = tuple(self.lab.prefix(name))
        d = DaemonProcess(name, args, self.root / f"{name}.log", env=env, prefix=prefix).start()
        self.daemons[name] = d
        return d

    def room_without_a_node(self) -> bool:
        """Whether a replica still fits when one node is gone (else a node fault waits for it to return)."""
        return sum(self.alive(n) for n in self.daemons) - 1 >= self.tp

    def alive(self, name: str) -> bool:
        d = self.daemons.get(name)
        return d is not None and d.proc is not None and d.proc.poll() is None

    def gateways(self) -> list[str]:
        urls = []
        for name in self.names():
            f = self.root / name / "gateway.url"
            if f.exists() and f.read_text().strip():
                urls.append(f.read_text().strip())
        return urls

    def _watch_plans(self) -> None:
        _, rev = self.client.get_prefix(self.keys.plans)
        watch = self.client.watch_prefix(self.keys.plans, rev + 1)

        def loop() -> None:
            while (e := watch.get()) is not None:
                if e.kind == "put":
                    self.plan_writes.append(PlanWrite(e.key, e.value, getattr(e, "revision", 0)))

        threading.Thread(target=loop, name="chaos-plans", daemon=True).start()
        self._plan_watch = watch

    # -- what the cluster says ------------------------------------------------------------------

    def latest_plan(self) -> Plan | None:
        try:
            kvs, _ = self.client.get_prefix(self.keys.plans)
        except RallypointError:
            return None
        return Plan.from_json(kvs[-1].key, kvs[-1].value) if kvs else None

    def statuses(self) -> dict[str, dict]:
        kvs, _ = self.client.get_prefix(self.keys.node_status)
        return {kv.key.rsplit("/", 1)[-1]: json.loads(kv.value) for kv in kvs}

    def rank_pids(self) -> dict[int, tuple[str, int]]:
        """rank -> (node, pid) of the newest plan, from the daemons' own views of their workers."""
        plan = self.latest_plan()
        out = {}
        for node, st in self.statuses().items():
            for w in st.get("workers", []):
                if plan is not None and w.get("rank") is not None and st.get("gen") == plan.gen:
                    out[int(w["rank"])] = (node, int(w["pid"]))
        return out

    def serving(self) -> bool:
        """The newest plan's every rank serves it, the leader says serving, a gateway has a driver."""
        try:
            plan = self.latest_plan()
            kv = self.client.get(self.keys.recovery)
            phase = json.loads(kv.value)["phase"] if kv else "serving"
            statuses = self.statuses()
        except (RallypointError, ValueError):
            return False
        if plan is None or phase != "serving":
            return False
        states = {}
        for st in statuses.values():
            for w in st.get("workers", []):
                if w.get("rank") is not None:
                    states[int(w["rank"])] = (w.get("state"), w.get("gen"))
        return all(states.get(s.rank) == ("serving", plan.gen) for s in plan.ranks)

    def wait_serving(self, timeout: float = 90.0, after_gen: int = 0) -> float | None:
        """Block until serving (a generation newer than ``after_gen``); the time it was, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            plan = self.latest_plan()
            if plan is not None and plan.gen > after_gen and self.serving():
                return time.time()
            time.sleep(0.1)
        return None

    def events(self) -> list[Event]:
        return read_events(self.client, self.keys)

    def processes(self) -> list[psutil.Process]:
        """Every process of this deployment's cluster (daemons, workers, spares)."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            info = describe(cmd)
            if (info is not None and info.cluster == self.cluster) or (
                    "rallypoint" in cmd and f"--cluster {self.cluster} " in cmd + " "):
                out.append(p)
        return out

    def stop(self) -> None:
        self._stopping.set()
        for d in self.daemons.values():
            d.stop()
        if getattr(self, "_plan_watch", None) is not None:
            self._plan_watch.close()
            self._plan_watch.events.put(None)
        if self.client is not None:
            self.client.close()
        if self.etcd is not None:
            self.etcd.stop()
        for p in self.processes():  # anything the daemons left behind
            p.kill()
