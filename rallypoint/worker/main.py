"""The rank process: join a generation, hold this rank's shard, serve, and come back after aborts.

``python -m rallypoint.worker --cluster C --endpoints E --node N --local-rank L --model DIR``

Each generation: wait for a released plan that seats this process, configure the groups (healthy
unchanged ones carry over), make sure the shard for its (TP rank, PP stage) is loaded — weights
stay in memory when the shard did not move — and run the replica's steps. The replica's driver
(PP stage 0, TP rank 0) also serves the HTTP API and keeps the request journal; on an abort it
holds the requests in flight and resumes them in the next generation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from rallypoint.api import API_KEY_ENV, served_model_name
from rallypoint.errors import CheckpointError, EtcdError, GenerationAborted, GroupError, RallypointError
from rallypoint.groups.group_set import GroupSet
from rallypoint.groups.topology import rank_at
from rallypoint.log import configure_logging, get_logger
from rallypoint.protocol import channel as msgs
from rallypoint.protocol import exit_codes
from rallypoint.protocol.experts import experts_of, owners
from rallypoint.protocol.grid import coords_of, layers_for
from rallypoint.protocol.orders import mark_drained, request_replan
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import EventLog
from rallypoint.rendezvous.records import Plan
from rallypoint.worker.api_link import ApiProcess, ServeSpec
from rallypoint.worker.args import parse_args, runtime_settings
from rallypoint.worker.build_guard import BuildGuard
from rallypoint.worker.channel import ChannelClient, SeatHandoff
from rallypoint.worker.control import Controller
from rallypoint.worker.engine import Driver, EngineSettings, serve_generation, warm_prefill
from rallypoint.worker.requests import RequestQueue
from rallypoint.worker.runtime import RankRuntime
from rallypoint.worker.title import set_title, spare_title, worker_title

if TYPE_CHECKING:
    from rallypoint.worker.disaggregation import Peer
    from rallypoint.worker.graphs import DecodeGraphs
    from rallypoint.worker.model import StageModel
    from rallypoint.worker.model_config import ModelConfig

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


@dataclass(frozen=True)
class ShardKey:
    """What decides a rank's weights: a rank keeps them across generations while this is unchanged."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    experts: tuple[int, ...] | None = None  # held, when a mixture of experts is spread over every replica


