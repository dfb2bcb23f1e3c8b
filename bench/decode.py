"""Decode throughput: rallypoint's serving engine at TP=1 and TP=2 vs Hugging Face ``generate``.

All three run in one invocation on the same checkpoint directory (``--model``; a seeded random
``1b`` Llama is written there first when the directory has no ``config.json``), one after the other,
each in its own spawned process(es), so they never share a GPU at the same time:

* rallypoint TP=N (``--tp 1 2``): N processes (rank r on cuda:r), each a ``RankRuntime`` whose
  groups are built over a real etcd (started here on free loopback ports) exactly as the worker does
  it: a ``Plan`` with tp=N, ``RankRuntime.configure``, ``load_stage(..., comm=TPAdapter(runtime))``,
  ``setup_cache(max_batch, max_seq)``. The driver rank (TP rank 0) owns a ``RequestQueue`` and a
  ``Driver`` and runs the engine's ``plan -> step -> done`` loop (``engine.serve_generation``'s
  driver loop minus its idle sleep, plus a timestamp per produced token); the other ranks run
  ``serve_generation(..., driver=None)``, the worker's own loop, stepping until the driver's SWITCH
  step ends the run. Collective deadlines: ``--deadline-floor`` (10 s) instead of the worker's 1 s,
  so a slow first CUDA/NCCL call cannot trip the watchdog; it does not change the step path.
* transformers: ``LlamaForCausalLM.from_pretrained(DIR)`` on cuda:0 in ``--dtype``, then
  ``generate(input_ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)`` with a streamer that
  timestamps every step. The checkpoint's EOS id is cleared from the generation config so that
  greedy decoding is never altered (``min_new_tokens`` would otherwise mask EOS) and both sides pick
  the plain argmax. Skipped with a note when ``transformers`` is not importable.

For every batch size B (``--batch 1 8``), B greedy requests of ``--prompt-len`` byte tokens are
submitted together and each produces ``--new-tokens`` tokens. Measured, after one warm-up run of
every batch size (8 tokens):

* TTFT (all B) = submit -> every row has its first token (rallypoint prefills requests one per
  step, so at B=8 this is 8 prefill steps; transformers prefills the batch in one forward);
* decode tok/s = B x (N - 1) tokens / (last token - the moment every row had its first token):
  decode steps only, prefill excluded; ms/step = that window / (N - 1).

Also reported: how many leading greedy tokens rallypoint TP=1 shares with transformers at B=1
(bf16 may legitimately diverge after a while), and TP=2 with TP=1. Prints a table; ``--json``.

    source .carry/on-gpu.sh && python bench/decode.py --model /tmp/rp-1b --json bench/decode.json
    python bench/decode.py --device cpu --size tiny --model /tmp/rp-tiny --dtype float32 \\
        --new-tokens 16 --prompt-len 8 --batch 1 4          # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp

from rallypoint.worker.checkpoint import SIZES, make_model
from rallypoint.worker.model_config import ModelConfig

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")

WARMUP_TOKENS = 8
TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
        b"age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
        b"season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
        b"of despair, we had everything before us, we had nothing before us. ")


def prompts(b: int, s: int) -> list[list[int]]:
    """``b`` distinct prompts of ``s`` byte ids (row i starts 11*i bytes into the text)."""
    text = TEXT * (1 + (11 * b + s) // len(TEXT))
    return [list(text[11 * i:11 * i + s]) for i in range(b)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(b: int, n: int, t_submit: float, stamps: list[list[float]], tokens: list[list[int]]) -> dict[str, Any]:
    """Timings of one batch from each row's token timestamps (``perf_counter`` seconds)."""
    first = [s[0] for s in stamps]
    t_first_all, t_last = max(first), max(s[-1] for s in stamps)
    decode_tokens = sum(len(s) - 1 for s in stamps)
    window = t_last - t_first_all
    return {"batch": b, "new_tokens": n, "ttft_all_s": t_first_all - t_submit,
            "ttft_mean_s": statistics.mean(first) - t_submit, "decode_s": window,
            "decode_tokens": decode_tokens, "decode_tok_s": decode_tokens / window if window > 0 else float("nan"),
            "ms_per_step": 1e3 * window / max(1, n - 1), "tokens": tokens}


