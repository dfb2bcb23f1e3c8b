"""Load on the front door: N concurrent streaming completions, through the gateway and directly.

What it measures. N clients open N TCP connections at once (one asyncio task and one connection
each, all released together) and each streams one greedy completion (``stream: true``,
temperature 0, ``max_tokens`` T, a distinct prompt of about P tokens). Per client it records:

* errors, by kind: ``refused``, ``reset``, ``closed`` (the server hung up without an answer or
  mid-stream), ``timeout``, ``http_<status>`` (any status but 200), or the exception's type;
* whether the stream completed: ``data: [DONE]`` arrived, a ``finish_reason`` was given, and
  (where chunks carry ``token_ids``) exactly T tokens came unless the finish reason is ``stop``;
* when the response's headers came (direct: the driver's queue took the request; the gateway
  answers with its first chunk), time to first token (both from sending the request), stream
  duration, tokens received;
* correctness under load: for up to ``--check`` clients (spread over all N) the tokens equal a
  sequential, one-client-at-a-time reference run of the same prompt, done before the load.

It runs the same N clients (same prompts) once per target, one after the other (``--rounds R``:
R times in turn, with the median per target): ``direct`` sends
each client straight to a replica's driver (the drivers of the gateway's ``/health``, round robin),
``gateway`` through rallyd's gateway, so the gateway's overhead shows side by side. It prints one
table row per target (clients, distinct connections, errors, incomplete streams, tokens delivered /
expected, TTFT p50/p99, duration p50/p99, ms per token after the first (p50), aggregate tokens/s,
wall time, reference matches), and
``--json FILE`` writes that plus every client's record, the device, versions, date and git commit.
"conns" counts the distinct client ports of the connections that got an HTTP answer. When the
deployment runs on this host, it also prints how many connections this host's kernel could not
queue for accept (``ListenOverflows``, ``TCPReqQFullDoCookies`` in /proc/net/netstat) during each
run: the usual cause of resets under a connection burst is a listen backlog that is too short.

By default it starts its own deployment, as ``bench/recovery.py`` does: a local etcd and one rallyd
(TP=1, ``--dp`` replicas) serving a seeded random Llama (``--model-size``) on ``--device``, with
``[worker] max_batch`` = N unless ``--max-batch`` says otherwise. ``--gateway URL`` drives an
existing deployment instead. The process's RLIMIT_NOFILE soft limit is raised to the hard limit
first (rallyd and its workers, started from here, inherit it).

    python bench/load.py --clients 8                                   # CPU smoke run
    python bench/load.py --clients 64 --max-tokens 16
    python bench/load.py --clients 1000 --max-tokens 16 --json load-cpu.json
    python bench/load.py --clients 256 --model-size 1b --device cuda --max-tokens 128
    python bench/load.py --clients 256 --model-size 1b --device cuda --max-tokens 128 --client-procs 8
    python bench/load.py --clients 64 --gateway http://10.0.0.5:8437   # an existing deployment
                                                     # (--api-key, or $RALLYPOINT_GATEWAY_API_KEY)

It exits 1 when any client saw an error, an incomplete stream or tokens unlike the reference.

A replica's driver admits ``[worker] queue_capacity`` requests (waiting + in flight; passed as
max(N, 1024) unless ``--queue-capacity`` says otherwise); past that it answers 503, which ``direct``
clients count as errors and the gateway retries (for up to ``[gateway] resume_timeout``); ``--dp``
replicas multiply it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kelp",
         "lantern", "meadow", "nickel", "onyx", "prairie", "quartz", "raven", "saffron", "tundra", "umber", "violet",
         "willow", "xenon", "yarrow", "zephyr"]


# -- setup -----------------------------------------------------------------------------------

def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            print(f"could not raise RLIMIT_NOFILE to {target}: {exc}", file=sys.stderr)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def make_prompt(i: int, n_tokens: int) -> str:
    """A distinct ASCII prompt of exactly ``n_tokens`` characters (= tokens with the byte tokenizer)."""
    text = f"client {i:05d}:"
    k = i
    while len(text) < n_tokens:
        text += " " + WORDS[k % len(WORDS)]
        k = k * 7 + 3
    return text[:n_tokens]


class Deployment:
    """A local etcd and one rallyd serving ``--model-size`` on ``--device`` (TP=1, ``--dp`` replicas)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="rallypoint-load-"))
        self.etcd = None
        self.daemon = None

    def start(self) -> str:
        """Start everything; return the gateway's URL once it routes to ``--dp`` serving drivers."""
        from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file
        from rallypoint.testing.etcd_server import EtcdCluster
        from rallypoint.worker.checkpoint import make_model

        a = self.args
        model = a.model or self.work / "model"
        if not (Path(model) / "config.json").exists():
            make_model(model, a.model_size, seed=0, arch=a.arch)
        self.etcd = EtcdCluster(1, root=self.work / "etcd").start()
        state = self.work / "n0"
        node_args = ["--tp", "1", "--dp", str(a.dp), "--state-dir", str(state), "--worker-model", str(model),
                     "--worker-max-batch", str(a.max_batch), "--worker-max-seq", str(a.max_seq),
                     "--worker-dtype", a.dtype, "--worker-stall-timeout", str(a.stall_timeout),
                     "--worker-stream-interval", str(a.stream_interval),
                     "--worker-max-chunk-rate", str(a.max_chunk_rate),
                     "--worker-compile" if a.compile == "on" else "--no-worker-compile",
                     "--worker-overlap" if a.overlap == "on" else "--no-worker-overlap"]
        node_args += ["--gpus", str(a.dp)] if a.device == "cuda" else ["--cpu-ranks", str(a.dp)]
        node_args += ["--worker-queue-capacity", str(a.queue_capacity), "--ep", a.ep,
                      "--prefill-replicas", str(a.prefill_replicas),
                      "--worker-disaggregate-tokens", str(a.disaggregate_tokens)]
        if a.gateway_processes is not None:
            node_args += ["--gateway-processes", str(a.gateway_processes), "--gateway-accept", a.gateway_accept]
        self.daemon = DaemonProcess("n0", daemon_args(self.etcd.endpoints, "load") + node_args,
                                    self.work / "rallyd.log").start()
        url = wait_file(state / "gateway.url", timeout=120).strip()
        deadline = time.monotonic() + a.start_timeout
        while len(drivers_of(url)) < a.dp - a.prefill_replicas:  # the gateway lists the decode replicas only
            logs = [p.read_text(errors="replace") for p in sorted((state / "logs").glob("worker-*.log"))]
            crashed = [t for t in logs if t.count("Traceback") >= 2]  # a worker that failed twice
            if self.daemon.proc.poll() is not None or time.monotonic() > deadline or crashed:
                tail = "\n".join((crashed or logs or [""])[0].splitlines()[-12:])
                raise SystemExit(f"the deployment did not come up; logs in {self.work}\n{tail}")
            time.sleep(0.2)
        return url

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.etcd is not None:
            self.etcd.stop()


