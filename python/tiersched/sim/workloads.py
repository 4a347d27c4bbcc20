"""Workloads: request lists (arrays, one row per request) from shared traces or synthetic generators.

Synthetic length shapes follow the multi-layer scheduling paper's five distributions over [min_len, max_len]:
Random (uniform), Central (normal around the middle), Descending (density falls linearly: many short, few long),
Two-end (half near each end), Average (every request the mean). Arrivals: Poisson or Gamma-bursty (ServeGen's
per-client model: Gamma inter-arrivals with a coefficient of variation cv). Priority classes: higher = more urgent.
Generators only: nothing here runs the simulator (capacity.py measures a deployment's capacity).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tiersched import data as shared

SHAPES = ("Random", "Central", "Descending", "Two-end", "Average")
LS_PRIORITY, BE_PRIORITY = 20, 0  # difference 20 > upstream's preemption threshold 10


@dataclass(frozen=True)
class Workload:
    name: str
    arrival_s: np.ndarray  # float [N], sorted
    input_tokens: np.ndarray  # int [N]
    output_tokens: np.ndarray  # int [N], >= 1
    priority: np.ndarray  # int [N], higher = more urgent
    class_of: np.ndarray  # int [N] index into class_names
    class_names: tuple[str, ...] = ("default",)
    prefix_blocks: tuple[tuple[int, ...], ...] = ()  # chained page hashes per request, () = no sharing
    block_tokens: int = 64
    session: np.ndarray | None = None  # int [N] tenant / session id for stickiness
    # bool [N] requests sent with ignore_eos (run to max_new_tokens, as sglang.bench_serving and our live driver send
    # them); None = none: trace and synthetic requests are real traffic that stops at EOS
    ignore_eos: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def blocks(self, i: int) -> tuple[int, ...]:
        return self.prefix_blocks[i] if self.prefix_blocks else ()


def _default_classes(n: int) -> dict:
    return {"priority": np.zeros(n, dtype=np.int64), "class_of": np.zeros(n, dtype=np.int64)}


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def gamma_arrivals(rate: float, n: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma inter-arrivals with mean 1/rate and coefficient of variation cv (cv > 1 = bursty)."""
    shape = 1.0 / max(cv, 1e-6) ** 2
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=n))


def sample_shape(shape: str, n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    if shape == "Random":
        x = rng.uniform(lo, hi, n)
    elif shape == "Central":
        x = rng.normal((lo + hi) / 2, (hi - lo) / 8, n)
    elif shape == "Descending":
        x = lo + (hi - lo) * (1.0 - np.sqrt(rng.uniform(0, 1, n)))  # density 2(1-u): linearly falling
    elif shape == "Two-end":
        near_low = rng.uniform(0, 1, n) < 0.5
        span = (hi - lo) / 10
        x = np.where(near_low, rng.uniform(lo, lo + span, n), rng.uniform(hi - span, hi, n))
    elif shape == "Average":
        x = np.full(n, (lo + hi) / 2)
    else:
        raise ValueError(f"unknown length shape {shape!r}; choose one of {', '.join(SHAPES)}.")
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


def _shared_prefix_blocks(n: int, input_tokens: np.ndarray, groups: int, prefix_tokens: int, block_tokens: int,
                          rng: np.random.Generator) -> tuple[tuple[int, ...], ...]:
    """Each request starts with one of `groups` shared prefixes (system prompts) of up to prefix_tokens."""
    group = rng.integers(0, groups, n) if groups > 0 else np.full(n, -1)
    out = []
    for i in range(n):
        full = int(input_tokens[i]) // block_tokens
        shared_blocks = min(full, prefix_tokens // block_tokens) if group[i] >= 0 else 0
        head = [int(group[i]) * 1_000_003 + j for j in range(shared_blocks)]
        tail = [10**12 + i * 100_000 + j for j in range(full - shared_blocks)]
        out.append(tuple(head + tail))
    return tuple(out)


def synthetic(shape: str = "Random", rate: float = 4.0, duration_s: float = 60.0, seed: int = 0,
              input_range: tuple[int, int] = (128, 4096), output_range: tuple[int, int] = (16, 512),
              prefix_groups: int = 8, prefix_tokens: int = 1024, block_tokens: int = 64,
              arrival: str = "poisson", cv: float = 2.0) -> Workload:
    """Built-in synthetic workload: a length shape, Poisson (or Gamma-bursty) arrivals, shared system prompts."""
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * duration_s))
    arrivals = poisson_arrivals(rate, n, rng) if arrival == "poisson" else gamma_arrivals(rate, n, cv, rng)
    inp = sample_shape(shape, n, *input_range, rng)
    out = sample_shape(shape, n, *output_range, rng)
    blocks = _shared_prefix_blocks(n, inp, prefix_groups, prefix_tokens, block_tokens, rng)
    return Workload(f"synthetic-{shape}-{rate:g}rps", arrivals, inp, out, block_tokens=block_tokens,
                    prefix_blocks=blocks, meta={"shape": shape, "rate": rate, "seed": seed}, **_default_classes(n))