class TPAdapter:
    """The model's view of its groups: all-reduce and all-gather on ``tp``, and a mixture of
    experts' all-to-all on ``ep_group``: ``tp`` when a replica spreads its experts over its own TP
    ranks (EP = TP), ``ep`` when the experts are spread over every replica (``[layout] ep = "dp"``)."""

    def __init__(self, runtime: RankRuntime) -> None:
        self.runtime = runtime
        self.ep_group = "tp"

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        assert self.runtime.comm is not None
        return self.runtime.comm.all_reduce(t, "tp")

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        assert self.runtime.comm is not None
        return self.runtime.comm.all_gather(t, dim, "tp")

    def all_to_all(self, t: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> torch.Tensor:
        assert self.runtime.comm is not None
        return self.runtime.comm.all_to_all(t, in_splits, out_splits, self.ep_group)


class Worker:
    """One rank process across generations.

    A warm spare builds one of these with ``args.local_rank`` None (etcd session, model config,
    tokenizer: everything but the seat) and calls ``take_seat`` when rallyd hands it one.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        from rallypoint.worker.model_config import ModelConfig

        self.args = args
        self.seat: tuple[str, int] | None = None
        self.log = get_logger("worker", node=args.node, local_rank=args.local_rank)
        self.runtime = RankRuntime(runtime_settings(args))
        self.probe = args.workload == "allreduce-probe"
        # an all-reduce probe has no model: config and tokenizer stay None
        self.config: ModelConfig | None = None if self.probe else ModelConfig.from_dir(args.model)
        self.controller = Controller(self.runtime.client, args.cluster, None, self._on_abort,
                                     lambda _: self._close_if_draining())
        self.events = EventLog(self.runtime.client, self.runtime.keys, by=args.node)
        # Grace past the etcd client's retry deadline (10 s): a build blocked in an etcd retry
        # is not hung. Limit: the members' wait times out at build_timeout first.
        self.build_guard = BuildGuard(lambda gen: self._newer_than(gen) is not None,
                                      limit=self.runtime.settings.build_timeout + 15.0, grace=15.0,
                                      on_stuck=self._build_stuck)
        self.settings = EngineSettings(max_batch=args.max_batch, max_seq=args.max_seq,
                                       prefill_tokens=args.prefill_tokens, overlap=args.overlap == "on")
        self.queue = RequestQueue(capacity=args.queue_capacity)
        self.model: StageModel | None = None
        self.graphs: DecodeGraphs | None = None  # of self.model, on a GPU with TP=1 and PP=1
        self.shard: ShardKey | None = None
        self.experts_read: list[int] = []  # what the last shard change read of the experts (spread over every replica)
        self.adapter = TPAdapter(self.runtime)
        self.driver: Driver | None = None
        # The replica's HTTP API runs in a process of its own (api_link: why), started now so its
        # imports and tokenizer load overlap this process's model load; it listens once this
        # worker drives a replica (or, for a spare with free ports, once warm).
        self.api: ApiProcess | None = None if self.probe else ApiProcess(
            self.queue, args.model, self.config.vocab_size if self.config else 0, served_model_name(args.model),
            lambda: (self.state, self.gen), title=f"rallypoint api (cluster {args.cluster}, node {args.node}, "
                                                  f"worker pid {os.getpid()})", on_lost=self._api_lost)
        self.state, self.gen = "starting", args.after_gen
        self.plan: Plan | None = None
        self.replica = -1
        self.role = "colocated"  # in a disaggregated plan: prefill or decode
        self._peers_read: tuple[int, float, list[Peer]] = (0, 0.0, [])  # _prefill_peers: (gen, when, peers)
        self.stopping = threading.Event()
        self.beat_now = threading.Event()  # tell rallyd at once (it routes by these beats): a new state
        self._first_token_gen = 0
        self._drained_gen = 0
        if args.local_rank is not None:
            self.take_seat(args.local_rank, args.after_gen)

    def take_seat(self, local_rank: int, after_gen: int, api_port: int | None = None,
                  api_url_file: str | None = None) -> None:
        """Become the process of seat ``node/local_rank`` (at start, or when a spare is adopted)."""
        self.args.local_rank = local_rank
        if api_port is not None:
            self.args.api_port = api_port
        if api_url_file:
            self.args.api_url_file = api_url_file
        preloaded_on = self._seat_device() if self.model is not None else None
        self.seat = (self.args.node, local_rank)
        if preloaded_on is not None and preloaded_on != self._seat_device():
            self.model = self.graphs = self.shard = None  # loaded for another device than the seat's
        self.gen = max(self.gen, after_gen)
        self.events.by = f"{self.args.node}/{local_rank}"
        self.log = get_logger("worker", node=self.args.node, local_rank=local_rank)
        self.controller.set_seat(self.seat)
        self.title("waiting for a plan")

    def title(self, doing: str, rank: int | None = None) -> None:
        """Say in ``ps`` what this process is (``worker.title``)."""
        seat = f"{self.seat[0]}/{self.seat[1]}" if self.seat else self.args.node
        set_title(worker_title(self.args.cluster, seat, doing, rank, self.gen if rank is not None else None))

    def _newer_than(self, gen: int) -> str | None:
        """Why generation ``gen`` is no longer wanted (a newer one was released), else None."""
        released = self.controller.released
        return f"generation {released} was released" if released > gen else None

    def _build(self, plan: Plan) -> GroupSet:
        """Build ``plan``'s groups: given up when a newer generation comes, guarded against a hang."""
        assert self.seat is not None
        # gloo's connect waits at most the store timeout: only NCCL's init can hang for good.
        guard = self.build_guard.watching(plan.gen) if self.runtime.settings.device.startswith("cuda") \
            else contextlib.nullcontext()
        extra = (("ep",) if self._experts_spread_in(plan) else ()) + (("dp",) if plan.prefill_replicas else ())
        names = (*self.runtime.settings.group_names, *extra) if extra else None
        with guard:
            return self.runtime.configure(plan, *self.seat, cancelled=lambda: self._newer_than(plan.gen) or (
                "this process is stopping" if self.stopping.is_set() else None), names=names)

    def _experts_spread_in(self, plan: Plan) -> bool:
        """Whether ``plan`` spreads this model's experts over every replica (``[layout] ep = "dp"``)."""
        return plan.experts is not None and self.config is not None and self.config.num_experts > 0

    def _ask_replan(self, gen: int, reason: str) -> None:
        """Ask the leader for the next plan: a build that failed here (a member that never came,
        a lease lost in an etcd blip) leaves generation ``gen`` unable to serve."""
        try:
            if request_replan(self.runtime.client, self.runtime.keys, gen, reason):
                self.events.emit(gen, ev.REPLAN_REQUESTED, reason=reason)
        except RallypointError as exc:
            self.log.error("worker.replan_request_failed", gen=gen, error=str(exc))

    def _build_stuck(self, why: str) -> None:
        """A communicator init hangs beyond any abort: end the process, rallyd starts the seat again."""
        self.log.error("worker.build_stuck", gen=self.gen, why=why, exit_code=exit_codes.BUILD_STUCK)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_codes.BUILD_STUCK)

    def _on_abort(self, gen: int, ranks: tuple[int, ...], reason: str) -> None:
        labels = self.runtime.abort_generation(gen, reason, ranks)
        if labels:
            self.log.warning("worker.abort_order", gen=gen, ranks=list(ranks), aborted=labels, reason=reason)

    def _shard_for(self, plan: Plan) -> ShardKey:
        """The shard this seat holds in ``plan``: known from the plan alone, before any group exists."""
        assert self.seat is not None
        rank = rank_at(plan, *self.seat)
        at = coords_of(rank, plan.tp, plan.pp)
        if self._experts_spread_in(plan):
            assert plan.experts is not None and self.config is not None  # _experts_spread_in checked both
            held = experts_of(plan.experts.holds[rank], plan.experts.slots, self.config.num_experts)
            return ShardKey(at.tp, plan.tp, at.pp, plan.pp, held)
        return ShardKey(at.tp, plan.tp, at.pp, plan.pp)

    def _seat_device(self) -> torch.device:
        dev = self.runtime.settings.device
        if dev.startswith("cuda") and ":" not in dev:
            return torch.device(f"cuda:{self.seat[1] if self.seat is not None else 0}")
        return torch.device(dev)

    def preload(self) -> None:
        """A spare of a TP=1, PP=1 deployment: every seat holds the whole model, so load it (and
        capture its decode graphs) now, and a seat taken later serves without loading anything.
        rallyd asks for it only where the seat's device is known ahead (one seat, or the CPU).
        A mixture of experts spread over every replica (``[layout] ep = "dp"``): everything but
        the experts, which differ by seat; the seat taken reads its own (``hold_experts``)."""
        if self.probe:
            return
        shared = self._spec_spreads_experts()
        try:
            self._ensure_shard(ShardKey(0, 1, 0, 1, () if shared else None), compile=self.args.compile == "on")
        except CheckpointError as exc:  # the seat that adopts this spare will load, fail and say so
            self.log.error("worker.preload_failed", error=str(exc))
            self.model = self.graphs = self.shard = None
            return
        assert self.model is not None  # _ensure_shard loaded it
        captured = self.graphs.capture_all() if self.graphs is not None else 0.0
        if not shared:  # without its experts the model cannot run a forward
            warm_prefill(self.model, self.settings.max_seq, self.settings.prefill_tokens)
        self.model.reset_cache()
        if self.args.api_port == 0:  # seats take any free port: open the API now, not at adoption
            self._open_api()
        self.log.info("worker.preloaded", device=str(self._seat_device()), graphs=len(self.graphs.graphs)
                      if self.graphs is not None else 0, capture_seconds=round(captured, 3))

    def _spec_spreads_experts(self) -> bool:
        """Whether this cluster spreads this model's experts over every replica (its spec in etcd)."""
        from rallypoint.rendezvous.records import ClusterSpec

        if self.config is None or not self.config.num_experts:
            return False
        try:
            kv = self.runtime.client.get(self.runtime.keys.spec)
            return kv is not None and ClusterSpec.from_json(self.runtime.keys.spec, kv.value).ep == "dp"
        except RallypointError as exc:
            self.log.warning("worker.spec_unread", error=str(exc))
            return False

    def _ensure_shard(self, key: ShardKey, compile: bool = False) -> float:
        """Load this rank's shard unless it is already in memory; return the seconds spent.

        Runs while the generation's groups are being built (it needs only the plan), so a
        replacement loads its weights while it waits for its peers. ``compile``: run its decode
        graphs through compiled layers (``DecodeGraphs``), compiling now (seconds to tens of
        seconds): for a first start or a spare, never for a replacement on a recovery's path.
        """
        from rallypoint.worker.shards import hold_experts, load_stage

        self.experts_read = []
        if key == self.shard and self.model is not None:
            self.model.reset_cache()
            return 0.0
        assert self.config is not None, "an all-reduce probe loads no shard"
        t0 = time.monotonic()
        if self.model is not None and self.shard is not None and key.experts is not None \
                and replace(self.shard, experts=None) == replace(key, experts=None):
            # the same stage with other experts (spread over every replica): read only the new ones
            self.experts_read = hold_experts(self.model, self.args.model, key.experts, self._seat_device(),
                                             self._dtype())
            self.model.reset_cache()
            self.shard = key
            took = time.monotonic() - t0
            self.log.info("worker.experts_moved", held=list(key.experts), read=self.experts_read,
                          seconds=round(took, 3))
            return took
        self.model = self.graphs = None
        layers = layers_for(self.config.num_hidden_layers, key.pp_rank, key.pp_size)
        device = self._seat_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this thread's current device
        self.model = model = load_stage(self.args.model, self.config, key.tp_rank, key.tp_size, layers,
                                first=key.pp_rank == 0, last=key.pp_rank == key.pp_size - 1,
                                device=device, dtype=self._dtype(), comm=self.adapter, experts=key.experts)
        if not (self.settings.max_batch and self.settings.max_seq):
            self._size_cache(key, device)
        model.setup_cache(self.settings.max_batch, self.settings.max_seq)
        self.graphs = None
        # a mixture of experts decodes eagerly: its routing sizes each step's work on the host
        if device.type == "cuda" and key.tp_size == 1 and key.pp_size == 1 and self.args.cuda_graphs == "on" \
                and not self.config.num_experts:
            from rallypoint.worker.graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.settings.max_batch, self.settings.max_seq, device,
                                       compile=compile)
        self.shard = key
        self.experts_read = list(key.experts) if key.experts is not None else []
        took = time.monotonic() - t0
        self.log.info("worker.shard_loaded", tp_rank=key.tp_rank, tp=key.tp_size, pp_rank=key.pp_rank,
                      pp=key.pp_size, layers=[layers.start, layers.stop], seconds=round(took, 3),
                      **self._experts(key))
        return took

    def _experts(self, key: ShardKey | None) -> dict[str, Any]:
        """A mixture of experts: ``{"experts": [first, end)}`` this shard holds (its EP rank's share,
        EP = TP), for the log and the shard_loaded event; spread over every replica, the experts it
        holds and those the last change read; {} for a dense model."""
        if key is not None and key.experts is not None:
            return {"experts_held": list(key.experts), "experts_read": list(self.experts_read)}
        per = self.config.num_experts // key.tp_size if self.config is not None and key is not None else 0
        return {"experts": [key.tp_rank * per, (key.tp_rank + 1) * per]} if per and key is not None else {}

    def _size_cache(self, key: ShardKey, device: torch.device) -> None:
        """``--max-batch 0`` / ``--max-seq 0``: size the KV cache from the memory the weights left,
        once (the driver's rows and the API's context keep these sizes from then on)."""
        from rallypoint.worker.sizing import size_cache

        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil
            free = psutil.virtual_memory().available
        assert self.config is not None
        layers = len(layers_for(self.config.num_hidden_layers, key.pp_rank, key.pp_size))
        size = size_cache(self.config, layers, key.tp_size, self._dtype().itemsize, free, self.settings.max_batch,
                          self.settings.max_seq, self.args.kv_memory_fraction)
        self.settings = replace(self.settings, max_batch=size.max_batch, max_seq=size.max_seq)
        self.log.info("worker.kv_sized", max_batch=size.max_batch, max_seq=size.max_seq,
                      free_gib=round(free / 2**30, 2), cache_gib=round(size.max_batch * size.row_bytes / 2**30, 3))

    def _configure_and_load(self, plan: Plan) -> tuple[GroupSet, float]:
        """Build the generation's groups and load the shard at the same time.

        Raises:
            GroupError: the groups could not be built (the shard, if loaded, is kept).
            CheckpointError: the shard could not be loaded.
        """
        assert self.seat is not None
        result: dict[str, object] = {}

        def load() -> None:
            try:
                # A process started into a running deployment (a restart, a replacement) is on a
                # recovery's path: it serves at once on plain CUDA graphs instead of compiling,
                # and captures a graph when a step first needs it. One started with the
                # deployment captures them all now, so the first burst of requests does not
                # wait for a capture per batch size (0.5 s more to the first tokens of 256).
                fresh = self.args.after_gen == 0
                result["seconds"] = self._ensure_shard(self._shard_for(plan), compile=self.args.compile == "on"
                                                       and fresh)
                if fresh and self.graphs is not None and not self.graphs.graphs:  # a new shard: no request in it
                    took = self.graphs.capture_all()
                    self.log.info("worker.graphs_captured", graphs=len(self.graphs.graphs), seconds=round(took, 3))
            except Exception as exc:  # re-raised on the main thread
                result["error"] = exc

        loader = threading.Thread(target=load, name="rallypoint-shard-load", daemon=True)
        loader.start()
        try:
            groups = self._build(plan)
        finally:
            loader.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return groups, float(result["seconds"])  # type: ignore[arg-type]

    def _dtype(self) -> torch.dtype:
        if self.args.dtype == "auto":
            return torch.bfloat16 if self.runtime.device.type == "cuda" else torch.float32
        return getattr(torch, self.args.dtype)

    @property
    def api_url(self) -> str | None:
        """Where the replica's API listens, once it does."""
        return self.api.url if self.api is not None else None

    def _start_api(self) -> None:
        """Serve the replica's API (once), and say where in the seat's URL file."""
        if self.api_url is None:
            self._open_api()
        assert self.api_url is not None
        if self.args.api_url_file:
            with open(self.args.api_url_file, "w") as f:
                f.write(self.api_url)

    def _api_lost(self, code: int) -> None:
        """The API process died: this replica can no longer take or answer requests. End the
        process (the gateway resumes its streams elsewhere) and let rallyd start the seat afresh."""
        self.log.error("worker.api_lost", api_exit_code=code, exit_code=exit_codes.API_LOST)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_codes.API_LOST)

    def _open_api(self) -> None:
        assert self.api is not None, "an all-reduce probe serves no API"
        url = self.api.serve(ServeSpec(self.args.api_host, self.args.api_port, self.settings.max_seq,
                                       self.args.stream_interval, self.args.max_chunk_rate, self.queue.capacity))
        self.log.info("worker.api_serving", url=url, api_pid=self.api.proc.pid)

    def run(self) -> int:
        assert self.seat is not None, "take_seat first"
        while not self.stopping.is_set():
            try:
                plan = self.controller.wait_plan(self.gen, timeout=1.0)
            except RallypointError:
                continue
            if self.driver is not None and not self._drives_in(plan):
                self._hand_off(plan)
            try:
                groups, loaded = (self._build(plan), 0.0) if self.probe else self._configure_and_load(plan)
            except GroupError as exc:
                self.log.error("worker.configure_failed", gen=plan.gen, error=str(exc))
                self.gen = plan.gen
                if self._newer_than(plan.gen) is None and not self.stopping.is_set():
                    # not superseded: nobody else will move on
                    self._ask_replan(plan.gen, f"{self.seat[0]}/{self.seat[1]} could not build generation "
                                               f"{plan.gen}'s groups: {exc}")
                continue
            except CheckpointError as exc:
                # A bad shard is fatal for this process; rallyd keeps the seat out until the
                # checkpoint's files change, and re-plans without it.
                self.log.error("worker.shard_failed", gen=plan.gen, error=str(exc))
                self.events.emit(plan.gen, ev.SHARD_LOADED, error=str(exc))
                self.events.flush()
                return exit_codes.BAD_CHECKPOINT
            self.gen, self.plan = plan.gen, plan
            self.replica = plan.replica_of(groups.rank)
            self.events.emit(plan.gen, ev.GROUPS_BUILT, rank=groups.rank, carried=list(groups.carried))
            self.events.emit(plan.gen, ev.SHARD_LOADED, rank=groups.rank, seconds=round(loaded, 4),
                             **self._experts(self.shard))
            if self.probe:
                self.title("all-reduce probe", groups.rank)
                self._run_probe(plan, groups)
                continue
            lockstep = self._experts_spread_in(plan)
            if lockstep:  # serve the experts this plan gives this rank, and route to the others'
                assert plan.experts is not None and self.config is not None and self.model is not None
                self.adapter.ep_group = "ep"
                self.model.set_expert_owners(groups.ep.rank_in_group, groups.ep.world_size,
                                             owners(plan.experts, self.config.num_experts))
            else:
                self.adapter.ep_group = "tp"
            is_driver = groups.is_first_stage and groups.tp_rank == 0
            if is_driver:
                if self.driver is None:
                    self.driver = Driver(self.queue, self.settings, self.runtime.device)
                    self._close_if_draining()  # reopens the queue a hand-off closed, unless draining
                self._start_api()
            if self.driver is not None:
                self.driver.switch_to = 0  # any switch asked for is this very generation
                self.driver.first_commit_at = 0.0
                self._disaggregate(plan, groups)
            self.state = "serving"
            self.beat_now.set()
            self.title("driver, serving" if is_driver else "serving", groups.rank)
            self.log.info("worker.serving", gen=plan.gen, rank=groups.rank, driver=is_driver,
                          shard_seconds=round(loaded, 3))
            self.events.emit(plan.gen, ev.SERVING, rank=groups.rank, driver=is_driver)
            assert self.model is not None and self.runtime.comm is not None  # loaded and built above
            try:
                nxt = serve_generation(self.model, self.runtime.comm, groups, self.settings, self.runtime.device,
                                       self.driver if is_driver else None, self._should_switch, self.graphs,
                                       lockstep=lockstep)
                if self.driver is not None:
                    self.driver.hold()
                self.log.info("worker.switch", gen=plan.gen, to=nxt)
            except GenerationAborted as exc:
                self.state = "recovering"
                self.title("recovering", groups.rank)
                self.runtime.abort_generation(plan.gen, f"replica step abandoned: {exc.reason}")
                held = self.driver.hold() if is_driver and self.driver else []
                self.log.warning("worker.generation_aborted", gen=plan.gen, reason=str(exc),
                                 held=[r.id for r in held])
        return 0

    def shutdown(self) -> None:
        """A clean stop (SIGTERM, or a seat dropped from the plan): write the queued events,
        abort every group and end the etcd session, so nothing is left for exit-time destructors
        (torch's NCCL threads torn down by the interpreter abort the process)."""
        self.events.close()
        if self.api is not None:
            self.api.close()
        try:
            self.runtime.close()
        except RallypointError as exc:
            self.log.warning("worker.shutdown_incomplete", error=str(exc))
        self.log.info("worker.stopped", gen=self.gen)

    def _disaggregate(self, plan: Plan, groups: GroupSet) -> None:
        """Give the driver its part in disaggregated serving for ``plan`` (``worker.disaggregation``):
        a decode replica asks the prefill replicas for its long prompts' KV, a prefill replica
        sends the KV it prefilled for them; a colocated one neither."""
        from rallypoint.worker import kv_transfer
        from rallypoint.worker.disaggregation import PrefillSender, RemotePrefill

        d = self.driver
        assert d is not None and self.model is not None and self.runtime.comm is not None
        d.remote, d.place_kv, d.send_kv = None, None, None
        self.role = plan.role_of(self.replica)
        model = self.model
        if self.role == "decode":
            d.remote = RemotePrefill(groups.dp.rank_in_group, plan.gen, self.runtime.comm, groups.dp,
                                     lambda: self._prefill_peers(plan), self.args.disaggregate_tokens,
                                     self.queue.nudge, os.environ.get(API_KEY_ENV), counts=self.queue.counts,
                                     prefill_replicas=plan.prefill_replicas)
            d.place_kv = lambda row, entry: kv_transfer.place(model, row, entry.layers)
        elif self.role == "prefill":
            d.send_kv = PrefillSender(model, self.runtime.comm, groups.dp, plan.gen, counts=self.queue.counts)

    def _prefill_peers(self, plan: Plan) -> list[Peer]:
        """The prefill replicas of ``plan``, with their APIs' URLs (from what their nodes' rallyd
        publish in etcd, read again at most once a second: not an etcd read per request)."""
        from rallypoint.worker.disaggregation import Peer

        gen, at, peers = self._peers_read
        if gen == plan.gen and peers and time.monotonic() - at < 1.0:
            return peers
        out = []
        for replica in range(plan.prefill_replicas):
            seat = next(s for s in plan.ranks if s.rank == replica)  # tp = pp = 1: replica r is rank r
            kv = self.runtime.client.get(self.runtime.keys.node_status_of(seat.node))
            workers = json.loads(kv.value).get("workers", []) if kv is not None else []
            # its status may lag a generation behind: a prefill replica refuses what another
            # generation asks (the request is then prefilled here), so any URL of the seat will do
            url = next((w.get("api") for w in workers if w.get("local_rank") == seat.local_rank), None)
            if url:
                out.append(Peer(replica, url))
        self._peers_read = (plan.gen, time.monotonic(), out)
        return out

    def _drives_in(self, plan: Plan) -> bool:
        """Whether this seat is a replica's driver (first PP stage, TP rank 0) in ``plan``."""
        key = self._shard_for(plan)
        return key.tp_rank == 0 and key.pp_rank == 0

    def _hand_off(self, plan: Plan) -> None:
        """This seat stops driving in ``plan`` (the layout moved it): the requests it holds would
        wait for a driver that never comes back, so their streams end now and the gateway resumes
        each on a serving driver. Done before the build, which may take long."""
        assert self.driver is not None and self.seat is not None
        why = f"{self.seat[0]}/{self.seat[1]} does not drive a replica in generation {plan.gen}"
        moved = self.driver.hand_off(why)
        self.driver = None
        self.log.info("worker.handed_off", gen=plan.gen, requests=[r.id for r in moved], why=why)

    def _run_probe(self, plan: Plan, groups: GroupSet) -> None:
        """``allreduce-probe``: all-reduce on the TP group until the next plan or an abort."""
        from rallypoint.worker.probe import probe_generation

        self.state = "serving"
        self.events.emit(plan.gen, ev.SERVING, rank=groups.rank, driver=False)

        def first(at: float) -> None:
            if groups.tp_rank == 0:
                self.events.emit(plan.gen, ev.FIRST_STEP, at=at, rank=groups.rank, replica=self.replica)

        def newer() -> bool:
            latest = self.controller.latest()
            return latest is not None and latest.gen > plan.gen

        assert self.runtime.comm is not None  # the groups were just built
        try:
            res = probe_generation(self.runtime.comm, groups, self.runtime.device, newer, self.stopping.is_set, first)
            self.log.info("worker.probe_switch", gen=plan.gen, calls=res.calls, wrong=res.wrong)
        except GenerationAborted as exc:
            self.state = "recovering"
            self.runtime.abort_generation(plan.gen, f"probe abandoned: {exc.reason}")
            self.log.warning("worker.generation_aborted", gen=plan.gen, reason=str(exc))

    def _should_switch(self) -> bool:
        """Called by the driver after every step: generation switch, first token, drain."""
        latest = self.controller.latest()
        if latest is not None and latest.gen > self.gen and self.driver is not None:
            self.driver.switch_to = latest.gen
        d = self.driver
        if d is not None and d.first_commit_at and self._first_token_gen < self.gen:
            self._first_token_gen = self.gen
            self.events.emit(self.gen, ev.FIRST_TOKEN, at=d.first_commit_at, rank=0, replica=self.replica)
        if d is not None:
            self._follow_drain(d)
        return self.stopping.is_set()

    def _close_if_draining(self) -> list[str]:
        """Stop admitting requests at once when a node of this replica is leaving (any thread);
        returns the leaving nodes."""
        plan = self.plan
        if plan is None or self.driver is None:
            return []
        mine = {s.node for s in plan.ranks if plan.replica_of(s.rank) == self.replica}
        leaving = sorted(mine & self.controller.draining)
        if not leaving:
            if self.queue.closed:
                self.queue.reopen()
        elif not self.queue.closed:
            self.queue.close(f"replica {self.replica} is draining: node {','.join(leaving)} is leaving")
            self.log.info("worker.draining", gen=self.gen, replica=self.replica, nodes=leaving)
        return leaving

    def _follow_drain(self, d: Driver) -> None:
        """A node of this replica is leaving: stop admitting, and say when nothing is in flight."""
        if not self._close_if_draining():
            return
        if not d.busy and self._drained_gen < self.gen:
            try:
                mark_drained(self.runtime.client, self.runtime.keys, self.gen, self.replica, self.runtime.lease.id)
                self._drained_gen = self.gen
                self.log.info("worker.drained", gen=self.gen, replica=self.replica)
            except EtcdError as exc:
                self.log.warning("worker.drained_unpublished", error=str(exc))


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (rallyd) dies: no orphan keeps a GPU."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the daemon's stop path still kills by PID


