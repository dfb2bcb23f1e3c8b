"""The tests' etcd cluster comes up whole or not at all: a member whose port was taken between
``free_port`` and its bind does not leave a two-member cluster that passes for healthy."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rallypoint.testing.etcd_server import EtcdCluster, etcd_binary


@pytest.mark.skipif(etcd_binary() is None, reason="needs the etcd binary")
def test_a_member_whose_port_was_taken_makes_the_cluster_start_again_on_fresh_ports(tmp_path: Path) -> None:
    cluster = EtcdCluster(3, root=tmp_path / "etcd")
    taken = cluster.members[2].client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start()
        try:
            assert all(m.alive() for m in cluster.members)
            assert cluster.members[2].client_port != taken
            cluster.wait_healthy(5, cluster.members)  # every member answers, the moved one included
        finally:
            cluster.stop()
