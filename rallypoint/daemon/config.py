"""rallyd's configuration: a TOML file, then ``RALLYPOINT_*`` environment variables, then flags.

Precedence is flag > environment > file > default. Each value is type-checked as it is read, and
each error names its source (file, variable or flag) and key, e.g.
``/etc/rallypoint/rallyd.toml: [layout] tp: expected an integer, got "two"``. Durations are given
in seconds and held as ``timedelta``; timing invariants are checked once, at load (Patroni style).
Variables are ``RALLYPOINT_<SECTION>_<KEY>`` (``RALLYPOINT_LAYOUT_TP=2``), or ``RALLYPOINT_<KEY>``
for top-level keys (``RALLYPOINT_CLUSTER``); lists are comma-separated.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from rallypoint.errors import ConfigError
from rallypoint.rendezvous.etcd import EtcdSettings

DEFAULT_PATH = Path("/etc/rallypoint/rallyd.toml")  # may be missing, unlike a file that is named
ENV_PREFIX = "RALLYPOINT_"
_NOT_CONFIG_ENV = frozenset({"RALLYPOINT_CONFIG", "RALLYPOINT_ETCD_BIN"})
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ENDPOINT = re.compile(r"(https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}/?")
_INT = re.compile(r"\s*[-+]?[0-9]+\s*")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}
_METAVAR = {"endpoints": "HOST:PORT,...", "seconds": "SECONDS", "int": "N"}
_EXPECTED = {"int": "an integer", "float": "a number", "seconds": "a number of seconds",
             "bool": 'true, false or "auto"', "endpoints": "a list of host:port strings"}


def _opt(default: Any, kind: str, *, gt: float | None = None, ge: float | None = None,
         choices: tuple[str, ...] = (), factory: Any = None, repr: bool = True) -> Any:
    meta = {"kind": kind, "gt": gt, "ge": ge, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def _secs(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


@functools.lru_cache(maxsize=1)
def detect_gpus() -> int:
    """Count this node's CUDA devices (imports torch, which takes seconds; cached)."""
    import torch  # deferred on purpose: reading a config must not pay for torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class EtcdConfig:
    """``[etcd]``: how rallyd reaches the control plane.

    Attributes:
        endpoints: ``host:port`` or ``http(s)://host:port`` entries.
        request_timeout: one RPC's deadline.
        retry_deadline: how long rallyd retries an unreachable etcd at start before exiting non-zero.
        endpoint_retry: how long a failed endpoint is skipped before it is tried again.
        keepalive: gRPC keepalive ping interval (etcd refuses pings more often than 5 s).
        ca_cert, cert_key, cert_cert: TLS files, which must exist; key and cert go together.
        user, password: etcd authentication, both or neither.
    """

    endpoints: tuple[str, ...] = _opt(("127.0.0.1:2379",), "endpoints")
    request_timeout: timedelta = _opt(_secs(2.0), "seconds", gt=0)
    retry_deadline: timedelta = _opt(_secs(10.0), "seconds", gt=0)
    endpoint_retry: timedelta = _opt(_secs(0.5), "seconds", gt=0)
    keepalive: timedelta = _opt(_secs(5.0), "seconds", gt=0)
    ca_cert: str | None = _opt(None, "file")
    cert_key: str | None = _opt(None, "file")
    cert_cert: str | None = _opt(None, "file")
    user: str | None = _opt(None, "str")
    password: str | None = _opt(None, "str", repr=False)

    def to_settings(self) -> EtcdSettings:
        """Return the ``EtcdSettings`` that ``EtcdClient`` takes (durations as float seconds)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        settings: dict[str, Any] = {k: v.total_seconds() if isinstance(v, timedelta) else v for k, v in values.items()}
        return EtcdSettings(**settings)


@dataclass(frozen=True)
class RendezvousConfig:
    """``[rendezvous]``: membership leases and how a generation is formed.

    Attributes:
        lease_ttl: membership lease TTL; a silent node is gone after this long.
        last_call: how long the leader waits for late joiners once ``min_nodes`` are present.
        min_nodes: nodes needed before a plan is written.
        max_nodes: most nodes admitted to a generation; 0 means unlimited.
        heartbeat: the loop's period; ``lease_ttl / 3`` when not given.
        keep_generations: generations of history the leader keeps in etcd before the newest
            released one (plans, releases, orders, events, group stores); older ones are deleted
            (``recovery.retention``), so etcd's key count levels off instead of growing with
            every recovery. ``rallyctl plan``/``events`` see this far back.
    """

    lease_ttl: timedelta = _opt(_secs(3.0), "seconds", gt=0)
    last_call: timedelta = _opt(_secs(0.5), "seconds", ge=0)
    min_nodes: int = _opt(1, "int", ge=1)
    max_nodes: int = _opt(0, "int", ge=0)
    heartbeat: timedelta = _opt(None, "seconds", gt=0)  # None until __post_init__ fills it in
    keep_generations: int = _opt(100, "int", ge=1)

    def __post_init__(self) -> None:
        if self.heartbeat is None:
            object.__setattr__(self, "heartbeat", self.lease_ttl / 3)


@dataclass(frozen=True)
class LayoutConfig:
    """``[layout]``: the parallel layout and this node's rank slots.

    Attributes:
        tp, pp: tensor- and pipeline-parallel sizes; a replica has ``tp * pp`` ranks.
        dp: replicas; 0 means as many as the GPUs allow.
        ep: where a mixture of experts' experts live: ``tp``, over each replica's TP ranks (EP =
            TP); ``dp``, over every replica (EP = DP: each rank a whole replica with its share of
            the experts, the replicas stepping together; needs ``tp = 1`` and ``pp = 1``). A
            dense model ignores it.
        expert_copies: with ``ep = "dp"``, how many ranks hold each expert: with 2 or more a
            shrink serves on from the copies without loading anything.
        prefill_replicas: disaggregated serving (needs ``tp = 1`` and ``pp = 1``): this many
            replicas prefill the long prompts (``[worker] disaggregate_tokens``) and send their KV
            cache to the others, which decode them; while only one replica is up it serves whole
            requests. 0: every replica serves whole requests.
        gpus: GPUs on this node; -1 detects them when needed, 0 makes this a CPU node.
        cpu_ranks: rank slots on a CPU-only node.
        spares: warm spare processes kept on this node.
    """

    tp: int = _opt(1, "int", ge=1)
    pp: int = _opt(1, "int", ge=1)
    dp: int = _opt(0, "int", ge=0)
    ep: str = _opt("tp", "choice", choices=("tp", "dp"))
    expert_copies: int = _opt(1, "int", ge=1)
    prefill_replicas: int = _opt(0, "int", ge=0)
    gpus: int = _opt(-1, "int", ge=-1)
    cpu_ranks: int = _opt(2, "int", ge=1)
    spares: int = _opt(0, "int", ge=0)

    @property
    def replica_size(self) -> int:
        """Ranks in one replica: ``tp * pp``."""
        return self.tp * self.pp

    def node_gpus(self) -> int:
        """GPUs on this node: ``gpus``, or ``detect_gpus()`` when it is -1."""
        return detect_gpus() if self.gpus == -1 else self.gpus

    def node_slots(self) -> int:
        """Rank slots on this node: its GPUs, or ``cpu_ranks`` on a CPU node."""
        return self.node_gpus() or self.cpu_ranks


@dataclass(frozen=True)
class CollectivesConfig:
    """``[collectives]``: a collective's deadline is ``max(deadline_floor, deadline_k * typical)``.

    The backend is not a setting: it follows the device (NCCL on GPUs, gloo on CPU), since gloo
    cannot send, receive or all-gather CUDA tensors and NCCL has no CPU path.

    Attributes:
        deadline_floor: the shortest deadline any collective gets.
        deadline_k: the multiple of a collective's typical duration it may take.
        build_timeout: how long a group build waits for its members; past it the worker asks
            for the next plan (a build still blocked in NCCL's init 10 s later ends the process).
    """

    deadline_floor: timedelta = _opt(_secs(1.0), "seconds", gt=0)
    deadline_k: float = _opt(20.0, "float", gt=0)
    build_timeout: timedelta = _opt(_secs(30.0), "seconds", gt=0)


GPU_KV_DEFAULT = (0, 0)  # [worker] max_batch, max_seq unset on a GPU node: sized from its memory
CPU_KV_DEFAULT = (8, 512)  # and on a CPU node: small, a demo's or a test's


@dataclass(frozen=True)
class WorkerConfig:
    """``[worker]``: the rank processes rallyd starts for the seats a plan gives this node.

    Attributes:
        model: checkpoint directory (Hugging Face layout); unset: rendezvous only, no workers.
        workload: ``serve`` the model; or ``allreduce-probe``: no model, every replica all-reduces
            on its TP group in a loop (fabric burn-in, and recovery timed without model loading).
        dtype: weights' dtype; ``auto`` is bfloat16 on GPUs, float32 on CPU.
        max_batch: KV-cache rows per replica (requests decoded together); 0: as many as fit in
            ``kv_memory_fraction`` of the memory left after the weights (at most 256). Unset: 0
            on GPU nodes, 8 on CPU nodes.
        max_seq: positions per row (prompt + completion); 0: the model's context (at most 8192).
            Unset: 0 on GPU nodes, 512 on CPU nodes.
        kv_memory_fraction: the share of free memory ``max_batch = 0`` fills with the KV cache
            (the rest is for activations and CUDA graphs).
        stream_interval: after a streamed chunk a driver waits this long before the next, so the
            tokens of several steps go out in one chunk (fewer chunks through the HTTP path when
            many streams run); 0 sends every step's tokens at once. The first token is never held.
        max_chunk_rate: streamed chunks per second a replica's API aims to stay under: with ``n``
            streams open each waits ``n / max_chunk_rate`` after a chunk (its next chunk carries
            the tokens of the steps made meanwhile). Light load is never held; 0 turns it off.
        prefill_tokens: the most prompt positions one prefill step computes; a longer prompt
            fills in chunks, with decode steps of the running requests between them.
        cuda_graphs: replay decode steps as CUDA graphs (on GPUs, for replicas of one rank: TP=1,
            PP=1); a graph is captured the first time a batch size and KV length bucket are seen.
        compile: with ``cuda_graphs``, run decode layers through ``torch.compile`` (a layer's small
            ops fused into a few kernels: fewer kernels per step). It compiles when the shard
            loads (seconds from torch's on-disk cache, tens of seconds the first time on a machine).
        overlap: for replicas of one rank (TP=1, PP=1), launch the next decode step before the
            host reads the tokens of the one running, so scheduling, commits and streaming run
            while the device computes (same tokens; a step still commits only once the next one
            has finished).
        queue_capacity: requests a replica's driver holds (running and waiting); past it, 503 with
            ``Retry-After`` (the gateway waits and retries them).
        api_host, api_port: where a replica's driver serves HTTP; port 0 picks a free one.
        restart_budget: worker restarts allowed per ``restart_window``; past it the seat is left
            down (degraded) instead of restarting in a loop.
        restart_window: the window of ``restart_budget``; a seat left down for it is tried again
            after one window.
        drain_timeout: on SIGTERM, how long this node's replicas get to finish the requests in
            flight before it leaves anyway (keep under systemd's ``TimeoutStopSec``).
        stall_timeout: a seat's worker that sends no heartbeat (every 0.5 s) for this long is
            frozen (stopped, stuck in the kernel, its interpreter wedged) and is replaced, even
            when no collective of its peers is waiting on it; 0 turns the check off.
        disaggregate_tokens: with ``[layout] prefill_replicas``, a decode replica has prompts of
            at least this many tokens prefilled on a prefill replica (their KV cache sent over);
            shorter ones, and requests resumed after a failure, it prefills itself.
        standby: keep one standby interpreter (torch and the worker's modules imported, the CUDA
            driver initialised, no seat) that the next worker rallyd starts runs in, so a cold
            restart skips the seconds of Python and torch start-up. It costs one idle process
            (a few hundred MB of host memory, no CUDA context); off: every worker starts afresh.
    """

    model: str | None = _opt(None, "str")
    workload: str = _opt("serve", "choice", choices=("serve", "allreduce-probe"))
    dtype: str = _opt("auto", "choice", choices=("auto", "float32", "bfloat16", "float16"))
    max_batch: int | None = _opt(None, "int", ge=0)  # None: by device (kv_size)
    max_seq: int | None = _opt(None, "int", ge=0)
    kv_memory_fraction: float = _opt(0.8, "float", gt=0)
    queue_capacity: int = _opt(1024, "int", ge=1)
    cuda_graphs: bool = _opt(True, "bool")
    compile: bool = _opt(True, "bool")
    overlap: bool = _opt(True, "bool")
    prefill_tokens: int = _opt(4096, "int", ge=1)
    disaggregate_tokens: int = _opt(256, "int", ge=1)
    stream_interval: timedelta = _opt(_secs(0.0), "seconds", ge=0)
    max_chunk_rate: float = _opt(0.0, "float", ge=0)
    api_host: str = _opt("127.0.0.1", "str")
    api_port: int = _opt(0, "int", ge=0)
    restart_budget: int = _opt(5, "int", ge=0)
    restart_window: timedelta = _opt(_secs(60.0), "seconds", gt=0)
    drain_timeout: timedelta = _opt(_secs(30.0), "seconds", ge=0)
    stall_timeout: timedelta = _opt(_secs(3.0), "seconds", ge=0)
    standby: bool = _opt(True, "bool")

    def kv_size(self, gpu: bool) -> tuple[int, int]:
        """(max_batch, max_seq) for a node with or without GPUs: as set, else the device's default."""
        default = GPU_KV_DEFAULT if gpu else CPU_KV_DEFAULT
        return (self.max_batch if self.max_batch is not None else default[0],
                self.max_seq if self.max_seq is not None else default[1])


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: rallyd's Prometheus endpoint, ``http://<host>:<port>/metrics``.

    Attributes:
        enabled: serve it at all.
        host: the address to listen on (all interfaces by default, so Prometheus can scrape).
        port: the TCP port; 0 picks a free one (tests, several daemons on one host), written to
            ``<state_dir>/metrics.url`` and to the node's status in etcd.
    """

    enabled: bool = _opt(True, "bool")
    host: str = _opt("0.0.0.0", "str")
    port: int = _opt(9437, "int", ge=0)


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: rallyd's completions API, ``http://<host>:<port>/v1/completions``.

    Clients send requests here rather than to a replica's driver: the gateway forwards each to a
    serving driver and, when that driver dies mid-request, resumes it on the next one.

    Attributes:
        enabled: serve it at all.
        host, port: where it listens; port 0 picks a free one (written to ``<state_dir>/gateway.url``).
        resume_timeout: how long a request may go without a token while the gateway looks for a
            serving driver (a recovery, a cold start) before it fails with 503.
        api_key: when set, clients must send ``Authorization: Bearer <api_key>`` on every route but
            ``/health``; the replicas' own APIs require it too. Prefer the environment
            (``RALLYPOINT_GATEWAY_API_KEY``) to a flag, which ``ps`` shows.
        processes: how many processes serve the gateway's port (``gateway.child``); 0 serves it
            on a thread of rallyd. Unset: one per 4 cores, at most 4, on nodes of 8 cores or more
            (a burst of a few hundred streams is more Python than one core turns around in time);
            a thread on smaller nodes.
        accept: how the processes share the port: ``shared`` (the default), one socket whose
            connections the first free process accepts, so a busy process takes none;
            ``reuseport``, a socket each (``SO_REUSEPORT``: the kernel spreads connections evenly
            over the processes, whether they are busy or not). Side by side on one H200 node, 256
            streams, 8 rounds each: the same median, but a shared socket's slowest round was
            26,300 tok/s against 24,500 with ``reuseport`` (bench/RESULTS.md).
    """

    enabled: bool = _opt(True, "bool")
    host: str = _opt("0.0.0.0", "str")
    port: int = _opt(8437, "int", ge=0)
    resume_timeout: timedelta = _opt(_secs(120.0), "seconds", gt=0)
    api_key: str | None = _opt(None, "str", repr=False)
    processes: int | None = _opt(None, "int", ge=0)
    accept: str = _opt("shared", "choice", choices=("reuseport", "shared"))

    def process_count(self, cpus: int | None) -> int:
        """Gateway processes for a node with ``cpus`` cores: as set, else by the node's size."""
        if self.processes is not None:
            return self.processes
        cpus = cpus or 1
        return 0 if cpus < 8 else min(4, cpus // 4)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: ``level`` (debug, info, warning, error); ``json`` None picks by terminal."""

    level: str = _opt("info", "choice", choices=("debug", "info", "warning", "error"))
    json: bool | None = _opt(None, "bool")


@dataclass(frozen=True)
class Config:
    """One rallyd's whole configuration, validated.

    Attributes:
        cluster: the cluster's name ([A-Za-z0-9_.-]), its etcd prefix.
        node: this node's id (same characters); the short hostname by default.
        address: the address peers use to reach this node.
        state_dir: where rallyd keeps local state.
        path: the file that was read, or None when none was.
    """

    cluster: str = _opt("default", "name")
    node: str = _opt(None, "name", factory=_short_hostname)
    address: str = _opt("127.0.0.1", "str")
    state_dir: Path = _opt(Path("/var/lib/rallypoint"), "path")
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    collectives: CollectivesConfig = field(default_factory=CollectivesConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    log: LogConfig = field(default_factory=LogConfig)
    path: Path | None = None


_SECTIONS: dict[str, type] = {"etcd": EtcdConfig, "rendezvous": RendezvousConfig,
                              "layout": LayoutConfig, "collectives": CollectivesConfig,
                              "worker": WorkerConfig, "metrics": MetricsConfig,
                              "gateway": GatewayConfig, "log": LogConfig}
_Item = tuple[str, str, Any, str, bool]  # section ("" = top level), key, raw, source, raw is text


class _Invalid(Exception):
    """A value that does not fit its key; the message still lacks the source and key."""


def _schema(section: str) -> dict[str, Any]:
    return {f.name: f for f in fields(_SECTIONS.get(section, Config)) if "kind" in f.metadata}


def _label(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper() if section else f"{ENV_PREFIX}{key}".upper()


def _hint(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _show(value: Any) -> str:
    try:
        return "a table" if isinstance(value, dict) else json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _native(kind: str, raw: Any, text: bool) -> Any:
    """Turn a TOML value, or text from a variable or flag, into a value of the key's type."""
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if kind == "int" and (_INT.fullmatch(raw) if text else number and isinstance(raw, int)):
        return int(raw)
    if kind in ("float", "seconds") and (text or number):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return value
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        word = raw.strip().lower() if isinstance(raw, str) else None
        if word is not None and (word == "auto" or (text and word in _BOOL_WORDS)):
            return _BOOL_WORDS.get(word)  # "auto" -> None
    if kind == "endpoints":
        items = raw.split(",") if isinstance(raw, str) else raw
        if isinstance(items, list) and all(isinstance(e, str) for e in items):
            return tuple(e.strip() for e in items if e.strip())
    if kind in ("str", "name", "path", "file", "choice") and isinstance(raw, str):
        return raw
    raise _Invalid(f"expected {_EXPECTED.get(kind, 'a string')}, got {_show(raw)}")


def _validated(meta: Mapping[str, Any], value: Any) -> Any:
    kind, gt, ge, choices = meta["kind"], meta["gt"], meta["ge"], meta["choices"]
    if gt is not None and not value > gt:
        raise _Invalid(f"must be > {gt}, got {_show(value)}")
    if ge is not None and not value >= ge:
        raise _Invalid(f"must be >= {ge}, got {_show(value)}")
    if isinstance(value, str) and not value.strip():
        raise _Invalid("must not be empty")
    if kind == "name" and not _NAME.fullmatch(value):
        raise _Invalid(f"expected only letters, digits, '_', '.' and '-', got {_show(value)}")
    if kind == "choice" and value.lower() not in choices:
        raise _Invalid(f"expected one of {', '.join(choices)}, got {_show(value)}")
    if kind == "file" and not Path(value).is_file():
        raise _Invalid(f"file not found: {value}")
    if kind == "endpoints" and not value:
        raise _Invalid("needs at least one endpoint")
    for endpoint in value if kind == "endpoints" else ():
        if not _ENDPOINT.fullmatch(endpoint):
            raise _Invalid(f"bad endpoint {_show(endpoint)}, expected host:port or "
                           "http(s)://host:port")
    converters: dict[str, Callable[[Any], Any]] = {"seconds": _secs, "path": Path, "choice": str.lower}
    return converters.get(kind, lambda v: v)(value)


def _coerce(item: _Item) -> Any:
    section, key, raw, source, text = item
    meta = _schema(section)[key].metadata
    try:
        return _validated(meta, _native(meta["kind"], raw, text))
    except _Invalid as exc:
        raise ConfigError(f"{source}: {_label(section, key)}: {exc}") from None


def _known(source: str, section: str, key: str) -> None:
    if key not in _schema(section):
        raise ConfigError(f"{source}: unknown key {_label(section, key)}"
                          f"{_hint(key, _schema(section))}")


def _file_items(path: Path, required: bool) -> list[_Item] | None:
    """The file's values, or None when an optional file is missing."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    src, items = str(path), []
    for name, value in data.items():
        if name in _SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{src}: [{name}] must be a table, got {_show(value)}")
        if name not in _SECTIONS and name not in _schema("") and isinstance(value, dict):
            hint = _hint(f"[{name}]", [f"[{s}]" for s in _SECTIONS])
            raise ConfigError(f"{src}: unknown section [{name}]{hint}")
        table = value if name in _SECTIONS else {name: value}
        section = name if name in _SECTIONS else ""
        for key, raw in table.items():
            _known(src, section, key)
            items.append((section, key, raw, src, False))
    return items


def _env_items(env: Mapping[str, str]) -> list[_Item]:
    """Set variables' values; a misspelt variable under a section's prefix is an error."""
    known = {_env_name(s, k): (s, k) for s in ("", *_SECTIONS) for k in _schema(s)}
    for var in env:
        section = next((s for s in _SECTIONS if var.startswith(_env_name(s, ""))), None)
        if section and var not in known and var not in _NOT_CONFIG_ENV:
            key = var[len(_env_name(section, "")):].lower()
            names = [_env_name(section, k) for k in _schema(section)]
            raise ConfigError(f"{var}: unknown key [{section}] {key}{_hint(var, names)}")
    return [(s, k, env[var], var, True) for var, (s, k) in known.items()
            if env.get(var, "").strip()]


def _flags() -> list[tuple[str, str, str]]:
    """(flag, section, key) for every key but secrets: ``--tp``, ``--node``, ``--etcd-endpoints``."""
    return [(f"--{k if s in ('', 'layout') else f'{s}_{k}'}".replace("_", "-"), s, k)
            for s in ("", *_SECTIONS) for k, f in _schema(s).items() if f.repr]


def _flag_items(args: argparse.Namespace | None) -> list[_Item]:
    given = [(s, k, getattr(args, flag[2:].replace("-", "_"), None), flag)
             for flag, s, k in _flags()]
    return [(s, k, v, flag, isinstance(v, str)) for s, k, v, flag in given if v is not None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per key (``--tp``, ``--etcd-endpoints``, ``--log-json``...).

    Layout and top-level keys are ``--<key>``, the others ``--<section>-<key>``; each flag defaults
    to None (not given). The etcd password has no flag: command lines are world-readable.

    Args:
        parser: the parser to extend; ``load_config`` reads the namespace it parses.
    """
    group = parser.add_argument_group("configuration (flag > RALLYPOINT_* env > file > default)")
    group.add_argument("--config", metavar="PATH",
                       help=f"config file (default {DEFAULT_PATH}, or $RALLYPOINT_CONFIG)")
    for flag, section, key in _flags():
        meta = _schema(section)[key].metadata
        help_text = f"{_label(section, key)}; env {_env_name(section, key)}"
        if meta["kind"] == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            metavar = "|".join(meta["choices"]) or _METAVAR.get(meta["kind"], meta["kind"].upper())
            group.add_argument(flag, metavar=metavar, help=help_text)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                args: argparse.Namespace | None = None, *, check_node: bool = True) -> Config:
    """Read, merge and validate the configuration.

    Args:
        path: the config file; ``--config`` in ``args`` wins over it, and ``$RALLYPOINT_CONFIG``
            is used when neither is given. A named file must exist; the default one may not.
        env: the environment (default ``os.environ``).
        args: a namespace from a parser that went through ``add_arguments``.
        check_node: check that a replica fits this node's rank slots. GPUs are detected (torch
            imported) only when ``gpus`` is -1 and ``tp * pp > 1``; rallyctl passes False.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the source (file, variable or flag) and key of the first bad value.
    """
    env = os.environ if env is None else env
    named = getattr(args, "config", None) or path or env.get("RALLYPOINT_CONFIG") or None
    file = Path(named) if named else DEFAULT_PATH
    from_file = _file_items(file, required=named is not None)
    values: dict[str, dict[str, Any]] = {s: {} for s in ("", *_SECTIONS)}
    origin = {"rendezvous.heartbeat": "default (lease_ttl / 3)"}
    for item in (from_file or []) + _env_items(env) + _flag_items(args):
        values[item[0]][item[1]] = _coerce(item)
        origin[f"{item[0]}.{item[1]}"] = item[3]
    sections = {s: cls(**values[s]) for s, cls in _SECTIONS.items()}
    config = Config(**values[""], **sections, path=None if from_file is None else file)
    _check(config, origin, check_node)
    return config


def _s(td: timedelta) -> str:
    return f"{td.total_seconds():g}s"


def _fail(what: str, origin: Mapping[str, str], *keys: str) -> None:
    sources = ", ".join(f"{k.split('.')[-1]} from {origin.get(k, 'default')}" for k in keys)
    raise ConfigError(f"{what}; {sources}")


def _check(c: Config, origin: Mapping[str, str], check_node: bool) -> None:
    """Rules across keys, and the timing invariants."""
    e, r, lay = c.etcd, c.rendezvous, c.layout
    if (e.user is None) != (e.password is None):
        _fail("[etcd] user and password must be given together", origin,
              "etcd.user", "etcd.password")
    if (e.cert_key is None) != (e.cert_cert is None):
        _fail("[etcd] cert_key and cert_cert must be given together", origin,
              "etcd.cert_key", "etcd.cert_cert")
    if e.ca_cert is None and (e.cert_key or any(x.startswith("https://") for x in e.endpoints)):
        _fail("[etcd] ca_cert is required for TLS (a client certificate or an https endpoint)",
              origin, "etcd.ca_cert", "etcd.cert_key", "etcd.endpoints")
    if r.max_nodes and r.min_nodes > r.max_nodes:
        _fail(f"[rendezvous] min_nodes = {r.min_nodes} > max_nodes = {r.max_nodes}", origin,
              "rendezvous.min_nodes", "rendezvous.max_nodes")
    ttl = r.lease_ttl
    for key, value, limit, bound in (("rendezvous.heartbeat", r.heartbeat, ttl / 2, " / 2"),
                                     ("etcd.request_timeout", e.request_timeout, ttl, ""),
                                     ("rendezvous.last_call", r.last_call, ttl, "")):
        if not value < limit:  # Patroni style: the lease must outlive a beat, an RPC, a wait
            section, name = key.split(".")
            _fail(f"[{section}] {name} = {_s(value)} must be < [rendezvous] lease_ttl{bound} = "
                  f"{_s(limit)}", origin, key, "rendezvous.lease_ttl")
    if lay.ep == "dp" and (lay.tp, lay.pp) != (1, 1):
        _fail(f"[layout] ep = \"dp\" spreads the experts over whole-model replicas: it needs tp = 1 and pp = 1, "
              f"got tp = {lay.tp}, pp = {lay.pp}", origin, "layout.ep", "layout.tp", "layout.pp")
    if lay.prefill_replicas and (lay.tp, lay.pp) != (1, 1):
        _fail(f"[layout] prefill_replicas moves KV between whole-model replicas: it needs tp = 1 and pp = 1, "
              f"got tp = {lay.tp}, pp = {lay.pp}", origin, "layout.prefill_replicas", "layout.tp", "layout.pp")
    if lay.prefill_replicas and lay.ep == "dp":
        _fail("[layout] prefill_replicas and ep = \"dp\" do not go together yet (replicas that share their "
              "experts step together; a prefill replica's transfers would hold them all)", origin,
              "layout.prefill_replicas", "layout.ep")
    if c.worker.max_seq is not None and 0 < c.worker.max_seq < 16:
        _fail(f"[worker] max_seq = {c.worker.max_seq} is too short (16 at least, or 0: the model's context)",
              origin, "worker.max_seq")
    if not c.worker.kv_memory_fraction < 1:
        _fail(f"[worker] kv_memory_fraction = {c.worker.kv_memory_fraction} must be < 1", origin,
              "worker.kv_memory_fraction")
    for key, port in (("worker.api_port", c.worker.api_port), ("metrics.port", c.metrics.port),
                      ("gateway.port", c.gateway.port)):
        if port > 65535:
            section, name = key.split(".")
            _fail(f"[{section}] {name} = {port} is not a TCP port (0..65535)", origin, key)
    if check_node and lay.replica_size > 1:
        gpus = lay.node_gpus()
        slots, what = (gpus, "GPUs") if gpus else (lay.cpu_ranks, "CPU rank slots")
        if lay.replica_size % slots and slots % lay.replica_size:
            found = " (detected)" if lay.gpus == -1 and gpus else ""
            _fail(f"[layout] tp*pp = {lay.replica_size} does not divide this node's {slots} "
                  f"{what}{found} (and is not a multiple of it)", origin, "layout.tp",
                  "layout.pp", "layout.gpus" if gpus else "layout.cpu_ranks")