def warm_up(device: str) -> float:
    """What a warm spare does ahead of time: CUDA contexts on this node's GPUs, and the imports a
    seat needs. Returns the seconds spent."""
    t0 = time.monotonic()
    if device.startswith("cuda") and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.zeros(1, device=f"cuda:{i}")
            torch.cuda.synchronize(i)
    import rallypoint.worker.shards  # noqa: F401  (safetensors, the model classes)
    return time.monotonic() - t0


def start_beats(channel: ChannelClient, worker: Worker, every: float = 0.5) -> None:
    """Tell rallyd, every ``every`` seconds, what this process is doing."""

    def beat() -> None:
        while not worker.stopping.is_set():
            q = worker.queue
            if not channel.send(msgs.beat(os.getpid(), worker.state, worker.gen, worker.args.local_rank,
                                          worker.replica, worker.driver is not None, q.waiting, q.running,
                                          dict(q.counts), worker.api_url, worker.role)):
                return
            worker.beat_now.wait(every)
            worker.beat_now.clear()

    threading.Thread(target=beat, name="rallypoint-beats", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.die_with_parent:
        die_with_parent()
        if os.getppid() == 1:
            return 4  # the parent died before we could ask
    configure_logging("info")
    log = get_logger("worker", node=args.node, local_rank=args.local_rank)
    handoff = SeatHandoff()
    if args.spare:
        set_title(spare_title(args.cluster, args.node, "warming up"))
    warm = warm_up(args.device) if args.spare else 0.0
    worker = Worker(args)
    def on_sigterm(*_: object) -> None:
        worker.stopping.set()
        handoff.ready.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    channel = None
    if args.channel:
        try:
            channel = ChannelClient(args.channel, msgs.SPARE if args.spare else msgs.SEAT, args.local_rank,
                                    {msgs.ADOPT: handoff.adopt})
        except OSError as exc:
            if args.spare:
                log.error("worker.no_channel", channel=args.channel, error=str(exc))
                return 5
            log.warning("worker.no_channel", channel=args.channel, error=str(exc))
    if args.spare and args.preload_shard:
        set_title(spare_title(args.cluster, args.node, "loading the model"))
        worker.preload()
    if args.spare:
        set_title(spare_title(args.cluster, args.node, "waiting for a seat"))
        log.info("worker.spare_ready", warm_up_seconds=round(warm, 3))
        handoff.ready.wait()
        if handoff.msg is None:
            return 0  # stopped while waiting
        m = handoff.msg
        worker.take_seat(int(m["local_rank"]), int(m["after_gen"]), m.get("api_port"), m.get("api_url_file"))
        log.info("worker.spare_adopted", local_rank=worker.args.local_rank, after_gen=worker.gen)
    if channel is not None:
        start_beats(channel, worker)
    code = worker.run()
    worker.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