def drivers_of(gateway: str) -> list[str]:
    """The serving drivers the gateway's ``/health`` lists (empty when it answers nothing useful)."""
    try:
        r = httpx.get(gateway.rstrip("/") + "/health", timeout=5)
        return list(r.json().get("drivers") or [])
    except (httpx.HTTPError, ValueError, AttributeError):
        return []


def wait_idle(drivers: list[str], timeout: float = 120.0) -> None:
    """Wait until no driver has requests waiting or in flight (left over from the last run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = 0
        for d in drivers:
            try:
                h = httpx.get(d.rstrip("/") + "/health", timeout=5).json()
                busy += int(h.get("waiting", 0)) + int(h.get("in_flight", 0))
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
        if not busy:
            return
        time.sleep(0.25)
    print(f"warning: drivers still busy after {timeout:g}s", file=sys.stderr)


def listen_counters() -> dict[str, int]:
    """This host's kernel counters of connections a listening socket could not take (a full accept
    queue: SYNs or handshakes dropped, SYN cookies sent); machine-wide, so only meaningful for a
    deployment on this host with little else running."""
    try:
        text = Path("/proc/net/netstat").read_text()
        lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
        values = dict(zip(lines[0][1:], map(int, lines[1][1:])))
    except (OSError, IndexError, ValueError):
        return {}
    return {k: values[k] for k in ("ListenOverflows", "ListenDrops", "TCPReqQFullDoCookies", "TCPReqQFullDrop")
            if k in values}


# -- one client ------------------------------------------------------------------------------

@dataclass
class ClientResult:
    index: int
    url: str
    status: int | None = None
    error: str | None = None  # refused, reset, closed, timeout, http_<status>, or an exception type
    error_detail: str | None = None
    got_done: bool = False
    finish_reason: str | None = None
    has_token_ids: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    chunks: int = 0  # chunks that carried text or tokens
    admitted: float | None = None  # the response's headers arrived (the server took the request)
    ttft: float | None = None
    duration: float | None = None
    local_port: int | None = None
    complete: bool = False
    match: bool | None = None  # None: not checked against the reference

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.has_token_ids else self.chunks


def classify(exc: BaseException) -> str:
    """One word for what went wrong with a connection."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, ConnectionRefusedError) for x in chain):
        return "refused"
    if any(isinstance(x, (ConnectionResetError, BrokenPipeError)) for x in chain) or "reset by peer" in str(exc):
        return "reset"
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "closed"
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    """``ReadError <- ConnectionResetError: [Errno 104] Connection reset by peer``: the chain of
    causes, and the first message in it that says something."""
    chain, e = [], exc
    while e is not None and len(chain) < 6:
        chain.append(e)
        e = e.__cause__ or e.__context__
    message = next((str(x) for x in chain if str(x)), "")
    return (" <- ".join(type(x).__name__ for x in chain) + (f": {message}" if message else ""))[:300]


