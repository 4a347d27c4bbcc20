"""`python -m tiersched.bench engine [--json]`: engine-tier decision latency and burst balance.

Measured in one run, on one synthetic shared-prefix workload (no data files needed):
- decision latency of ScoreDispatcher.pick at 8 and 32 ranks with a prefix index held at ~100k (rank, page)
  entries (each rank's KV capacity set so the index stays there), page keys computed before the timer and packed
  as the adapter hands them over (PageKeys),
- upstream's own TOTAL_TOKENS selection (`DPBudget.dispatch` from sglang.srt.managers.data_parallel_controller,
  called in-process) on the same requests, or its copy tiersched.core.engine.upstream.TotalTokensDispatcher (the
  one the simulator runs) when sglang cannot be imported,
  (wall clock per decision; `decision_p99_cpu_us_*` is the same on the thread's CPU clock, which leaves out time
  the OS gave to other processes),
  `decision_*` times `decide` (prefix match, scores, choice, optimistic charge), `request_cost_*` decide + settle
  (the prefix-index insert and eviction that the adapter runs after sending the request),
- the adapter's per-request path for 8k-token prompts at 32 ranks: the decision = `to_dispatch_request` (what the
  DP controller hook runs on upstream's TokenizedGenerateReqInput; lazy page keys, nothing hashed yet) + `decide`
  (page hashing of the prompt as far as the prefix match needs, match, scores, choice, charge); the request's whole
  cost = the decision + `settle` (hashing the remaining pages, index insert and eviction, which the adapter runs
  after the request is sent); against upstream's DPBudget.dispatch on the same requests; hashing all of the
  prompt's pages, timed on its own; and the least any hash over the prompt costs from a Python list
  (`hash(tuple(ids))`: one C-level pass touching each token once),
- burst balance: 1,000 requests arriving within 50 ms over 8 ranks while every snapshot read returns the
  pre-burst one (the stale-snapshot case upstream's 20 ms refresh throttle describes); work per rank = prompt
  tokens it must prefill after what its cache (ground truth: the prompts already sent there) holds.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import time
from dataclasses import dataclass

from tiersched.core.engine import EngineTierConfig, DispatchRequest, RankLoad
from tiersched.core.engine.upstream import RoundRobinDispatcher, TotalTokensDispatcher
from tiersched.core.engine.score import ScoreDispatcher
from tiersched.core.engine.prefix_index import PageKeys, PrefixIndex, chained_block_hashes, pack_keys, page_keys
from tiersched.sglang.engine.hooks import to_dispatch_request


@dataclass(frozen=True)
class Workload:
    requests: list[DispatchRequest]
    arrivals_s: list[float]


def shared_prefix_workload(n: int, seed: int, block_tokens: int, groups: int = 40, window_s: float = 0.05,
                           prefix_tokens: tuple[int, int] = (256, 2048),
                           suffix_tokens: tuple[int, int] = (16, 512)) -> Workload:
    """n prompts = one of `groups` shared prefixes (Zipf-like popularity) + a unique suffix; arrivals uniform
    in [0, window_s)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 150_000) for _ in range(rng.randint(*prefix_tokens))] for _ in range(groups)]
    popularity = [1.0 / (g + 1) for g in range(groups)]
    requests = []
    for i in range(n):
        prefix = rng.choices(prefixes, popularity)[0]
        tokens = prefix + [rng.randrange(1, 150_000) for _ in range(rng.randint(*suffix_tokens))]
        requests.append(DispatchRequest(rid=str(i), input_tokens=len(tokens),
                                        prefix_blocks=chained_block_hashes(tokens, block_tokens)))
    arrivals = sorted(rng.uniform(0.0, window_s) for _ in range(n))
    return Workload(requests, arrivals)


