"""rallyd's configuration: a TOML file, then ``RALLYPOINT_*`` environment variables, then flags.

Precedence is flag > environment > file > default. Every value is type-checked as it is read, and
every error names its source (file path, variable or flag) and its key, e.g.
``/etc/rallypoint/rallyd.toml: [layout] tp: expected an integer, got "two"``. Durations are written
in seconds everywhere and held as ``timedelta``. Timing invariants across sections are checked once,
at load (Patroni style), so the daemon never starts with a lease it cannot keep alive.

Environment names are ``RALLYPOINT_<SECTION>_<KEY>`` (``RALLYPOINT_LAYOUT_TP=2``) and
``RALLYPOINT_<KEY>`` for top-level keys (``RALLYPOINT_CLUSTER``); lists are comma-separated.
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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from rallypoint.errors import ConfigError
from rallypoint.rendezvous.etcd import EtcdSettings

DEFAULT_PATH = Path("/etc/rallypoint/rallyd.toml")
"""Read when no file is named; unlike a named file, it may be missing (then defaults apply)."""
ENV_PREFIX = "RALLYPOINT_"
_NOT_CONFIG_ENV = frozenset({"RALLYPOINT_CONFIG", "RALLYPOINT_ETCD_BIN"})
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ENDPOINT = re.compile(r"(https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}/?")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_EXPECTED = {
    "int": "an integer", "float": "a number", "seconds": "a number of seconds",
    "str": "a string", "file": "a file path", "path": "a path", "name": "a name",
    "bool": 'true, false or "auto"', "endpoints": "a list of host:port strings",
}


def _opt(default: Any, kind: str, *, gt: float | None = None, ge: float | None = None,
         choices: tuple[str, ...] = (), factory: Any = None, repr: bool = True) -> Any:
    meta = {"kind": kind, "gt": gt, "ge": ge, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def _secs(value: float) -> timedelta:
    return timedelta(seconds=value)


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


@functools.lru_cache(maxsize=1)
def detect_gpus() -> int:
    """Count this node's CUDA devices; imports torch (seconds), so it runs only when needed."""
    import torch  # deferred on purpose: loading a config must not pay for torch

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
        ca_cert, cert_key, cert_cert: TLS files (the CA file must exist; key and cert go together).
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
        """Return the ``EtcdSettings`` that ``EtcdClient`` takes (durations in float seconds)."""
        return EtcdSettings(
            endpoints=self.endpoints,
            request_timeout=self.request_timeout.total_seconds(),
            retry_deadline=self.retry_deadline.total_seconds(),
            endpoint_retry=self.endpoint_retry.total_seconds(),
            keepalive=self.keepalive.total_seconds(),
            ca_cert=self.ca_cert, cert_key=self.cert_key, cert_cert=self.cert_cert,
            user=self.user, password=self.password,
        )


@dataclass(frozen=True)
class RendezvousConfig:
    """``[rendezvous]``: membership leases and how a generation is formed.

    Attributes:
        lease_ttl: membership lease TTL; a silent node is gone after this long.
        last_call: how long the leader waits for late joiners once ``min_nodes`` are present.
        min_nodes: nodes needed before a plan is written.
        max_nodes: most nodes admitted to a generation; 0 means unlimited.
        heartbeat: loop period; defaults to ``lease_ttl / 3``.
    """

    lease_ttl: timedelta = _opt(_secs(3.0), "seconds", gt=0)
    last_call: timedelta = _opt(_secs(0.5), "seconds", ge=0)
    min_nodes: int = _opt(1, "int", ge=1)
    max_nodes: int = _opt(0, "int", ge=0)
    heartbeat: timedelta = _opt(None, "seconds", gt=0)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.heartbeat is None:
            object.__setattr__(self, "heartbeat", self.lease_ttl / 3)


@dataclass(frozen=True)
class LayoutConfig:
    """``[layout]``: the parallel layout and this node's rank slots.

    Attributes:
        tp, pp: tensor- and pipeline-parallel sizes; a replica has ``tp * pp`` ranks.
        dp: replicas; 0 means as many as the GPUs allow.
        ep: expert-parallel size.
        gpus: GPUs on this node; -1 detects them (``detect_gpus``), 0 makes this a CPU node.
        cpu_ranks: rank slots on a CPU-only node.
        spares: warm spare processes kept on this node.
    """

    tp: int = _opt(1, "int", ge=1)
    pp: int = _opt(1, "int", ge=1)
    dp: int = _opt(0, "int", ge=0)
    ep: int = _opt(1, "int", ge=1)
    gpus: int = _opt(-1, "int", ge=-1)
    cpu_ranks: int = _opt(2, "int", ge=1)
    spares: int = _opt(0, "int", ge=0)

    @property
    def replica_size(self) -> int:
        """Ranks in one replica: ``tp * pp``."""
        return self.tp * self.pp

    def node_gpus(self) -> int:
        """GPUs on this node: ``gpus``, or the detected count when it is -1."""
        return detect_gpus() if self.gpus == -1 else self.gpus

    def node_slots(self) -> int:
        """Rank slots on this node: its GPUs, or ``cpu_ranks`` on a CPU node."""
        return self.node_gpus() or self.cpu_ranks


