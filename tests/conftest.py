"""Shared fixtures: a real etcd (one per session, a fresh cluster name per test) and clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary

needs_etcd = pytest.mark.skipif(etcd_binary() is None, reason=INSTALL_HINT)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdCluster]:
    """One real single-member etcd for the whole session; tests isolate by cluster name."""
    if etcd_binary() is None:
        pytest.skip(INSTALL_HINT)
    cluster = EtcdCluster(1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """A fresh real 3-member etcd cluster, for tests that kill members."""
    if etcd_binary() is None:
        pytest.skip(INSTALL_HINT)
    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_name() -> str:
    """A cluster name no other test uses, so tests can share one etcd."""
    return "t" + uuid.uuid4().hex[:10]


def make_client(endpoints: tuple[str, ...], **kw: float) -> EtcdClient:
    settings = EtcdSettings(endpoints=endpoints, request_timeout=kw.pop("request_timeout", 1.0),
                            retry_deadline=kw.pop("retry_deadline", 5.0), **kw)
    return EtcdClient(settings)


@pytest.fixture
def client(etcd: EtcdCluster) -> Iterator[EtcdClient]:
    c = make_client(etcd.endpoints)
    yield c
    c.close()