async def one_client(http: httpx.AsyncClient, index: int, url: str, body: dict, go: asyncio.Event | None,
                     max_tokens: int, timeout: float) -> ClientResult:
    """Stream one completion from ``url`` once ``go`` is set; never raises."""
    r = ClientResult(index, url)
    if go is not None:
        await go.wait()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", url.rstrip("/") + "/v1/completions", json=body) as resp:
                r.status = resp.status_code
                r.admitted = time.perf_counter() - t0
                stream = resp.extensions.get("network_stream")
                addr = stream.get_extra_info("client_addr") if stream is not None else None
                r.local_port = addr[1] if addr else None
                if resp.status_code != 200:
                    r.error = f"http_{resp.status_code}"
                    r.error_detail = (await resp.aread())[:300].decode(errors="replace")
                    return r
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        r.got_done = True
                        break
                    chunk = json.loads(payload)
                    choice = (chunk.get("choices") or [{}])[0]
                    ids = choice.get("token_ids")
                    if ids is not None:
                        r.has_token_ids = True
                        r.tokens.extend(ids)
                    text = choice.get("text") or ""
                    r.text += text
                    if ids or text:
                        r.chunks += 1
                        if r.ttft is None:
                            r.ttft = time.perf_counter() - t0
                    if choice.get("finish_reason"):
                        r.finish_reason = choice["finish_reason"]
                    if chunk.get("error"):
                        r.error_detail = json.dumps(chunk["error"])[:300]
    except Exception as exc:
        r.error = classify(exc)
        r.error_detail = describe(exc)
    r.duration = time.perf_counter() - t0
    right_count = not r.has_token_ids or len(r.tokens) == max_tokens or r.finish_reason == "stop"
    r.complete = (r.error is None and r.got_done and r.finish_reason in ("length", "stop") and right_count)
    return r


def request_body(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}


