"""Expert tier: per-source recorder cost per forward pass, in-process on this CPU (`python -m tiersched.bench expert`).

Times one forward pass worth of recording (every MoE layer's top-k ids, then the pass end) for upstream's own
`stat` gatherer (the real `_SelectExpertsSinglePassGatherer.on_select_experts`, built without a server) and for
upstream's gatherer plus our per-source recorder, in the same run; prints one JSON object per shape.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from tiersched.sglang.expert.recorder import SourceRecorder

SHAPES = {  # name: (MoE layers, logical experts, physical slots, top-k)
    "tiny_qwen3_moe": (2, 8, 10, 2),
    "deepseek_v3": (61, 256, 288, 8),
}


def _upstream_gatherer(num_layers: int, num_physical: int):
    from sglang.srt.eplb.expert_distribution import _SelectExpertsSinglePassGatherer

    class Metadata:  # the two attributes on_select_experts reads
        num_physical_experts = num_physical

    gatherer = _SelectExpertsSinglePassGatherer.__new__(_SelectExpertsSinglePassGatherer)
    gatherer._expert_location_metadata = Metadata()
    gatherer._data = torch.zeros((num_layers, num_physical), dtype=torch.int)
    return gatherer


def measure(name: str, tokens: int, repeats: int, seed: int = 0) -> dict:
    num_layers, num_logical, num_physical, top_k = SHAPES[name]
    rng = np.random.default_rng(seed)
    topk = [torch.from_numpy(rng.integers(0, num_physical, size=(tokens, top_k))).int() for _ in range(num_layers)]
    phy2log = torch.from_numpy(np.stack([rng.permutation(np.arange(num_physical) % num_logical)
                                         for _ in range(num_layers)]))
    gatherer = _upstream_gatherer(num_layers, num_physical)
    recorder = SourceRecorder(num_layers, num_logical, buffer_size=1000)

    def upstream_pass():
        for layer in range(num_layers):
            gatherer.on_select_experts(layer, topk[layer])

    def ours_pass():
        for layer in range(num_layers):
            gatherer.on_select_experts(layer, topk[layer])
            recorder.on_select_experts(layer, topk[layer], phy2log[layer], (0, tokens))
        recorder.end_pass()

    def best_of(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    upstream_s, ours_s = best_of(upstream_pass), best_of(ours_pass)
    return {"shape": name, "tokens_per_pass": tokens, "layers": num_layers, "experts": num_logical, "top_k": top_k,
            "torch_threads": torch.get_num_threads(), "upstream_gatherer_ms": round(upstream_s * 1e3, 3),
            "with_per_source_recorder_ms": round(ours_s * 1e3, 3),
            "recorder_overhead_ms": round((ours_s - upstream_s) * 1e3, 3),
            "recorder_memory_mb": round((recorder.counts.numel() + recorder.coactivation.numel()) * 4 / 2**20, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512], help="tokens per forward pass")
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per point (the median is printed)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))


def main(args: argparse.Namespace) -> int:
    for shape in args.shapes:
        for tokens in args.tokens:
            print(json.dumps(measure(shape, tokens, args.repeats)), flush=True)
    return 0
