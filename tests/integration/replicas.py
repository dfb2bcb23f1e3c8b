"""One rallyd serving one-rank CPU replicas, for the tests of layouts that span replicas (experts
shared by every replica, disaggregated prefill and decode): starting it, the single-process
reference tokens, and a seat SIGKILLed while streams run, checked against the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import torch

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.sampling import generate
from rallypoint.worker.shards import load_stage
from tests.integration.test_rallyd_recovery import plans, seat_pid
from tests.integration.test_rallyd_serving import start_streams


def greedy_reference(model: Path, prompts: Sequence[list[int]], tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens from the whole model in this process."""
    torch.set_num_threads(1)
    stage = load_stage(model, dtype=torch.float32)
    return [generate(stage, torch.tensor([p]), tokens)[0][0].tolist() for p in prompts]


def check(got: list[int], ref: list[int]) -> None:
    """A completion is the reference's tokens (it may stop early at the model's EOS)."""
    assert got and got == ref[:len(got)], (got, ref)


def start_replicas(etcd: EtcdCluster, cluster: str, tmp_path: Path, model: Path, replicas: int, *flags: str,
                   env: dict[str, str] | None = None) -> tuple[DaemonProcess, str]:
    """Node ``a`` with ``replicas`` one-rank replicas (``flags`` say how they relate); returns the
    daemon and its gateway's URL once every replica's API listens."""
    args = daemon_args(etcd.endpoints, cluster, "--tp", "1", "--dp", str(replicas), "--cpu-ranks", str(replicas),
                       "--state-dir", str(tmp_path / "a"), "--worker-model", str(model), *flags)
    daemon = DaemonProcess("a", args, tmp_path / "a.log", env=env or {}).start()
    try:
        for i in range(replicas):
            wait_file(tmp_path / "a" / f"api-{i}.url", timeout=90)
        return daemon, wait_file(tmp_path / "a" / "gateway.url").strip()
    except BaseException:
        daemon.stop()
        raise


def kill_while_streaming(daemon: DaemonProcess, gateway: str, bodies: list[dict], reference: list[list[int]],
                         victim: Callable[[], int]) -> int:
    """Stream ``bodies`` through ``gateway``, SIGKILL the worker of seat ``victim()`` (asked once
    every stream has its first token) while all are in flight, and check each finished with its
    reference tokens. Returns the seat killed."""
    streams = start_streams(gateway, bodies)
    seat = victim()
    streams.assert_in_flight()
    psutil.Process(seat_pid(daemon, seat)).kill()
    got = streams.join()
    for i, ref in enumerate(reference):
        check(got[i], ref)
    return seat


def plan_of(client: EtcdClient, keys: ClusterKeys, gen: int) -> Plan:
    """Generation ``gen``'s plan, once it is written."""
    return wait_for(f"generation {gen}", lambda: [p for p in plans(client, keys) if p.gen == gen])[0]