async def run_slice(items: list[tuple[int, str, str]], max_tokens: int, timeout: float, connect_timeout: float,
                    headers: dict[str, str], release_at: float | None) -> tuple[list[ClientResult], float, float]:
    """Clients ``(index, url, prompt)`` on one connection each, all released together at the
    monotonic time ``release_at`` (None: 0.1 s from now, once every task waits); returns their
    results, the release time and the time the last one ended (monotonic; CLOCK_MONOTONIC is
    one clock for every process of the host)."""
    limits = httpx.Limits(max_connections=len(items), max_keepalive_connections=0)  # never share or reuse one
    tmo = httpx.Timeout(timeout, connect=connect_timeout, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=tmo, headers=headers) as http:
        go = asyncio.Event()
        tasks = [asyncio.create_task(one_client(http, i, url, request_body(p, max_tokens), go, max_tokens, timeout))
                 for i, url, p in items]
        release_at = time.monotonic() + 0.1 if release_at is None else release_at
        await asyncio.sleep(max(0.0, release_at - time.monotonic()))  # every task is parked on ``go``
        go.set()
        results = await asyncio.gather(*tasks)
        return list(results), release_at, time.monotonic()


def _client_process(conn: Any, items: list[tuple[int, str, str]], max_tokens: int, timeout: float,
                    connect_timeout: float, headers: dict[str, str]) -> None:
    """One load process of ``--client-procs``: says it is ready, waits for the release time, runs
    its clients, sends back their results."""
    conn.send("ready")
    release_at = conn.recv()
    conn.send(asyncio.run(run_slice(items, max_tokens, timeout, connect_timeout, headers, release_at)))
    conn.close()


def run_clients(urls: list[str], prompts: list[str], max_tokens: int, timeout: float, connect_timeout: float,
                headers: dict[str, str], procs: int = 1) -> tuple[list[ClientResult], float]:
    """All clients at once, one connection each (client i goes to ``urls[i % len(urls)]``), from
    ``procs`` processes (client i in process i % procs); returns their results and the wall time
    from release to the last one's end.

    One process of Python HTTP clients is itself a limit: opening 256 connections and parsing
    their chunks costs its event loop about as much as the server's (it ran at 40-92 % of a core
    in the 256-stream runs). Users are many processes on many hosts; ``procs`` > 1 comes closer.
    """
    items = [(i, urls[i % len(urls)], p) for i, p in enumerate(prompts)]
    if procs <= 1:
        results, start, end = asyncio.run(run_slice(items, max_tokens, timeout, connect_timeout, headers, None))
        return results, end - start
    ctx = mp.get_context("spawn")  # a fresh interpreter: no threads or torch inherited
    links, children = [], []
    for k in range(procs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client_process, args=(child, items[k::procs], max_tokens, timeout,
                                                         connect_timeout, headers), daemon=True)
        proc.start()
        links.append(parent)
        children.append(proc)
    try:
        for link in links:
            if not link.poll(60) or link.recv() != "ready":
                raise SystemExit("a load process did not start")
        release_at = time.monotonic() + 0.2
        for link in links:
            link.send(release_at)
        results: list[ClientResult] = []
        end = release_at
        for link in links:
            part, _, part_end = link.recv()
            results += part
            end = max(end, part_end)
        return sorted(results, key=lambda r: r.index), end - release_at
    finally:
        for proc in children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


async def reference_run(url: str, prompts: dict[int, str], max_tokens: int, timeout: float,
                        headers: dict[str, str]) -> dict[int, ClientResult]:
    """The same prompts one at a time, each on a fresh connection: what a lone client gets."""
    out = {}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout), headers=headers) as http:
        for i, p in prompts.items():
            out[i] = await one_client(http, i, url, request_body(p, max_tokens), None, max_tokens, timeout)
    return out