def _upstream_budget(num_ranks: int):
    """Upstream's real DPBudget and its TOTAL_TOKENS member, or None if sglang is not importable."""
    try:
        from sglang.srt.managers.data_parallel_controller import DPBudget, LoadBalanceMethod
    except Exception:  # noqa: BLE001 - any import failure means: measure the mirror instead
        return None
    return DPBudget(num_ranks), LoadBalanceMethod.TOTAL_TOKENS


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    return s[len(s) // 2] / 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3


def decision_latency(num_ranks: int, index_entries: int, decisions: int, seed: int) -> dict[str, float]:
    cfg = EngineTierConfig()
    rng = random.Random(seed)
    pages_per_rank = index_entries // num_ranks
    dispatcher = ScoreDispatcher(num_ranks, cfg)
    capacity = pages_per_rank * cfg.block_tokens
    dispatcher.update_loads([
        RankLoad(rank=r, kv_capacity_tokens=capacity, kv_used_tokens=rng.randint(0, capacity // 2),
                 remaining_prefill_tokens=rng.randint(0, 8000), queue_len=rng.randint(0, 8),
                 running_reqs=rng.randint(0, 32), running_decode_tokens=rng.randint(0, 50_000),
                 expert_pressure=rng.uniform(0.8, 1.2), timestamp_s=1.0)
        for r in range(num_ranks)], 1.0)
    work = shared_prefix_workload(max(decisions, 2000), seed, cfg.block_tokens, groups=400)
    # the adapter hands pick its page keys packed (page_keys); the timed picks get them so too
    timed = [dataclasses.replace(req, prefix_blocks=PageKeys(pack_keys(req.prefix_blocks))) for req in work.requests]
    # Fill the index to its bound: every rank holds many (partial) prefixes.
    i = 0
    while len(dispatcher.index) < index_entries - num_ranks:
        keys = work.requests[i % len(work.requests)].prefix_blocks
        dispatcher.index.insert(rng.randrange(num_ranks), keys[: rng.randint(1, len(keys))])
        i += 1
        if i > 50 * index_entries:
            break
    entries = len(dispatcher.index)
    upstream = _upstream_budget(num_ranks)
    mirror = TotalTokensDispatcher(num_ranks)
    ours_ns, theirs_ns, ours_cpu_ns, whole_ns = [], [], [], []
    gc.collect()
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for k in range(decisions):
        req = timed[k % len(timed)]
        c0 = cpu_clock()
        t0 = clock()
        dispatcher.decide(req, 1.0)
        t1 = clock()
        ours_cpu_ns.append(cpu_clock() - c0)
        dispatcher.settle()
        whole_ns.append(clock() - t0)
        if upstream is not None:
            budget, method = upstream
            t2 = clock()
            budget.dispatch(method, estimated_tokens=req.input_tokens)
            t3 = clock()
        else:
            t2 = clock()
            mirror.pick(req, 1.0)
            t3 = clock()
        ours_ns.append(t1 - t0)
        theirs_ns.append(t3 - t2)
    p50, p99 = _percentiles(ours_ns)
    t50, t99 = _percentiles(theirs_ns)
    _, cpu99 = _percentiles(ours_cpu_ns)
    w50, w99 = _percentiles(whole_ns)
    return {"p50": p50, "p99": p99, "cpu_p99": cpu99, "whole_p50": w50, "whole_p99": w99, "tt_p50": t50,
            "tt_p99": t99, "entries": entries, "upstream_real": upstream is not None}


@dataclass
class _TokenizedRequest:
    """The fields of upstream's TokenizedGenerateReqInput that the adapter's to_dispatch_request reads."""

    rid: str
    input_ids: list[int]
    priority: int | None = None
    routing_key: str | None = None
    session_params: object = None


class LongPrompts:
    """Prompts of exactly `tokens` token ids (Python ints, as upstream hands them over): one of `groups` shared
    prefixes of tokens/8 to 3/4 tokens (1k-6k of 8k) (Zipf-like popularity) + a fresh suffix each time, so every request brings new pages."""

    def __init__(self, seed: int, tokens: int = 8192, groups: int = 40) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.tokens = tokens
        self.prefixes = [self.rng.integers(1, 150_000, size=int(self.rng.integers(tokens // 8, 3 * tokens // 4)))
                         .tolist()
                         for _ in range(groups)]
        popularity = 1.0 / np.arange(1, groups + 1)
        self.popularity = popularity / popularity.sum()
        self.count = 0

    def next(self) -> _TokenizedRequest:
        prefix = self.prefixes[int(self.rng.choice(len(self.prefixes), p=self.popularity))]
        suffix = self.rng.integers(1, 150_000, size=self.tokens - len(prefix)).tolist()
        self.count += 1
        return _TokenizedRequest(str(self.count), prefix + suffix)


def decision_latency_with_hashing(num_ranks: int, index_entries: int, decisions: int, seed: int,
                                  tokens: int = 8192) -> dict[str, float]:
    """Per request, the adapter's path: to_dispatch_request + ScoreDispatcher.decide (the prompt's pages hashed as
    far as the prefix match needs, scores, choice, charge) is the decision; settle (the other pages hashed, index
    insert and eviction) follows it; both together are the request's whole cost to the controller. The prefix
    index is held at ~index_entries (rank, page) entries. Timed apart on the same prompt: hashing all its pages
    (page_keys(...).packed), and one hash(tuple(ids)); upstream's DPBudget.dispatch on the same requests."""
    cfg = EngineTierConfig()
    rng = random.Random(seed)
    dispatcher = ScoreDispatcher(num_ranks, cfg)
    capacity = (index_entries // num_ranks) * cfg.block_tokens
    dispatcher.update_loads([
        RankLoad(rank=r, kv_capacity_tokens=capacity, kv_used_tokens=rng.randint(0, capacity // 2),
                 remaining_prefill_tokens=rng.randint(0, 8000), queue_len=rng.randint(0, 8),
                 running_reqs=rng.randint(0, 32), running_decode_tokens=rng.randint(0, 50_000),
                 expert_pressure=rng.uniform(0.8, 1.2), timestamp_s=1.0)
        for r in range(num_ranks)], 1.0)
    prompts = LongPrompts(seed, tokens)
    while len(dispatcher.index) < index_entries - num_ranks * (tokens // cfg.block_tokens):  # fill to the bound
        dispatcher.pick(to_dispatch_request(prompts.next(), cfg.block_tokens), 1.0)
    upstream = _upstream_budget(num_ranks)
    mirror = TotalTokensDispatcher(num_ranks)
    decide_ns, whole_ns, decide_cpu_ns, whole_cpu_ns = [], [], [], []
    hash_ns, hash_cpu_ns, theirs_ns, floor_ns, hashed_share = [], [], [], [], []
    gc.collect()
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for k in range(decisions):
        prompt = prompts.next()
        c0 = cpu_clock()
        t0 = clock()
        req = to_dispatch_request(prompt, cfg.block_tokens)
        dispatcher.decide(req, 1.0)
        t1 = clock()
        c1 = cpu_clock()
        hashed_share.append(req.prefix_blocks.hashed / max(1, len(req.prefix_blocks)))  # untimed
        c1b = cpu_clock()
        t1b = clock()
        dispatcher.settle()
        t2 = clock()
        c2 = cpu_clock()
        if upstream is not None:
            budget, method = upstream
            t3 = clock()
            budget.dispatch(method, estimated_tokens=req.input_tokens)
            t4 = clock()
        else:
            t3 = clock()
            mirror.pick(req, 1.0)
            t4 = clock()
        c3 = cpu_clock()
        t5 = clock()
        page_keys(prompt.input_ids, cfg.block_tokens).packed
        t6 = clock()
        c4 = cpu_clock()
        t7 = clock()
        hash(tuple(prompt.input_ids))
        t8 = clock()
        decide_ns.append(t1 - t0)
        whole_ns.append(t1 - t0 + t2 - t1b)
        decide_cpu_ns.append(c1 - c0)
        whole_cpu_ns.append(c1 - c0 + c2 - c1b)
        theirs_ns.append(t4 - t3)
        hash_ns.append(t6 - t5)
        hash_cpu_ns.append(c4 - c3)
        floor_ns.append(t8 - t7)
    p50, p99 = _percentiles(decide_ns)
    w50, w99 = _percentiles(whole_ns)
    cpu50, cpu99 = _percentiles(decide_cpu_ns)
    wcpu50, wcpu99 = _percentiles(whole_cpu_ns)
    h50, h99 = _percentiles(hash_ns)
    _, hcpu99 = _percentiles(hash_cpu_ns)
    t50, t99 = _percentiles(theirs_ns)
    f50, f99 = _percentiles(floor_ns)
    return {"p50": p50, "p99": p99, "cpu_p50": cpu50, "cpu_p99": cpu99, "whole_p50": w50, "whole_p99": w99,
            "whole_cpu_p50": wcpu50, "whole_cpu_p99": wcpu99, "hash_p50": h50, "hash_p99": h99,
            "hash_cpu_p99": hcpu99, "tt_p50": t50, "tt_p99": t99, "floor_p50": f50, "floor_p99": f99,
            "hashed_before_decision": sum(hashed_share) / len(hashed_share), "entries": len(dispatcher.index),
            "upstream_real": upstream is not None}


def _burst(dispatcher, work: Workload, num_ranks: int, block_tokens: int, refresh_s: float) -> float:
    truth = PrefixIndex(num_ranks, max_blocks_per_rank=1 << 30)
    stale = [RankLoad(rank=r, kv_capacity_tokens=1_000_000, timestamp_s=0.0) for r in range(num_ranks)]
    dispatcher.update_loads(stale, 0.0)
    work_done = [0] * num_ranks
    next_refresh = refresh_s
    for req, t in zip(work.requests, work.arrivals_s):
        if t >= next_refresh:  # upstream re-reads the snapshot every 20 ms; mid-burst it is still the old one
            dispatcher.update_loads(stale, t)
            next_refresh += refresh_s
        rank = dispatcher.pick(req, t).rank
        hit = min(truth.match(req.prefix_blocks)[rank] * block_tokens, req.input_tokens)
        work_done[rank] += req.input_tokens - hit
        truth.insert(rank, req.prefix_blocks)
    return max(work_done) / max(1, min(work_done))


def burst_ratio(seed: int = 0, num_ranks: int = 8, n: int = 1000, window_s: float = 0.05) -> tuple[float, float]:
    """(max/min dispatched work for ScoreDispatcher, the same for upstream total_tokens) on one burst."""
    cfg = EngineTierConfig()
    work = shared_prefix_workload(n, seed, cfg.block_tokens, window_s=window_s)
    ours = _burst(ScoreDispatcher(num_ranks, cfg), work, num_ranks, cfg.block_tokens, cfg.snapshot_refresh_s)
    theirs = _burst(TotalTokensDispatcher(num_ranks), work, num_ranks, cfg.block_tokens, cfg.snapshot_refresh_s)
    return ours, theirs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--decisions", type=int, default=20_000, help="timed decisions per rank count")
    parser.add_argument("--index-entries", type=int, default=100_000, help="prefix-index (rank, page) entries")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out: dict[str, object] = {}
    for ranks in (32, 8):
        lat = decision_latency(ranks, args.index_entries, args.decisions, args.seed)
        out[f"decision_p50_us_{ranks}"] = round(lat["p50"], 2)
        out[f"decision_p99_us_{ranks}"] = round(lat["p99"], 2)
        out[f"decision_p99_cpu_us_{ranks}"] = round(lat["cpu_p99"], 2)  # thread CPU time: excludes preemption
        out[f"request_cost_p50_us_{ranks}"] = round(lat["whole_p50"], 2)  # decide + settle (index insert)
        out[f"request_cost_p99_us_{ranks}"] = round(lat["whole_p99"], 2)
        out[f"total_tokens_p50_us_{ranks}"] = round(lat["tt_p50"], 2)
        out[f"total_tokens_p99_us_{ranks}"] = round(lat["tt_p99"], 2)
        out[f"prefix_index_entries_{ranks}"] = lat["entries"]
        out["total_tokens_source"] = (
            "sglang DPBudget.dispatch(TOTAL_TOKENS), called in-process" if lat["upstream_real"]
            else "tiersched.core.engine.upstream.TotalTokensDispatcher (sglang not importable)")
    ranks = 32
    lat = decision_latency_with_hashing(ranks, args.index_entries, args.decisions, args.seed)
    out[f"decision_p50_us_{ranks}_with_hashing"] = round(lat["p50"], 2)
    out[f"decision_p99_us_{ranks}_with_hashing"] = round(lat["p99"], 2)
    out[f"decision_p50_cpu_us_{ranks}_with_hashing"] = round(lat["cpu_p50"], 2)
    out[f"decision_p99_cpu_us_{ranks}_with_hashing"] = round(lat["cpu_p99"], 2)
    # the request's whole cost to the controller: the decision + the hashing and index insert that follow the send
    out[f"request_cost_p50_us_{ranks}_with_hashing"] = round(lat["whole_p50"], 2)
    out[f"request_cost_p99_us_{ranks}_with_hashing"] = round(lat["whole_p99"], 2)
    out[f"request_cost_p50_cpu_us_{ranks}_with_hashing"] = round(lat["whole_cpu_p50"], 2)
    out[f"request_cost_p99_cpu_us_{ranks}_with_hashing"] = round(lat["whole_cpu_p99"], 2)
    out["pages_hashed_before_decision_share_8k"] = round(lat["hashed_before_decision"], 3)
    out["hashing_p50_us_8k"] = round(lat["hash_p50"], 2)
    out["hashing_p99_us_8k"] = round(lat["hash_p99"], 2)
    out["hashing_p99_cpu_us_8k"] = round(lat["hash_cpu_p99"], 2)
    out["token_pass_floor_p50_us_8k"] = round(lat["floor_p50"], 2)  # hash(tuple(ids)): no hash over 8k ids is cheaper
    out["token_pass_floor_p99_us_8k"] = round(lat["floor_p99"], 2)
    out[f"total_tokens_p50_us_{ranks}_8k"] = round(lat["tt_p50"], 2)
    out[f"total_tokens_p99_us_{ranks}_8k"] = round(lat["tt_p99"], 2)
    out[f"prefix_index_entries_{ranks}_8k"] = lat["entries"]
    # ratios against upstream's pick, measured in the same run (upstream hashes nothing: it counts tokens)
    out[f"decision_vs_total_tokens_p99_{ranks}"] = round(out[f"decision_p99_us_{ranks}"]
                                                         / max(out[f"total_tokens_p99_us_{ranks}"], 1e-9), 2)
    out[f"decision_with_hashing_vs_total_tokens_p99_{ranks}"] = round(
        lat["p99"] / max(lat["tt_p99"], 1e-9), 2)
    out[f"request_cost_with_hashing_vs_total_tokens_p99_{ranks}"] = round(
        lat["whole_p99"] / max(lat["tt_p99"], 1e-9), 2)
    out["hashing_vs_token_pass_floor_p50_8k"] = round(lat["hash_p50"] / max(lat["floor_p50"], 1e-9), 2)
    ours, theirs = burst_ratio(args.seed)
    cfg = EngineTierConfig()
    rr = _burst(RoundRobinDispatcher(8), shared_prefix_workload(1000, args.seed, cfg.block_tokens), 8,
                cfg.block_tokens, cfg.snapshot_refresh_s)
    out["burst_max_min_ratio"] = round(ours, 4)
    out["burst_max_min_ratio_total_tokens"] = round(theirs, 4)
    out["burst_max_min_ratio_round_robin"] = round(rr, 4)
    out["decision_p99_goal_us"] = 100  # for decision_p99_us_32_with_hashing: arrival to decision (docs/engine-tier.md)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)  # other processes on the box inflate wall-clock tails
    out["cpu_count"] = os.cpu_count()
    out["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:36s} {value}")
    return 0
