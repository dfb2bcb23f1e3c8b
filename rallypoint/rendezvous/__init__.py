"""Rendezvous through etcd: the client layer, membership under leases, leader election, one fenced
plan per generation, and the etcd-backed ``torch.distributed.Store`` that bootstraps every group."""