@dataclass(frozen=True)
class CollectivesConfig:
    """``[collectives]``: collective deadlines and backend.

    Attributes:
        deadline_floor: the shortest deadline any collective gets.
        deadline_k: a collective's deadline is ``max(floor, k * its typical duration)``.
        backend: ``auto`` (NCCL on GPUs, gloo on CPU), ``nccl`` or ``gloo``.
    """

    deadline_floor: timedelta = _opt(_secs(1.0), "seconds", gt=0)
    deadline_k: float = _opt(20.0, "float", gt=0)
    backend: str = _opt("auto", "choice", choices=("auto", "nccl", "gloo"))


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: ``level`` (debug, info, warning, error); ``json`` None picks by terminal."""

    level: str = _opt("info", "choice", choices=("debug", "info", "warning", "error"))
    json: bool | None = _opt(None, "bool")


@dataclass(frozen=True)
class Config:
    """The whole validated configuration of one ``rallyd``.

    Attributes:
        cluster: cluster name, the etcd key prefix ([A-Za-z0-9_.-]).
        node: this node's id (same charset); defaults to the short hostname.
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
    log: LogConfig = field(default_factory=LogConfig)
    path: Path | None = None


_SECTIONS: dict[str, type] = {"etcd": EtcdConfig, "rendezvous": RendezvousConfig,
                              "layout": LayoutConfig, "collectives": CollectivesConfig,
                              "log": LogConfig}
_FLAGS = (  # flag, section, key, help
    ("--cluster", "", "cluster", "cluster name"),
    ("--node", "", "node", "this node's id (default: short hostname)"),
    ("--address", "", "address", "address peers use to reach this node"),
    ("--state-dir", "", "state_dir", "local state directory"),
    ("--etcd-endpoints", "etcd", "endpoints", "comma-separated etcd endpoints"),
    ("--tp", "layout", "tp", "tensor-parallel size"),
    ("--pp", "layout", "pp", "pipeline-parallel size"),
    ("--dp", "layout", "dp", "replicas (0: as many as the GPUs allow)"),
    ("--ep", "layout", "ep", "expert-parallel size"),
    ("--gpus", "layout", "gpus", "GPUs on this node (-1: detect, 0: CPU node)"),
    ("--cpu-ranks", "layout", "cpu_ranks", "rank slots on a CPU-only node"),
    ("--spares", "layout", "spares", "warm spare processes on this node"),
    ("--backend", "collectives", "backend", "auto, nccl or gloo"),
    ("--log-level", "log", "level", "debug, info, warning or error"),
)
_Item = tuple[str, str, Any, str, bool]  # section, key, raw value, source, raw is text


def _schema(section: str) -> dict[str, Any]:
    cls = _SECTIONS[section] if section else Config
    return {f.name: f for f in fields(cls) if "kind" in f.metadata}