# -- rallypoint --------------------------------------------------------------------------------

def rp_rank(rank: int, tp: int, endpoints: list[str], args: argparse.Namespace, out: str, barrier: Any) -> None:
    """One rank of a rallypoint replica (TP=tp, PP=1), wired like ``rallypoint.worker.main.Worker``."""
    from rallypoint.log import configure_logging
    from rallypoint.protocol.grid import layers_for
    from rallypoint.rendezvous.etcd import EtcdSettings
    from rallypoint.rendezvous.records import Plan, RankSlot
    from rallypoint.worker.engine import SWITCH, Driver, EngineSettings, serve_generation, step
    from rallypoint.worker.main import TPAdapter
    from rallypoint.worker.requests import Request, RequestQueue, SamplingParams
    from rallypoint.worker.runtime import RankRuntime, RuntimeSettings
    from rallypoint.worker.shards import load_stage

    configure_logging("warning", json=False)
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    rt = RankRuntime(RuntimeSettings(
        cluster=f"bench-decode-tp{tp}-{os.getppid()}", device=args.device, deadline_floor=args.deadline_floor,
        etcd=EtcdSettings(endpoints=tuple(endpoints), request_timeout=2.0, retry_deadline=10.0),
        group_names=("tp", "pp")))
    plan = Plan(gen=1, tp=tp, pp=1, dp=1, ranks=tuple(RankSlot(i, "n", i) for i in range(tp)),
                members=("n",), reason="bench", leader="bench")
    t0 = time.perf_counter()
    groups = rt.configure(plan, "n", rank)
    t_groups = time.perf_counter() - t0
    device = rt.device
    config = ModelConfig.from_dir(args.model)
    settings = EngineSettings(max_batch=max(args.batch), max_seq=args.max_seq)
    t0 = time.perf_counter()
    model = load_stage(args.model, config, groups.tp_rank, groups.tp_size,
                       layers_for(config.num_hidden_layers, groups.pp_rank, groups.pp_size),
                       first=groups.is_first_stage, last=groups.is_last_stage, device=device,
                       dtype=getattr(torch, args.dtype), comm=TPAdapter(rt))
    model.setup_cache(settings.max_batch, settings.max_seq)
    sync(device)
    t_load = time.perf_counter() - t0
    graphs = None
    t_compile = 0.0
    if args.graphs_on and tp == 1 and device.type == "cuda":
        from rallypoint.worker.graphs import DecodeGraphs
        graphs = DecodeGraphs(model, settings.max_batch, settings.max_seq, device, compile=args.compile_on)
        t_compile = graphs.compile_seconds
    comm, mb = rt.comm, settings.max_batch
    assert comm is not None
    try:
        if groups.is_first_stage and groups.tp_rank == 0:
            queue = RequestQueue(capacity=4 * mb)
            driver = Driver(queue, settings, device)

            def run(b: int, n: int) -> dict[str, Any]:
                reqs = [Request(prompt=p, params=SamplingParams(max_tokens=n, temperature=0.0, stop_at_eos=False))
                        for p in prompts(b, args.prompt_len)]
                stamps: dict[str, list[float]] = {r.id: [] for r in reqs}
                sync(device)
                t_submit = time.perf_counter()
                for r in reqs:
                    queue.submit(r)
                if args.overlap_on:  # the worker's loop: next decode step launched before reading this one
                    made = dict.fromkeys(stamps, 0)

                    def stamp() -> bool:
                        now = time.perf_counter()
                        for r in reqs:
                            k = len(r.committed) + len(r.pending)
                            stamps[r.id] += [now] * (k - made[r.id])
                            made[r.id] = k
                        return not driver.busy

                    serve_generation(model, comm, groups, settings, device, driver, stamp, graphs)
                while driver.busy:
                    hdr, tokens, produced = driver.plan()
                    hdr, nxt = step(model, comm, groups, mb, device, hdr, tokens, graphs)
                    if int(hdr[0]) == SWITCH:
                        raise RuntimeError("unexpected SWITCH step")
                    driver.done(produced, nxt)  # nxt.tolist() in there: the token is on the host now
                    now = time.perf_counter()
                    for _, r in produced:
                        stamps[r.id].append(now)
                for r in reqs:
                    if r.error or len(r.committed) != n or len(stamps[r.id]) != n:
                        raise RuntimeError(f"request {r.id}: {len(r.committed)} tokens committed, "
                                           f"{len(stamps[r.id])} produced, want {n} (error: {r.error})")
                return summarize(b, n, t_submit, [stamps[r.id] for r in reqs], [list(r.committed) for r in reqs])

            for b in sorted(set(args.batch)):
                run(b, min(WARMUP_TOKENS, args.new_tokens))
            rows = [run(b, args.new_tokens) for b in args.batch]
            driver.switch_to = 2  # the SWITCH step takes every rank out of its loop
            hdr, tokens, _ = driver.plan()
            step(model, comm, groups, mb, device, hdr, tokens)
            Path(out).write_text(json.dumps({"rows": rows, "groups_s": t_groups, "load_s": t_load,
                                             "device": str(device), "max_seq": settings.max_seq,
                                             "graphs": len(graphs.graphs) if graphs else 0,
                                             "capture_s": graphs.capture_seconds if graphs else 0.0,
                                             "compile_s": t_compile}))
        else:  # exactly the worker's non-driver loop: step until the driver's SWITCH
            serve_generation(model, comm, groups, settings, device, None)
    finally:
        try:  # every rank is out of its last step before anyone aborts the groups
            barrier.wait(timeout=60)
        except Exception:
            pass
        try:
            rt.close()
        except Exception as exc:
            print(f"rank {rank}: runtime close: {exc!r}", file=sys.stderr)


