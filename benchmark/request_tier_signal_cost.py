"""Cost per scheduler iteration of the request tier's same-step LS signal on this CPU (gloo), against the MLP-sync
gather every DP-attention scheduler already runs each iteration.

Two local processes (DP ranks), one gloo group, as the attention-DP CPU group of a `--tp 2 --dp 2
--enable-dp-attention` server. Timed per iteration, median and mean over `--iters`:
  same_step_allreduce_us: ours, `all_reduce(MAX)` of one int64 (sglang/request/lockstep.py: reduce_same_step);
  mlp_sync_gather_us:     upstream's per-iteration row exchange at two ranks (dp_attn.exchange_sync_rows ->
                          torch.distributed.all_gather_single of the 12-column row);
  both_us:                the two back to back, as a scheduler iteration now issues them.
Quoted in docs/request-tier.md ("Lockstep"). Run under the CPU lock:
    flock /tmp/tiersched-cpu.lock .venv/bin/python benchmark/request_tier_signal_cost.py
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# upstream's sglang.srt.distributed.utils.all_gather_single: torch's all_gather_single, else all_gather_into_tensor
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
SYNC_ROW_COLUMNS = 12  # upstream's 11 MLPSyncBatchInfo columns + the request tier's gathered LS column


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, iters: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)), backend="gloo")
    row = torch.arange(SYNC_ROW_COLUMNS, dtype=torch.int64)
    rows = torch.empty(world * SYNC_ROW_COLUMNS, dtype=torch.int64)

    def reduce():
        value = torch.tensor([rank], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return int(value.item())

    def gather():
        ALL_GATHER_SINGLE(rows, row, group=group)

    def both():
        reduce()
        gather()

    out = {}
    for name, fn in (("same_step_allreduce_us", reduce), ("mlp_sync_gather_us", gather), ("both_us", both)):
        for _ in range(50):  # warm-up
            fn()
        dist.barrier(group=group)
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        out[name] = {"median": statistics.median(samples), "mean": statistics.fmean(samples)}
    assert reduce() == world - 1  # the MAX really crossed ranks
    if rank == 0:
        queue.put(out)
    dist.barrier(group=group)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=3000)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(2, _free_port(), args.iters, queue), nprocs=2, start_method="spawn")
    res = queue.get(timeout=5)
    res.update(iters=args.iters, ranks=2, backend="gloo",
               allreduce_over_gather=res["same_step_allreduce_us"]["median"] / res["mlp_sync_gather_us"]["median"],
               wall_s=time.perf_counter() - t0, load_avg_1m=os.getloadavg()[0])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