def _rescale(arrival: np.ndarray, rate: float | None) -> np.ndarray:
    if rate is None or len(arrival) < 2:
        return arrival
    native = (len(arrival) - 1) / max(arrival[-1] - arrival[0], 1e-9)
    return (arrival - arrival[0]) * native / rate


def _cut(arrival: np.ndarray, duration_s: float | None, limit: int) -> int:
    n = len(arrival) if duration_s is None else int(np.searchsorted(arrival, duration_s, side="right"))
    return max(1, min(n, limit))


def mooncake(rate: float | None = None, duration_s: float | None = 60.0, start_s: float = 0.0,
             limit: int = 100_000) -> Workload:
    """Mooncake conversation trace: prefix hash ids (512-token pages) give real shared prefixes."""
    trace = shared.load_mooncake()
    keep = trace.arrival_s >= start_s
    arrival = _rescale(trace.arrival_s[keep] - start_s, rate)
    n = _cut(arrival, duration_s, limit)
    idx = np.flatnonzero(keep)[:n]
    return Workload(f"mooncake{'' if rate is None else f'-{rate:g}rps'}", arrival[:n], trace.input_tokens[idx],
                    trace.output_tokens[idx], prefix_blocks=tuple(trace.prefix_blocks[i] for i in idx),
                    block_tokens=trace.block_tokens, meta={"trace": "mooncake", "rate": rate}, **_default_classes(n))


def azure_conv(rate: float | None = None, duration_s: float | None = 60.0, limit: int = 100_000) -> Workload:
    """Azure LLM inference 2023 conversation trace (lengths and arrivals; no prefix information)."""
    trace = shared.load_azure_conv()
    arrival = _rescale(trace.arrival_s, rate)
    n = _cut(arrival, duration_s, limit)
    return Workload(f"azure-conv{'' if rate is None else f'-{rate:g}rps'}", arrival[:n], trace.input_tokens[:n],
                    trace.output_tokens[:n], meta={"trace": "azure_conv", "rate": rate}, **_default_classes(n))


def from_trace(trace: shared.TraceRequests, name: str, rate: float | None = None, duration_s: float | None = None,
               limit: int | None = None, meta: dict | None = None) -> Workload:
    """A trace's requests (tiersched.data.TraceRequests, e.g. a user's file read by tiersched.traces) as a
    Workload: arrivals rescaled to `rate` req/s when given, cut at `duration_s` and `limit` requests."""
    arrival = _rescale(trace.arrival_s, rate)
    n = _cut(arrival, duration_s, len(arrival) if limit is None else limit)
    blocks = tuple(trace.prefix_blocks[:n]) if trace.prefix_blocks else ()
    return Workload(f"{name}{'' if rate is None else f'-{rate:g}rps'}", arrival[:n], trace.input_tokens[:n],
                    trace.output_tokens[:n], prefix_blocks=blocks,
                    **({"block_tokens": trace.block_tokens} if trace.block_tokens else {}),
                    meta={**(meta or {}), "rate": rate}, **_default_classes(n))


def sharegpt(rate: float = 4.0, duration_s: float = 60.0, seed: int = 0, arrival: str = "poisson",
             cv: float = 2.0) -> Workload:
    """ShareGPT prompt/output lengths sampled with replacement, Poisson or Gamma-bursty arrivals."""
    rng = np.random.default_rng(seed)
    prefill, decode = shared.load_sharegpt_lengths()
    n = max(1, int(rate * duration_s))
    pick = rng.integers(0, len(prefill), n)
    times = poisson_arrivals(rate, n, rng) if arrival == "poisson" else gamma_arrivals(rate, n, cv, rng)
    return Workload(f"sharegpt-{rate:g}rps", times, np.maximum(1, prefill[pick]), np.maximum(1, decode[pick]),
                    meta={"trace": "sharegpt", "rate": rate, "seed": seed}, **_default_classes(n))


def with_priority_classes(workload: Workload, ls_fraction: float, seed: int = 0,
                          ls_output_cap: int | None = 256) -> Workload:
    """Mark a random `ls_fraction` of requests latency-sensitive (LS, priority 20), the rest best-effort (BE, 0)."""
    rng = np.random.default_rng(seed + 17)
    is_ls = rng.uniform(0, 1, len(workload)) < ls_fraction
    out = workload.output_tokens.copy()
    if ls_output_cap is not None:
        out[is_ls] = np.minimum(out[is_ls], ls_output_cap)  # interactive requests are short answers
    return replace(workload, name=workload.name + f"-ls{ls_fraction:g}", output_tokens=out,
                   priority=np.where(is_ls, LS_PRIORITY, BE_PRIORITY).astype(np.int64),
                   class_of=np.where(is_ls, 0, 1).astype(np.int64), class_names=("LS", "BE"))


