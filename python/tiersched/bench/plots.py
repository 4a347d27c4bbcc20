"""PNG plots of one scenario: TTFT/TPOT CDFs, per-rank load over time, expert-load heatmap.

    python -m tiersched.bench plots --out docs/img [--preset qwen3] [--workload auto] [--baseline ORD/DISP/EPLB]

Compares one upstream combination (default: the one `compare` picked as upstream-best on the default scenario,
passed explicitly so the plot is reproducible) with tiersched's three tiers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tiersched.bench.runner import Scenario, build_preset, build_workload
from tiersched.sim import PolicySet, simulate


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/plots")
    parser.add_argument("--preset", default="qwen3")
    parser.add_argument("--workload", default="auto")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--baseline", default="shortest-prefill-first/total_requests/none")
    parser.add_argument("--ours", default="tiersched/tiersched/source_aware")
    parser.add_argument("--sweep", default=None, help="a sweep results JSONL: draw only sweep_changes.png from it")


def _policy(spec: str) -> PolicySet:
    o, d, e = spec.split("/")
    return PolicySet(ordering=o, dispatch=d, eplb=e)


def _cdf(ax, values, label):
    v = np.sort(values[np.isfinite(values)])
    ax.plot(v, np.arange(1, v.size + 1) / max(v.size, 1), label=label)


def sweep_plot(results: str, out: Path) -> Path:
    """Per metric, the relative change of tiersched vs the best upstream baseline in every sweep configuration."""
    import json

    import matplotlib.pyplot as plt

    from tiersched.bench.sweep import METRICS

    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    presets = sorted({r["preset"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
    for j, preset in enumerate(presets):
        for i, metric in enumerate(METRICS):
            ch = [100 * (r["runs"]["tiersched"][metric] / r["runs"][r["upstream_best"]][metric] - 1) for r in rows
                  if r["preset"] == preset and r["runs"][r["upstream_best"]].get(metric)]
            x = i + (j - (len(presets) - 1) / 2) * 0.3 + np.linspace(-0.08, 0.08, len(ch))
            ax.scatter(x, ch, s=6, alpha=0.6, color=f"C{j}", label=preset if i == 0 else None)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(METRICS)), list(METRICS), fontsize=7)
    ax.set_ylabel("change vs best upstream (%)")
    ax.set_title(f"sweep: {len(rows)} configurations (lower is better for latencies)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "sweep_changes.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        path = sweep_plot(args.sweep, out)
        print(f"{path} ({path.stat().st_size // 1024} KB)")
        return 0
    sc = Scenario(preset=args.preset, workload=args.workload, duration_s=args.duration)
    preset, work = build_preset(sc), build_workload(sc)
    runs = {name: simulate(preset, work, _policy(spec)) for name, spec in
            (("upstream " + args.baseline, args.baseline), ("tiersched " + args.ours, args.ours))}
    written = []
    for metric in ("ttft", "tpot"):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for name, r in runs.items():
            _cdf(ax, r.records[metric], name)
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric.upper()} (s)")
        ax.set_ylabel("CDF")
        ax.legend(fontsize=7)
        ax.set_title(f"{metric.upper()} CDF, {preset.name}, {work.name}", fontsize=8)
        fig.tight_layout()
        path = out / f"{metric}_cdf.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(len(runs), 1, figsize=(6, 2.4 * len(runs)), dpi=100, sharex=True)
    for ax, (name, r) in zip(np.atleast_1d(axes), runs.items()):
        tl = r.timeline
        load = tl["running"] + tl["waiting"]
        for rank in range(load.shape[1]):
            ax.plot(tl["time"], load[:, rank], lw=0.6, label=f"rank {rank}")
        ax.set_ylabel("running+waiting")
        ax.set_title(name, fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    np.atleast_1d(axes)[0].legend(fontsize=6, ncol=4)
    fig.tight_layout()
    path = out / "rank_load.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), dpi=100)
    for ax, (name, r) in zip(np.atleast_1d(axes), runs.items()):
        load = r.expert_load / np.maximum(r.expert_load.mean(axis=1, keepdims=True), 1e-12)
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.5)
        ax.set_xlabel("GPU")
        ax.set_ylabel("MoE layer")
        ax.set_title(name.split(" ")[0] + f"\nbalancedness {r.metrics['balancedness']:.3f}", fontsize=8)
    fig.colorbar(im, ax=np.atleast_1d(axes).tolist(), label="load / layer mean")
    path = out / "expert_load.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    for p in written:
        print(f"{p} ({p.stat().st_size // 1024} KB)")
    return 0
