"""Every etcd key rallypoint uses, and how long each one lives.

All keys sit under ``/rallypoint/<cluster>/``; every generation in a key is zero-padded to
``GEN_WIDTH`` digits so that keys sort by generation. The lifetimes, in short (each method says its
own): *leased* keys vanish with their writer's lease; *pruned* keys are deleted by the leader
(``recovery.retention.prune_history``: the generations more than ``[rendezvous] keep_generations``
(100) before the newest released one; a taint also has to be that old, see ``taint``); the rest are *permanent* until someone
named deletes them, or forever. ``ClusterKeys.older_than`` lists the pruned ranges; leased keys of
a generation are in it too (a daemon or worker that lives long would keep every one on its lease).

    nodes/<node>                       NodeRecord                    leased (the node's rallyd)
    acks/<gen>/<node>                  node holds plan <gen>         leased (the node's rallyd), pruned
    control/spec                       ClusterSpec                   permanent, create-only
    control/leader                     leader's node id              leased (the leader)
    control/gen                        current generation            permanent, CAS only
    control/plans/<gen>                Plan                          pruned by the leader
    control/released/<gen>             workers may build <gen>       pruned by the leader
    control/replan/<gen>               <gen> lost a rank             pruned by the leader
    control/left/<node>                <node> left cleanly           deleted by the leader / the node
    control/draining/<node>            <node> is leaving             leased (rallyd) or deleted (rallyctl)
    control/cordoned/<node>            no ranks on <node>            until ``rallyctl uncordon``
    control/kill/<node>/<local>        a drill's signal              deleted by <node>'s rallyd
    control/abort/<gen>/<ranks>        abort order                   pruned by the leader
    status/nodes/<node>                what <node>'s rallyd saw      leased (the node's rallyd)
    status/recovery                    the recovery phase            permanent, overwritten by the leader
    status/progress/<seat>             a rank's collective progress  leased (the worker)
    status/diagnosis/<gen>/<seat>      a watchdog's verdict          leased (the worker), pruned
    status/aborted/<gen>/<group>       a group was aborted (taint)   pruned by the leader
    status/drained/<gen>/<replica>     a replica drained             leased (the driver), pruned
    events/<gen>/<time>-<by>-<kind>    recovery events               pruned by the leader
    store/<gen>/<group>/...            torch.distributed.Store keys  leased (arrivals not), pruned by the leader

A seat (``node/local_rank``) inside a key is written ``node:local_rank``, one path segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from rallypoint.errors import MalformedRecord

GEN_WIDTH = 10


def seat_segment(seat: str) -> str:
    """``node/local_rank`` as one key segment, ``node:local_rank``."""
    return seat.replace("/", ":")


def gen_from_key(key: str) -> int:
    """The generation number at the end of a ``plans/``, ``released/`` or ``acks/<gen>/`` key."""
    parts = key.rstrip("/").split("/")
    for part in reversed(parts):
        if part.isdigit():
            return int(part)
    raise MalformedRecord(key, "no generation number in the key")


def _gen(gen: int) -> str:
    return f"{gen:0{GEN_WIDTH}d}"


@dataclass(frozen=True)
class ClusterKeys:
    """Key paths of one cluster. A property ending in ``/`` is a prefix to watch or list."""

    cluster: str

    @property
    def root(self) -> str:
        return f"/rallypoint/{self.cluster}/"

    # -- membership --------------------------------------------------------------------------

    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    def node(self, node: str) -> str:
        """``NodeRecord`` of ``node``; on its rallyd's lease, so it goes when the daemon does."""
        return self.nodes + node

    @property
    def acks(self) -> str:
        return self.root + "acks/"

    def acks_of(self, gen: int) -> str:
        return f"{self.acks}{_gen(gen)}/"

    def ack(self, gen: int, node: str) -> str:
        """``node`` holds plan ``gen``; on that node's lease (an ack of a dead node must not count),
        pruned by the leader with its generation (a daemon's lease lives as long as it does)."""
        return self.acks_of(gen) + node

    # -- control: what the cluster agrees on -------------------------------------------------

    @property
    def control(self) -> str:
        """Every worker and daemon watches this prefix; keep what they need to follow under it."""
        return self.root + "control/"

    @property
    def spec(self) -> str:
        """``ClusterSpec``; written once by the first daemon (create-only) and kept forever."""
        return self.control + "spec"

    @property
    def leader(self) -> str:
        """The leader's node id; create-only, on the leader's lease: it goes when the leader does."""
        return self.control + "leader"

    @property
    def gen(self) -> str:
        """The current generation (decimal); permanent, moved only by the leader's CAS."""
        return self.control + "gen"

    @property
    def plans(self) -> str:
        return self.control + "plans/"

    def plan(self, gen: int) -> str:
        """Plan of ``gen``; written once by the leader, pruned by the leader once it is older
        than the window (never the newest released plan, nor a newer one)."""
        return self.plans + _gen(gen)

    @property
    def released(self) -> str:
        return self.control + "released/"

    def released_of(self, gen: int) -> str:
        """Every member acked ``gen``: workers may build its groups. Create-only, pruned with its
        plan."""
        return self.released + _gen(gen)

    @property
    def replans(self) -> str:
        return self.control + "replan/"

    def replan_of(self, gen: int) -> str:
        """``gen`` lost a rank: the leader writes the next plan. Create-only (the first reason
        wins), no lease (the request must outlive its writer); pruned by the leader with its
        generation (the leader acts only on the current generation's request)."""
        return self.replans + _gen(gen)

    @property
    def left(self) -> str:
        return self.control + "left/"

    def left_of(self, node: str) -> str:
        """``node`` left cleanly: re-plan at once, no grace period. No lease (it is written just
        before the lease is revoked); the leader deletes it once a plan leaves the node out, and
        the node deletes it when it joins again."""
        return self.left + node

    @property
    def draining(self) -> str:
        return self.control + "draining/"

    def draining_of(self, node: str) -> str:
        """``node`` is leaving: its replicas stop admitting and finish what is in flight. rallyd
        writes it on its lease; ``rallyctl drain`` writes it without one and deletes it when done;
        the node deletes it when it joins again."""
        return self.draining + node

    @property
    def cordoned(self) -> str:
        return self.control + "cordoned/"

    def cordoned_of(self, node: str) -> str:
        """An operator cordoned ``node``: no ranks are placed there. Permanent until
        ``rallyctl uncordon`` deletes it."""
        return self.cordoned + node

    @property
    def kills(self) -> str:
        return self.control + "kill/"

    def kills_of(self, node: str) -> str:
        """The drills ``node``'s rallyd watches."""
        return f"{self.kills}{node}/"

    def kill(self, node: str, local_rank: int) -> str:
        """A drill: ``node``'s rallyd sends the signal named in the value to that seat's worker,
        then deletes the key. No lease."""
        return f"{self.kills_of(node)}{local_rank}"

    @property
    def aborts(self) -> str:
        return self.control + "abort/"

    def aborts_of(self, gen: int) -> str:
        return f"{self.aborts}{_gen(gen)}/"

    def abort(self, gen: int, ranks: list[int] | tuple[int, ...]) -> str:
        """Abort order (``orders.AbortOrder``): ``gen``'s workers abort the groups holding
        ``ranks`` (``all`` when none). Written by a daemon, no lease; pruned by the leader with
        its generation: a worker applies only orders it sees on its watch, never replayed ones."""
        return f"{self.aborts_of(gen)}{'-'.join(map(str, ranks)) or 'all'}"

    # -- status: what each party reports -----------------------------------------------------

    @property
    def node_status(self) -> str:
        return self.root + "status/nodes/"

    def node_status_of(self, node: str) -> str:
        """What ``node``'s rallyd last saw of itself and its workers, about once a second; on its
        lease."""
        return self.node_status + node

    @property
    def recovery(self) -> str:
        """The cluster's recovery phase (``RecoveryMachine.state()``); the leader overwrites it,
        nobody deletes it."""
        return self.root + "status/recovery"

    @property
    def progress(self) -> str:
        return self.root + "status/progress/"

    def progress_of(self, seat: str) -> str:
        """``seat``'s collective progress and heartbeat (``comm.diagnosis.ProgressBoard``); on the
        worker's lease, so a dead rank's record goes with it (which is how it is diagnosed dead)."""
        return self.progress + seat_segment(seat)

    @property
    def diagnoses(self) -> str:
        return self.root + "status/diagnosis/"

    def diagnoses_of(self, gen: int) -> str:
        return f"{self.diagnoses}{_gen(gen)}/"

    def diagnosis(self, gen: int, seat: str) -> str:
        """The verdict ``seat``'s watchdog reached on a tripped collective of ``gen``; on the
        worker's lease, pruned by the leader with its generation. The daemon of each suspect
        follows the prefix."""
        return f"{self.diagnoses_of(gen)}{seat_segment(seat)}"

    @staticmethod
    def diagnosis_seat(key: str) -> str:
        """The seat (``node/local_rank``) that wrote the diagnosis under ``key``."""
        return key.rsplit("/", 1)[-1].replace(":", "/", 1)

    @property
    def taints(self) -> str:
        return self.root + "status/aborted/"

    def taints_of(self, gen: int) -> str:
        return f"{self.taints}{_gen(gen)}/"

    def taint(self, gen: int, group: str) -> str:
        """A member aborted ``group`` (its store key, ``tp-2.3``) built in ``gen``: the others
        abort their side and rebuild it rather than carry it over. No lease. ``gen`` is the
        generation the group was *built* in, which a carried-over group outlives: the leader
        prunes a taint only when its generation is out of the window *and* it was written before
        the window's oldest generation was released."""
        return f"{self.taints_of(gen)}{group}"

    @property
    def drained(self) -> str:
        return self.root + "status/drained/"

    def drained_of(self, gen: int) -> str:
        return f"{self.drained}{_gen(gen)}/"

    def drained_replica(self, gen: int, replica: int) -> str:
        """``replica``'s driver has nothing in flight after a drain; on the driver's lease, pruned
        by the leader with its generation."""
        return f"{self.drained_of(gen)}{replica}"

    # -- history and group bootstrap ---------------------------------------------------------

    @property
    def events(self) -> str:
        return self.root + "events/"

    def events_of(self, gen: int) -> str:
        return f"{self.events}{_gen(gen)}/"

    def event(self, gen: int, at: float, by: str, kind: str) -> str:
        """One recovery event (``recovery.events.Event``), named so that a generation's events sort
        by time. No lease; pruned by the leader with its generation."""
        return f"{self.events_of(gen)}{int(at * 1e9):020d}-{seat_segment(by)}-{kind}"

    @property
    def stores(self) -> str:
        """The group stores of every generation: ``store/<gen>/<group>/``."""
        return self.root + "store/"

    def store(self, gen: int) -> str:
        return f"{self.stores}{_gen(gen)}/"

    def group_store(self, gen: int, group: str) -> str:
        """Where ``group``'s ``torch.distributed.Store`` keeps its keys in ``gen``: the generation
        fences them, so a process of ``gen`` never touches the next one's. Keys ride the writer's
        lease but for build arrivals (no lease); pruned by the leader with its generation."""
        return f"{self.store(gen)}{group}/"

    # -- retention ---------------------------------------------------------------------------

    def older_than(self, gen: int) -> dict[str, tuple[str, str]]:
        """Every generation-keyed record of a generation before ``gen``, as the key range
        ``[start, end)`` of each kind: what the leader prunes. Keys sort by generation, so one
        range per kind holds them all (and no key that is not generation-keyed)."""
        return {
            "acks": (self.acks, self.acks_of(gen)),
            "plans": (self.plans, self.plan(gen)),
            "released": (self.released, self.released_of(gen)),
            "replans": (self.replans, self.replan_of(gen)),
            "aborts": (self.aborts, self.aborts_of(gen)),
            "taints": (self.taints, self.taints_of(gen)),
            "diagnoses": (self.diagnoses, self.diagnoses_of(gen)),
            "drained": (self.drained, self.drained_of(gen)),
            "events": (self.events, self.events_of(gen)),
            "stores": (self.stores, self.store(gen)),
        }