def mixed_priority(rate: float, ls_fraction: float = 0.2, duration_s: float = 60.0, seed: int = 0,
                   ls_input: tuple[int, int] = (128, 2048), ls_output: tuple[int, int] = (16, 256),
                   be_input: tuple[int, int] = (4096, 16384), be_output: tuple[int, int] = (128, 1024),
                   prefix_groups: int = 8, prefix_tokens: int = 1024, block_tokens: int = 64) -> Workload:
    """The mixed-priority scenario at `rate` requests/s: `ls_fraction` latency-sensitive (LS, priority 20) requests
    among best-effort (BE, priority 0) ones, one Poisson stream. capacity.mixed_priority_at_overload picks `rate` as
    a multiple of the simulated deployment's capacity for this mix.

    LS = interactive chat turns (uniform 128-2048-token prompts, 16-256-token answers); BE = long-document /
    batch jobs (uniform 4k-16k-token prompts, so they are chunk-prefilled at upstream's 8192-token chunks, and
    128-1024-token outputs). Every request starts with one of `prefix_groups` shared system prompts. With long
    BE prompts the KV pool, not the running-request limit, is what runs out under overload (docs/request-tier.md).
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * duration_s))
    arrivals = poisson_arrivals(rate, n, rng)
    is_ls = rng.uniform(0, 1, n) < ls_fraction
    inp = np.where(is_ls, sample_shape("Random", n, *ls_input, rng), sample_shape("Random", n, *be_input, rng))
    out = np.where(is_ls, sample_shape("Random", n, *ls_output, rng), sample_shape("Random", n, *be_output, rng))
    blocks = _shared_prefix_blocks(n, inp, prefix_groups, prefix_tokens, block_tokens, rng)
    return Workload(f"mixed-priority-ls{ls_fraction:g}-{rate:g}rps", arrivals, inp, out,
                    priority=np.where(is_ls, LS_PRIORITY, BE_PRIORITY).astype(np.int64),
                    class_of=np.where(is_ls, 0, 1).astype(np.int64), class_names=("LS", "BE"),
                    prefix_blocks=blocks, block_tokens=block_tokens,
                    meta={"rate": float(rate), "ls_fraction": ls_fraction, "ls_input": ls_input,
                          "ls_output": ls_output, "be_input": be_input, "be_output": be_output, "seed": seed})


def servegen(clients: int = 8, duration_s: float = 60.0, window_start_s: float | None = None, seed: int = 0,
             rate_scale: float = 1.0, ls_clients: int = 2) -> Workload:
    """ServeGen reasoning clients: per-client Gamma/Weibull bursty arrivals and length PMFs from one 600 s window;
    the first `ls_clients` busiest clients are the LS (high-priority) tenants."""
    rng = np.random.default_rng(seed)
    loaded = [shared.load_servegen_client(c) for c in shared.servegen_client_ids()]
    # Busiest window overall unless given; clients ranked by their rate in it.
    starts = loaded[0].windows[:, 0]
    total = sum(c.windows[:, 1] for c in loaded)
    w = int(np.argmax(total)) if window_start_s is None else int(np.searchsorted(starts, window_start_s))
    ranked = sorted((c for c in loaded if c.windows[w, 1] > 0 and c.input_pmf),
                    key=lambda c: -c.windows[w, 1])[:clients]
    times, inp, out, tenant = [], [], [], []
    for k, client in enumerate(ranked):
        rate = client.windows[w, 1] * rate_scale
        name, p1, p2 = client.patterns[w]
        n = max(1, int(rate * duration_s * 1.5) + 5)
        if name == "Weibull" and p1 > 0:
            gaps = p2 * rng.weibull(p1, n)
            gaps *= (1.0 / rate) / max(gaps.mean(), 1e-9)  # keep the window's mean rate
        else:
            cv = client.windows[w, 2] if client.windows[w, 2] > 0 else 1.0
            gaps = np.diff(gamma_arrivals(rate, n + 1, cv, rng))
        t = np.cumsum(gaps)
        t = t[t <= duration_s]
        vals_in, p_in = shared.pmf_for_window(client.input_pmf, starts[w])
        vals_out, p_out = shared.pmf_for_window(client.output_pmf, starts[w])
        times.append(t)
        inp.append(rng.choice(vals_in, len(t), p=p_in))
        out.append(rng.choice(vals_out, len(t), p=p_out))
        tenant.append(np.full(len(t), k))
    t = np.concatenate(times)
    order = np.argsort(t, kind="stable")
    tenant_all = np.concatenate(tenant)[order]
    is_ls = tenant_all < ls_clients
    return Workload("servegen", t[order], np.maximum(1, np.concatenate(inp)[order]),
                    np.maximum(1, np.concatenate(out)[order]),
                    priority=np.where(is_ls, LS_PRIORITY, BE_PRIORITY).astype(np.int64),
                    class_of=np.where(is_ls, 0, 1).astype(np.int64), class_names=("LS", "BE"),
                    session=tenant_all, meta={"trace": "servegen", "window": int(starts[w]), "clients": len(ranked)})
