"""rallypoint: keeps a distributed inference deployment serving through rank, node and etcd failures."""

__version__ = "0.1.0"