# -- results ---------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1), None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summarize(results: list[ClientResult], wall: float, max_tokens: int) -> dict:
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    ttft = [r.ttft for r in results if r.ttft is not None]
    admitted = [r.admitted for r in results if r.admitted is not None]
    dur = [r.duration for r in results if r.complete]
    # per token after the first: what one stream's decode costs through this target
    itl = [(r.duration - r.ttft) / (r.n_tokens - 1) for r in results
           if r.complete and r.ttft is not None and r.duration is not None and r.n_tokens > 1]
    delivered = sum(r.n_tokens for r in results)
    checked = [r for r in results if r.match is not None]
    ports = {r.local_port for r in results if r.local_port is not None}
    return {"clients": len(results), "connections": len(ports),
            "errors": sum(errors.values()), "errors_by_kind": errors,
            "incomplete": sum(1 for r in results if not r.error and not r.complete),
            "completed": sum(1 for r in results if r.complete),
            "tokens_delivered": delivered, "tokens_expected": len(results) * max_tokens,
            "admitted_p50": pct(admitted, 0.5), "admitted_p99": pct(admitted, 0.99),
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "duration_p50": pct(dur, 0.5), "duration_p99": pct(dur, 0.99),
            "ms_per_token_p50": 1e3 * m if (m := pct(itl, 0.5)) is not None else None,
            "tokens_per_s": delivered / wall if wall > 0 else None, "wall_s": wall,
            "checked": len(checked), "matched": sum(1 for r in checked if r.match)}


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(summaries: dict[str, dict]) -> None:
    """One row per target. conns: distinct connections that got an HTTP answer; ref match:
    streams equal to the sequential reference / streams checked."""
    rows = [("target", "clients", "conns", "errors", "incomplete", "tokens", "headers p50/p99 s", "TTFT p50/p99 s",
             "stream p50/p99 s", "ms/token p50", "tok/s", "wall s", "ref match")]
    for name, s in summaries.items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items()))
        errors = f"{s['errors']}" + (f" ({kinds})" if kinds else "")
        rows.append((name, str(s["clients"]), str(s["connections"]), errors,
                     str(s["incomplete"]), f"{s['tokens_delivered']}/{s['tokens_expected']}",
                     f"{fmt(s['admitted_p50'])}/{fmt(s['admitted_p99'])}", f"{fmt(s['ttft_p50'])}/{fmt(s['ttft_p99'])}",
                     f"{fmt(s['duration_p50'])}/{fmt(s['duration_p99'])}",
                     fmt(s["ms_per_token_p50"], ".2f"), fmt(s["tokens_per_s"], ".0f"), fmt(s["wall_s"], ".2f"),
                     f"{s['matched']}/{s['checked']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def environment(args: argparse.Namespace, own: bool) -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    device = "existing deployment (see --gateway)" if not own else args.device
    if own and args.device == "cuda":
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10, check=False).stdout.split("\n")
            device = f"{args.dp} x {names[0].strip()}"
        except (OSError, subprocess.SubprocessError):
            device = "cuda"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"device": device, "cpu": f"{cpu} ({os.cpu_count()} cores)", "torch": torch_version,
            "httpx": httpx.__version__, "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "code": str(REPO), "git_commit": git("rev-parse", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain"))}