# -- transformers ------------------------------------------------------------------------------

class StampStreamer:
    """A ``generate`` streamer that records when each step's tokens reached the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:  # the prompt first, then one call per new step
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_proc(_: int, args: argparse.Namespace, out: str, mode: str = "eager") -> None:
    """``generate()`` eager, or (``mode="static"``) with a static KV cache, with which transformers
    compiles the decode forward itself (its ``CompileConfig``: CUDA graphs) on a GPU: its own fast path."""
    from transformers import LlamaForCausalLM

    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    try:
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype)
    except TypeError:  # older transformers
        model = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    sync(device)
    t_load = time.perf_counter() - t0
    # No EOS: greedy must be the plain argmax on both sides (min_new_tokens would mask EOS).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if mode == "static":
        model.generation_config.cache_implementation = "static"  # generate() then compiles the forward

    @torch.inference_mode()
    def run(b: int, n: int) -> dict[str, Any]:
        ids = torch.tensor(prompts(b, args.prompt_len), dtype=torch.int64, device=device)
        st = StampStreamer()
        sync(device)
        t_submit = time.perf_counter()
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, streamer=st)
        sync(device)
        new = gen[:, ids.shape[1]:].tolist()
        if len(new[0]) != n or len(st.times) != n + 1:
            raise RuntimeError(f"generate made {len(new[0])} tokens in {len(st.times) - 1} streamed steps, want {n}")
        steps = st.times[1:]  # one stamp per step, shared by every row
        return summarize(b, n, t_submit, [steps] * b, new)

    for b in sorted(set(args.batch)):  # a static cache is sized by the run: warm up at the real length
        run(b, args.new_tokens if mode == "static" else min(WARMUP_TOKENS, args.new_tokens))
    rows = [run(b, args.new_tokens) for b in args.batch]
    import transformers
    Path(out).write_text(json.dumps({"rows": rows, "load_s": t_load, "device": str(device),
                                     "transformers": transformers.__version__,
                                     "attn_implementation": getattr(model.config, "_attn_implementation", None)}))


# -- orchestration -----------------------------------------------------------------------------

def run_procs(fn: Any, nprocs: int, fn_args: tuple, timeout: float) -> None:
    """``mp.spawn`` with a deadline: processes still alive after ``timeout`` s are killed."""
    ctx = mp.start_processes(fn, args=fn_args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):  # raises if a process failed (and terminates the rest)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} x{nprocs} still running after {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def table(results: dict[str, dict], args: argparse.Namespace, config: ModelConfig) -> str:
    lines = [f"decode: {args.model} ({config.num_params() / 1e6:.1f} M params, {args.dtype}), prompt {args.prompt_len} "
             f"byte tokens, {args.new_tokens} new tokens, greedy, device {args.device}",
             "TTFT = submit -> every row has its first token; decode tok/s = B*(N-1) / (last token - that moment)"]
    floor_ms = 1e3 * config.num_params() * getattr(torch, args.dtype).itemsize / (args.peak_gbs * 1e9)
    lines.append(f"bandwidth floor: {floor_ms:.3f} ms/step (every weight read once per step at {args.peak_gbs:g} GB/s)")
    head = f"{'engine':<40} {'B':>3} | {'TTFT ms':>9} {'decode tok/s':>13} {'ms/step':>8} {'x floor':>8}"
    lines += [head, "-" * len(head)]
    for b in args.batch:
        for name, res in results.items():
            if "error" in res or "skipped" in res:
                continue
            row = next(r for r in res["rows"] if r["batch"] == b)
            lines.append(f"{name:<40} {b:>3} | {1e3 * row['ttft_all_s']:9.1f} {row['decode_tok_s']:13.1f} "
                         f"{row['ms_per_step']:8.2f} {row['ms_per_step'] / floor_ms:8.1f}")
    for name, res in results.items():
        if "rows" in res:
            extra = (f", transformers {res['transformers']}, attention {res['attn_implementation']}"
                     if "transformers" in res else f", groups built in {res['groups_s']:.2f} s, max_seq {res['max_seq']}"
                     + (f", {res['graphs']} CUDA graphs captured in {res['capture_s']:.2f} s" if res.get("graphs") else "")
                     + (f", compiled in {res['compile_s']:.1f} s" if res.get("compile_s") else ""))
            lines.append(f"{name}: on {res['device']}, weights loaded in {res['load_s']:.2f} s{extra}")
        elif "error" in res:
            lines.append(f"{name}: FAILED: {res['error'].strip().splitlines()[-1]}")
        elif "skipped" in res:
            lines.append(f"{name}: skipped: {res['skipped']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "rallypoint-bench-1b")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES), help="size to write when --model has none")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--graphs", nargs="+", default=["off", "on", "compiled", "overlapped"],
                    choices=("off", "on", "compiled", "overlapped"),
                    help="rallypoint eager, with CUDA-graph decode (TP=1 on a GPU), with graphs of "
                         "torch.compiled layers, and those with the next step launched before this one's "
                         "tokens are read (the worker's TP=1 loop); any of them")
    ap.add_argument("--hf", nargs="+", default=["eager", "static"], choices=("eager", "static"),
                    help="transformers generate() eager, and with a static cache and torch.compile")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-seq", type=int, default=0, help="KV-cache length (default prompt + new tokens)")
    ap.add_argument("--deadline-floor", type=float, default=10.0, help="collective deadline floor, s")
    ap.add_argument("--phase-timeout", type=float, default=240.0, help="seconds per engine before its processes are killed")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="memory bandwidth for the floor (H200: 4,800 GB/s)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.max_seq = args.max_seq or args.prompt_len + args.new_tokens
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode excludes the first token)")
    if not (args.model / "config.json").exists():
        t0 = time.perf_counter()
        make_model(args.model, args.size, seed=0)
        print(f"wrote a seeded random {args.size} model to {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    config = ModelConfig.from_dir(args.model)

    from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary

    results: dict[str, dict] = {}
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    work = Path(tempfile.mkdtemp(prefix="rallypoint-bench-decode-"))
    with EtcdCluster(1) if etcd_binary() else _NoEtcd() as etcd:
        variants = [(tp, g) for tp in args.tp for g in args.graphs
                    if g == "off" or (tp == 1 and (args.device == "cuda" or g == "overlapped"))]
        for tp, g in variants:
            name = f"rallypoint TP={tp}" + {"off": "", "on": " graphs", "compiled": " graphs+compile",
                                            "overlapped": " graphs+compile+overlap"}[g]
            args.graphs_on, args.compile_on = g != "off", g in ("compiled", "overlapped")
            args.overlap_on = g == "overlapped"
            if etcd is None:
                results[name] = {"skipped": INSTALL_HINT}
                continue
            if args.device == "cuda" and tp > gpus:
                results[name] = {"skipped": f"needs {tp} GPUs, {gpus} visible"}
                continue
            out = work / f"tp{tp}.json"
            barrier = mp.get_context("spawn").Barrier(tp)
            t0 = time.perf_counter()
            try:
                run_procs(rp_rank, tp, (tp, list(etcd.endpoints), args, str(out), barrier), args.phase_timeout)
                results[name] = json.loads(out.read_text())
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        import transformers  # noqa: F401
        have_hf = not args.no_hf
    except ImportError:
        have_hf = False
    for mode in args.hf:
        name = "transformers" + ("" if mode == "eager" else " static+compile")
        if not have_hf:
            results[name] = {"skipped": "--no-hf" if args.no_hf else "transformers is not importable"}
            print(f"note: {name} skipped ({results[name]['skipped']})")
            continue
        out = work / f"hf-{mode}.json"
        t0 = time.perf_counter()
        try:
            run_procs(hf_proc, 1, (args, str(out), mode), args.phase_timeout)
            results[name] = json.loads(out.read_text())
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)

    for name, res in results.items():
        if "error" in res:
            print(f"--- {name} failed:\n{res['error']}", file=sys.stderr)
    print(table(results, args, config))
    # greedy agreement, B=1 (and every row of every batch, in the JSON)
    agree: dict[str, Any] = {}
    ok = {k: v for k, v in results.items() if "rows" in v}
    pairs = [("rallypoint TP=1", "transformers"), ("rallypoint TP=1", "rallypoint TP=1 graphs"),
             ("rallypoint TP=1", "rallypoint TP=1 graphs+compile"),
             ("rallypoint TP=1 graphs+compile", "rallypoint TP=1 graphs+compile+overlap"),
             ("rallypoint TP=1", "rallypoint TP=1 graphs+compile+overlap"),
             ("transformers", "transformers static+compile")] + [
        ("rallypoint TP=1", f"rallypoint TP={tp}") for tp in args.tp if tp != 1]
    for a, b in pairs:
        if a in ok and b in ok:
            per_batch = {}
            for ra, rb in zip(ok[a]["rows"], ok[b]["rows"]):
                per_batch[ra["batch"]] = [leading_equal(x, y) for x, y in zip(ra["tokens"], rb["tokens"])]
            agree[f"{a} vs {b}"] = per_batch
            if 1 in per_batch:
                print(f"greedy B=1, {a} vs {b}: {per_batch[1][0]}/{args.new_tokens} leading tokens equal")
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if args.device == "cuda" and gpus else "cpu",
            "model": str(args.model), "params": config.num_params(), "dtype": args.dtype, "batch": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "max_seq": args.max_seq,
            "warmup_tokens": min(WARMUP_TOKENS, args.new_tokens), "tp": args.tp,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" and gpus else None}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "leading_equal": agree}, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


class _NoEtcd:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
