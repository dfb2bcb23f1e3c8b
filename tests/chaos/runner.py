"""Run scenarios (and a soak) against one deployment under load; check the invariants after each
fault; report per scenario: runs, survived, detection and kill-to-serving p50/p95, requests lost."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rallypoint.recovery import events as ev
from rallypoint.testing.daemons import wait_for
from rallypoint.testing.netns import NetLab
from tests.chaos.deployment import Deployment
from tests.chaos.invariants import check_all
from tests.chaos.load import Load
from tests.chaos.scenarios import SCENARIOS, Fault

DETECTED = (ev.RANK_FAILED, ev.SUSPECT_NAMED, ev.ABORT_ORDERED)


@dataclass
class RunResult:
    scenario: str
    note: str
    survived: bool
    detection: float | None  # seconds from the fault to the first failure event
    to_serving: float | None  # seconds from the fault to serving again
    requests: int
    lost: int
    resumed: int
    problems: list[str] = field(default_factory=list)
    # requests: start, end (from the fault), resumes
    timeline: list[tuple[float, float, int]] = field(default_factory=list)
    in_flight: int = 0  # requests sent before the fault that finished after it


def until(condition: Callable[[], object], timeout: float, every: float = 0.1) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False): for waits whose
    failure the invariants report afterwards, not by raising here."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@dataclass
class Chaos:
    """One deployment, a load on it, and the faults run so far."""

    deployment: Deployment
    load: Load
    results: list[RunResult] = field(default_factory=list)
    log: Callable[[str], None] = print

    @classmethod
    def start(cls, root: Path, nodes: int = 3, clients: int = 3, seed: int = 0, gpus: int = 0,
              log=print, arch: str = "llama", lab: NetLab | None = None, ep: str = "tp", pd: bool = False) -> Chaos:
        d = Deployment(root, nodes=nodes, gpus=gpus, arch=arch, lab=lab, ep=ep, pd=pd,
                       tp=1 if ep == "dp" or pd else 2).start()
        if d.wait_serving(120) is None:
            raise RuntimeError(f"the deployment never served; logs in {root}")
        load = Load(d.gateways, clients=clients, seed=seed)
        load.make_reference()
        load.start()
        return cls(d, load, log=log)

    def run(self, name: str, rng: random.Random) -> RunResult:
        d = self.deployment
        # The fault is to strike requests mid-stream (the run counts those it did: in_flight).
        wait_for("a request streaming before the fault", self.load.mid_stream, timeout=60, every=0.02)
        t_window = time.time()
        fault: Fault = SCENARIOS[name](d, rng)
        if fault.restore_first:
            fault.restore()
        back = d.wait_serving(120, after_gen=fault.gen_before if fault.replan else 0)
        fault.restore()
        serving_end = d.wait_serving(120) is not None
        # The requests sent before now (during the fault and the recovery) finish, to be checked;
        # one that never does is reported by the invariants (nothing_stuck).
        cutoff = time.time()
        until(lambda: all(t0 > cutoff for t0 in list(self.load.in_flight.values())), timeout=30)
        # on a slow host: until one request has finished since the fault
        until(lambda: any(o.finished >= fault.at for o in list(self.load.outcomes)), timeout=30, every=0.2)
        first = [e.at for e in d.events() if e.at >= fault.at - 0.05 and (
            e.kind in DETECTED or (e.kind == ev.PLAN_WRITTEN and e.gen > fault.gen_before))]
        outcomes = self.load.since(t_window)
        problems = fault.problems + fault.after() + check_all(d, self.load, fault, outcomes,
                                                             serving_end and back is not None)
        r = RunResult(name, fault.note, not problems, round(min(first) - fault.at, 3) if first else None,
                      round(back - fault.at, 3) if back else None, len(outcomes),
                      len(self.load.lost(outcomes)), sum(o.resumes for o in outcomes), problems,
                      [(round(o.started - fault.at, 2), round(o.finished - fault.at, 2), o.resumes) for o in outcomes],
                      in_flight=sum(1 for o in outcomes if o.started <= fault.at <= o.finished))
        self.results.append(r)
        slowest = max((o.finished - o.started for o in outcomes), default=0.0)
        restarted = [f"rallyd of {n} exited with code {c} on its own and was restarted (Restart=on-failure)"
                     for at, n, c in d.restarted_on_failure if at >= t_window]
        self.log(f"{name:<20} {'survived' if r.survived else 'FAILED':<9} detection {r.detection}s  "
                 f"serving after {r.to_serving}s  requests {r.requests} ({r.in_flight} in flight at the fault, "
                 f"resumed {r.resumed}, slowest {slowest:.1f}s) lost {r.lost}  ({fault.note})"
                 + "".join(f"\n    - {p}" for p in problems) + "".join(f"\n    . {x}" for x in restarted))
        return r

    def soak(self, seconds: float, mtbf: float, rng: random.Random, names: tuple[str, ...],
             stop_by: float = float("inf")) -> None:
        """Random faults from ``names``, exponentially spaced with mean ``mtbf``, for ``seconds``
        (no new fault after the monotonic time ``stop_by``)."""
        end = min(time.monotonic() + seconds, stop_by)
        while time.monotonic() < end:
            # deliberate: the time between faults is the point (exponential, mean mtbf)
            time.sleep(min(rng.expovariate(1.0 / mtbf), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            r = self.run(rng.choice(names), rng)
            r.scenario = f"soak:{r.scenario}"

    def stop(self) -> list[str]:
        """Stop the load and the deployment; return leftover processes (there must be none)."""
        self.load.stop()
        self.deployment.stop()
        until(lambda: not self.deployment.processes(), timeout=10, every=0.1)  # killed ones take a moment
        return [f"pid {p.pid} left running" for p in self.deployment.processes()]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


def report(results: list[RunResult]) -> tuple[str, list[dict]]:
    """The table (text) and its rows (for JSON)."""
    rows = []
    for name in dict.fromkeys(r.scenario for r in results):
        rs = [r for r in results if r.scenario == name]
        det = [r.detection for r in rs if r.detection is not None]
        srv = [r.to_serving for r in rs if r.to_serving is not None]
        rows.append({"scenario": name, "runs": len(rs), "survived": sum(r.survived for r in rs),
                     "detection_p50": pct(det, 50), "detection_p95": pct(det, 95),
                     "to_serving_p50": pct(srv, 50), "to_serving_p95": pct(srv, 95),
                     "requests": sum(r.requests for r in rs), "lost": sum(r.lost for r in rs),
                     "resumed": sum(r.resumed for r in rs)})
    head = ["scenario", "runs", "survived", "detect p50", "detect p95", "serving p50", "serving p95",
            "requests", "lost"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {r['scenario']} | {r['runs']} | {r['survived']} | {f(r['detection_p50'])} | "
              f"{f(r['detection_p95'])} | {f(r['to_serving_p50'])} | {f(r['to_serving_p95'])} | "
              f"{r['requests']} | {r['lost']} |" for r in rows]
    return "\n".join(lines), rows


def write_json(path: Path, results: list[RunResult], rows: list[dict], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "summary": rows, "runs": [asdict(r) for r in results]}, indent=1))