# -- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, required=True, help="concurrent streaming clients (N)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each completion (T)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in characters (P; = tokens with "
                                                                  "the byte tokenizer of --model-size models)")
    ap.add_argument("--gateway", help="drive an existing gateway at this URL instead of starting a deployment")
    ap.add_argument("--targets", default="direct,gateway",
                    help="what to load, in order: direct (the drivers), gateway, or both (default); "
                         "leave out direct when the drivers are not reachable from here")
    ap.add_argument("--check", type=int, default=256,
                    help="clients (spread over N) checked against a sequential reference run; 0: none")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="load processes the clients are spread over (client i in process i %% K), released "
                         "together; one process of Python clients is itself a limit at a few hundred streams")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the targets this many times in turn (the first round is the first burst after "
                         "start; later ones find the gateway's upstream connections open), a table row each")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one stream may take, all in")
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    ap.add_argument("--api-key", default=os.environ.get("RALLYPOINT_GATEWAY_API_KEY"),
                    help="sent as Authorization: Bearer (default $RALLYPOINT_GATEWAY_API_KEY)")
    ap.add_argument("--json", type=Path, help="write the summary and every client's record here")
    own = ap.add_argument_group("own deployment (without --gateway)")
    own.add_argument("--model-size", default="tiny", choices=("tiny", "small", "1b"))
    own.add_argument("--model", type=Path, help="checkpoint directory to serve (written if missing)")
    own.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    own.add_argument("--dp", type=int, default=1, help="replicas (one CPU rank or GPU each)")
    own.add_argument("--arch", default="llama", choices=("llama", "moe"), help="the written model's layout")
    own.add_argument("--prefill-replicas", type=int, default=0,
                     help="[layout] prefill_replicas: of the --dp replicas, this many prefill for the others")
    own.add_argument("--disaggregate-tokens", type=int, default=256, help="[worker] disaggregate_tokens")
    own.add_argument("--ep", default="tp", choices=("tp", "dp"),
                     help="[layout] ep: a moe's experts in each replica (tp) or shared by every replica (dp)")
    own.add_argument("--max-batch", type=int,
                     help="[worker] max_batch: KV-cache rows per replica (default N; 0: sized from free memory)")
    own.add_argument("--max-seq", type=int, help="[worker] max_seq (default P + T rounded up to 64; 0: the model's context)")
    own.add_argument("--queue-capacity", type=int, help="[worker] queue_capacity (default max(N, 1024))")
    own.add_argument("--dtype", default="auto")
    own.add_argument("--compile", default="on", choices=("on", "off"),
                     help="[worker] compile: decode layers through torch.compile (with CUDA graphs)")
    own.add_argument("--overlap", default="on", choices=("on", "off"),
                     help="[worker] overlap: launch the next decode step before reading this one's tokens")
    own.add_argument("--max-chunk-rate", type=float, default=0.0,
                     help="[worker] max_chunk_rate: chunks/s the API aims under (0: off)")
    own.add_argument("--stream-interval", type=float, default=0.0,
                     help="[worker] stream_interval: seconds a stream waits after a chunk (tokens accumulate)")
    own.add_argument("--stall-timeout", type=float, default=30.0,
                     help="[worker] stall_timeout: a loaded CPU worker must not be taken for frozen")
    own.add_argument("--gateway-accept", default="shared", choices=("reuseport", "shared"),
                     help="[gateway] accept: a socket per gateway process, or one they all accept on")
    own.add_argument("--gateway-processes", type=int,
                     help="[gateway] processes: gateway processes sharing its port (0: a thread of rallyd; "
                          "default: rallyd's choice by the node's cores)")
    own.add_argument("--start-timeout", type=float, default=300.0)
    args = ap.parse_args()
    n, T, P = args.clients, args.max_tokens, args.prompt_tokens
    args.max_batch = n if args.max_batch is None else args.max_batch  # 0: sized from free memory
    args.queue_capacity = args.queue_capacity or max(n, 1024)
    args.max_seq = max(64, -(-(P + T + 1) // 64) * 64) if args.max_seq is None else args.max_seq  # 0: the context

    soft, hard = raise_nofile()
    print(f"RLIMIT_NOFILE: soft {soft}, hard {hard}")
    if soft < 2 * n + 64:
        print(f"warning: {soft} fds may be too few for {n} clients and their server side", file=sys.stderr)

    deployment = None if args.gateway else Deployment(args)
    try:
        if deployment is not None:
            print(f"starting etcd + rallyd ({args.model_size} model, {args.device}, TP=1 x DP={args.dp}, max_batch "
                  f"{args.max_batch}, max_seq {args.max_seq}, queue_capacity {args.queue_capacity}) "
                  f"in {deployment.work}", flush=True)
            gateway = deployment.start()
        else:
            gateway = args.gateway.rstrip("/")
        drivers = drivers_of(gateway)
        print(f"gateway {gateway}; drivers {drivers or 'not listed'}", flush=True)
        targets = {"direct": drivers, "gateway": [gateway]}
        wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
        if "direct" in wanted and not drivers:
            print("no driver URL known: skipping the direct run", file=sys.stderr)
            wanted.remove("direct")

        prompts = [make_prompt(i, P) for i in range(n)]
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        checks = min(args.check, n)
        sample = sorted({round(j * (n - 1) / max(1, checks - 1)) for j in range(checks)}) if checks else []
        t0 = time.perf_counter()
        reference = asyncio.run(reference_run((drivers or [gateway])[0], {i: prompts[i] for i in sample}, T,
                                              args.timeout, headers))
        bad_ref = [r for r in reference.values() if not r.complete]
        print(f"reference: {len(reference)} sequential single-client runs in {time.perf_counter() - t0:.1f}s"
              + (f"; {len(bad_ref)} did not complete: {bad_ref[0].error} {bad_ref[0].error_detail}" if bad_ref else ""),
              flush=True)

        # one request through every target first: first-request costs (connections, lazily made
        # HTTP clients, the first compiled shapes) are not what the load measures
        for name in wanted:
            asyncio.run(reference_run(targets[name][0], {0: prompts[0]}, T, args.timeout, headers))
        summaries, records = {}, {}
        runs = [(name, name if args.rounds == 1 else f"{name} #{k + 1}") for k in range(args.rounds) for name in wanted]
        for target, name in runs:
            wait_idle(drivers)
            print(f"{name}: {n} clients x {T} tokens ...", flush=True)
            before = listen_counters()
            results, wall = run_clients(targets[target], prompts, T, args.timeout, args.connect_timeout, headers,
                                        args.client_procs)
            kernel = {key: v - before.get(key, 0) for key, v in listen_counters().items()}
            for r in results:
                ref = reference.get(r.index)
                if ref is not None and ref.complete and not r.error:
                    by_ids = r.has_token_ids and ref.has_token_ids
                    r.match = r.tokens == ref.tokens if by_ids else r.text == ref.text
            summaries[name] = summarize(results, wall, T) | {"kernel_listen_counters": kernel}
            records[name] = results
            failed = next((r for r in results if r.error or not r.complete), None)
            if failed is not None:
                what = failed.error_detail or (f"[DONE] {'seen' if failed.got_done else 'missing'}, finish_reason "
                                               f"{failed.finish_reason}, {failed.n_tokens} tokens")
                print(f"  e.g. client {failed.index}: {failed.error or 'incomplete'} ({what})", flush=True)

        print(f"\n{n} concurrent streaming clients, max_tokens {T}, prompts of {P} tokens, temperature 0")
        print_table(summaries)
        if args.rounds > 1:
            for target in wanted:
                rates = sorted(sm["tokens_per_s"] or 0.0 for name, sm in summaries.items()
                               if name.rsplit(" #", 1)[0] == target)
                print(f"{target}: tok/s median {rates[len(rates) // 2]:.0f} of {len(rates)} rounds "
                      f"(min {rates[0]:.0f}, max {rates[-1]:.0f})")
        for name, sm in summaries.items():
            if any(sm["kernel_listen_counters"].values()):
                print(f"{name}: this host's kernel counted, during the run: "
                      + ", ".join(f"{k} {v}" for k, v in sm["kernel_listen_counters"].items()))
        if args.json:
            out = {"environment": environment(args, deployment is not None), "args": vars(args) | {
                       "model": str(args.model) if args.model else None, "json": str(args.json), "api_key": None},
                   "gateway": gateway, "drivers": drivers, "rlimit_nofile": [soft, hard],
                   "reference": {i: {"tokens": r.tokens, "text": r.text, "complete": r.complete}
                                 for i, r in reference.items()},
                   "summary": summaries,
                   "clients": {name: [{**{k: v for k, v in asdict(r).items() if k not in ("tokens", "text")},
                                       "n_tokens": r.n_tokens, **({"tokens": r.tokens} if r.match is False else {})}
                                      for r in rs] for name, rs in records.items()}}
            args.json.write_text(json.dumps(out, indent=1))
            print(f"wrote {args.json}")
    finally:
        if deployment is not None:
            deployment.stop()
            print(f"logs in {deployment.work}")
    clean = all(s["errors"] == 0 and s["incomplete"] == 0 and s["matched"] == s["checked"] for s in summaries.values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