def _label(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper() if section else f"{ENV_PREFIX}{key}".upper()


def _hint(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class _Invalid(Exception):
    """A value that does not fit its field; the message lacks the source and key."""


def _native(kind: str, raw: Any, text: bool) -> Any:
    """Turn ``raw`` (a TOML value, or text from the environment or a flag) into a Python value."""
    if kind == "int":
        if text and re.fullmatch(r"\s*[-+]?[0-9]+\s*", raw):
            return int(raw)
        if not text and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif kind in ("float", "seconds"):
        try:
            value = float(raw) if text or (isinstance(raw, (int, float))
                                           and not isinstance(raw, bool)) else None
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            return value
    elif kind == "bool":
        word = raw.strip().lower() if isinstance(raw, str) else None
        if isinstance(raw, bool) or word == "auto" or (text and word in _TRUE | _FALSE):
            return raw if isinstance(raw, bool) else None if word == "auto" else word in _TRUE
    elif kind == "endpoints":
        items = raw.split(",") if isinstance(raw, str) else raw
        if isinstance(items, list) and all(isinstance(e, str) for e in items):
            return tuple(e.strip() for e in items if e.strip())
    elif isinstance(raw, str):
        return raw
    raise _Invalid(f"expected {_EXPECTED.get(kind, 'a string')}, got {_show(raw)}")


def _check_value(meta: Mapping[str, Any], value: Any) -> Any:
    kind, gt, ge, choices = meta["kind"], meta["gt"], meta["ge"], meta["choices"]
    if gt is not None and not value > gt:
        raise _Invalid(f"must be > {gt}, got {_show(value)}")
    if ge is not None and not value >= ge:
        raise _Invalid(f"must be >= {ge}, got {_show(value)}")
    if kind in ("str", "file", "path", "name", "choice") and not value.strip():
        raise _Invalid("must not be empty")
    if kind == "name" and not _NAME.fullmatch(value):
        raise _Invalid(f"expected letters, digits, '_', '.' or '-', got {_show(value)}")
    if kind == "choice" and value.lower() not in choices:
        raise _Invalid(f"expected one of {', '.join(choices)}, got {_show(value)}")
    if kind == "file" and not Path(value).is_file():
        raise _Invalid(f"file not found: {value}")
    if kind == "endpoints":
        if not value:
            raise _Invalid("needs at least one endpoint")
        for endpoint in value:
            if not _ENDPOINT.fullmatch(endpoint):
                raise _Invalid(f"bad endpoint {_show(endpoint)}: expected host:port or "
                               "http(s)://host:port")
    return {"seconds": _secs, "path": Path}.get(kind, str.lower if kind == "choice" else
                                                 lambda v: v)(value)


def _coerce(item: _Item) -> Any:
    section, key, raw, source, text = item
    meta = _schema(section)[key].metadata
    try:
        return _check_value(meta, _native(meta["kind"], raw, text))
    except _Invalid as exc:
        raise ConfigError(f"{source}: {_label(section, key)}: {exc}") from None


def _unknown(source: str, section: str, key: str) -> None:
    if key not in _schema(section):
        raise ConfigError(f"{source}: unknown key {_label(section, key)}"
                          f"{_hint(key, _schema(section))}")


def _file_items(path: Path, required: bool) -> list[_Item] | None:
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
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{src}: [{name}] must be a table, got {_show(value)}")
            for key, raw in value.items():
                _unknown(src, name, key)
                items.append((name, key, raw, src, False))
        elif name not in _schema("") and isinstance(value, dict):
            raise ConfigError(f"{src}: unknown section [{name}]{_hint(name, _SECTIONS)}")
        else:
            _unknown(src, "", name)
            items.append(("", name, value, src, False))
    return items


def _env_items(env: Mapping[str, str]) -> list[_Item]:
    items, known = [], set(_NOT_CONFIG_ENV)
    for section in ("", *_SECTIONS):
        for key in _schema(section):
            var = _env_name(section, key)
            known.add(var)
            if env.get(var, "").strip():
                items.append((section, key, env[var], var, True))
    for var in env:  # a misspelt variable under a section's prefix is an error, not a no-op
        section = next((s for s in _SECTIONS if var.startswith(_env_name(s, ""))), None)
        if section and var not in known:
            names = [_env_name(section, k) for k in _schema(section)]
            raise ConfigError(f"{var}: unknown key [{section}] "
                              f"{var[len(_env_name(section, '')):].lower()}{_hint(var, names)}")
    return items


def _flag_items(args: argparse.Namespace | None) -> list[_Item]:
    items: list[_Item] = []
    for flag, section, key, _ in _FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            items.append((section, key, value, flag, isinstance(value, str)))
    if getattr(args, "log_json", None) is not None:
        items.append(("log", "json", args.log_json, "--log-json", False))
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per overridable key; all default to None (not given).

    Args:
        parser: the parser to extend; ``load_config`` reads the parsed namespace.
    """
    group = parser.add_argument_group("configuration (flag > RALLYPOINT_* env > file > default)")
    group.add_argument("--config", metavar="PATH",
                       help=f"config file (default: {DEFAULT_PATH}, or $RALLYPOINT_CONFIG)")
    for flag, _, _, help_text in _FLAGS:
        group.add_argument(flag, default=None, help=help_text)
    group.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                       help="JSON log lines (default: when stderr is not a terminal)")


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                args: argparse.Namespace | None = None, *, check_node: bool = True) -> Config:
    """Read, merge and validate the configuration.

    Args:
        path: config file; ``--config`` in ``args`` wins over it, and ``$RALLYPOINT_CONFIG`` is
            used when neither is given. A named file must exist; the default one may be missing.
        env: environment (default ``os.environ``).
        args: a namespace parsed by a parser that went through ``add_arguments``.
        check_node: check that the layout fits this node's rank slots, detecting GPUs (importing
            torch) only when ``gpus`` is -1 and a replica has more than one rank. rallyctl passes
            False.

    Returns:
        The validated ``Config``.

    Raises:
        ConfigError: naming the source (file, variable or flag) and key of the first bad value.
    """
    env = os.environ if env is None else env
    named = getattr(args, "config", None) or path or env.get("RALLYPOINT_CONFIG") or None
    file = Path(named) if named else DEFAULT_PATH
    from_file = _file_items(file, required=named is not None)
    values: dict[str, dict[str, Any]] = {s: {} for s in ("", *_SECTIONS)}
    origin: dict[str, str] = {}
    for item in (from_file or []) + _env_items(env) + _flag_items(args):
        values[item[0]][item[1]] = _coerce(item)
        origin[item[1]] = origin[f"{item[0]}.{item[1]}"] = item[3]
    sections = {s: cls(**values[s]) for s, cls in _SECTIONS.items()}
    config = Config(**values[""], **sections, path=file if from_file is not None else None)
    _check(config, origin, check_node)
    return config


def _fail(what: str, origin: Mapping[str, str], *keys: str) -> None:
    sources = ", ".join(f"{k.split('.')[-1]} from {origin.get(k, 'default')}" for k in keys)
    raise ConfigError(f"{what}; {sources}")


def _check(c: Config, origin: Mapping[str, str], check_node: bool) -> None:
    """Cross-key rules and timing invariants, checked once at load."""
    e, r, lay = c.etcd, c.rendezvous, c.layout
    if (e.user is None) != (e.password is None):
        _fail("[etcd] user and password must be given together", origin,
              "etcd.user", "etcd.password")
    if (e.cert_key is None) != (e.cert_cert is None):
        _fail("[etcd] cert_key and cert_cert must be given together", origin,
              "etcd.cert_key", "etcd.cert_cert")
    secure = [x for x in e.endpoints if x.startswith("https://")]
    if e.ca_cert is None and (e.cert_key or secure):
        _fail("[etcd] ca_cert is required for TLS (client certificate or https endpoint)", origin,
              "etcd.ca_cert", "etcd.endpoints", "etcd.cert_key")
    if r.max_nodes and r.min_nodes > r.max_nodes:
        _fail(f"[rendezvous] min_nodes = {r.min_nodes} > max_nodes = {r.max_nodes}", origin,
              "rendezvous.min_nodes", "rendezvous.max_nodes")
    s = lambda td: f"{td.total_seconds():g}s"  # noqa: E731
    if not r.heartbeat < r.lease_ttl / 2:
        _fail(f"[rendezvous] heartbeat = {s(r.heartbeat)} must be < lease_ttl / 2 = "
              f"{s(r.lease_ttl / 2)}", origin, "rendezvous.heartbeat", "rendezvous.lease_ttl")
    if not e.request_timeout < r.lease_ttl:
        _fail(f"[etcd] request_timeout = {s(e.request_timeout)} must be < [rendezvous] lease_ttl"
              f" = {s(r.lease_ttl)}", origin, "etcd.request_timeout", "rendezvous.lease_ttl")
    if not r.last_call < r.lease_ttl:
        _fail(f"[rendezvous] last_call = {s(r.last_call)} must be < lease_ttl = "
              f"{s(r.lease_ttl)}", origin, "rendezvous.last_call", "rendezvous.lease_ttl")
    if c.collectives.backend == "nccl" and lay.gpus == 0:
        _fail('[collectives] backend = "nccl" needs GPUs, but [layout] gpus = 0 (a CPU node)',
              origin, "collectives.backend", "layout.gpus")
    if check_node and lay.replica_size > 1:
        gpus = lay.node_gpus()
        slots, what = (gpus, "GPUs") if gpus else (lay.cpu_ranks, "CPU rank slots")
        if lay.replica_size % slots and slots % lay.replica_size:
            found = " (detected)" if lay.gpus == -1 and gpus else ""
            _fail(f"[layout] tp*pp = {lay.replica_size} does not divide this node's {slots} "
                  f"{what}{found} (and is not a multiple of it)", origin, "layout.tp", "layout.pp",
                  "layout.gpus" if gpus else "layout.cpu_ranks")
