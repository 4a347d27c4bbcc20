"""Plugin-side fixes for upstream SGLang 0.5.23 bugs met when serving on CPU (patches/cpu-fixes.md): three that
stop it from serving, one that burns a core (the DP controller ignores `--sleep-on-idle`), and one that lets ranks
oversubscribe the cores (`SGLANG_CPU_OMP_THREADS_BIND` is ignored on CPUs without AMX).

Each is a hook on the upstream function that trips, so it is listed in patches/cpu-fixes.toml and disappears with
the bug: when upstream fixes one, its hook becomes a no-op (the attribute exists, no -1 ids arrive on that path).
"""
from __future__ import annotations

import os

HOOKS = (
    # (target, hook type name, hook function name in this module)
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch._pad_inputs_to_size", "BEFORE", "ensure_cpu_fill_value"),
    ("sglang.srt.eplb.expert_distribution._StatAccumulator.dump", "BEFORE", "ensure_cpu_empty_cache"),
    ("sglang.srt.eplb.expert_location_updater.ExpertLocationUpdater.update", "BEFORE", "ensure_cpu_empty_cache"),
    ("sglang.srt.layers.moe.fused_moe_native.moe_forward_native", "AROUND", "route_remote_slots_to_unused_local_experts"),
    ("sglang.srt.managers.data_parallel_controller.DataParallelController.event_loop", "AROUND", "block_while_idle"),
    ("sglang.srt.distributed.bootstrap._init_cpu_threads_env", "AROUND", "bind_threads_without_amx"),
)
IDLE_POLL_MS = 500  # the longest the DP controller blocks without feeding its soft watchdog


def ensure_cpu_fill_value(forward_batch, model_runner, *args, **kwargs):
    """DP attention pads batches and asks the attention backend for `get_cpu_graph_seq_len_fill_value()`, which
    `TorchNativeAttnBackend` lacks (AttributeError on the first forward). The padded rows are empty, so a
    sequence length of 1 is what upstream's other CPU backend (intel_amx) returns too."""
    backend_type = type(model_runner.attn_backend)
    if not hasattr(backend_type, "get_cpu_graph_seq_len_fill_value"):
        backend_type.get_cpu_graph_seq_len_fill_value = lambda self: 1
    return None


def ensure_cpu_empty_cache(*args, **kwargs):
    """The first expert-distribution dump and the first EPLB update call `torch.get_device_module().empty_cache()`,
    and `torch.cpu` has no `empty_cache`. CPU memory has no cache to empty, so a no-op is exact."""
    import torch

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    return None


def route_remote_slots_to_unused_local_experts(original_fn, layer, x, topk_output, moe_runner_config, *args, **kwargs):
    """With `--ep-size > 1`, experts owned by another rank reach the torch-native MoE as topk id -1 and its
    `scatter_` fails. Map each such slot to a local expert that token does not otherwise use, with weight 0: it
    then contributes exactly nothing (ids must stay distinct per token because upstream counts with scatter_, a set)."""
    import torch

    topk_weights, topk_ids = topk_output[0], topk_output[1]
    remote = topk_ids < 0
    if not bool(remote.any()):
        return original_fn(layer, x, topk_output, moe_runner_config, *args, **kwargs)
    num_local = layer.w13_weight.shape[0]
    ids = topk_ids.to(torch.int64)
    rows = torch.arange(ids.shape[0], device=ids.device)
    used = torch.zeros(ids.shape[0], num_local, dtype=torch.bool, device=ids.device)
    for j in range(ids.shape[1]):
        used[rows, ids[:, j].clamp(min=0)] |= ~remote[:, j]
    ids = ids.clone()
    for j in range(ids.shape[1]):
        if bool(remote[:, j].any()):
            first_unused = (~used).to(torch.int8).argmax(dim=1)
            ids[:, j] = torch.where(remote[:, j], first_unused, ids[:, j])
            used[rows, ids[:, j]] |= remote[:, j]
    fixed = topk_output._replace(topk_weights=topk_weights.masked_fill(remote, 0), topk_ids=ids.to(topk_ids.dtype))
    return original_fn(layer, x, fixed, moe_runner_config, *args, **kwargs)


def block_while_idle(original_fn, self, *args, **kwargs):
    """`DataParallelController.event_loop` receives with `zmq.NOBLOCK` in a bare loop, so an idle controller spins
    a whole core; `--sleep-on-idle` ("Reduce CPU usage when sglang is idle") quiets the schedulers only. With that
    flag, wait in `zmq.Poller.poll` until a request is readable (it wakes at once when one arrives, so dispatch is
    not delayed), then drain exactly as upstream does: same `sock_recv`, same `_request_dispatcher`, watchdog fed."""
    from sglang.srt.runtime_context import get_device

    if not get_device().sleep_on_idle:
        return original_fn(self, *args, **kwargs)
    import zmq
    from sglang.srt.managers import data_parallel_controller as dpc

    poller = zmq.Poller()
    poller.register(self.recv_from_tokenizer, zmq.POLLIN)
    while True:
        self.soft_watchdog.feed()
        poller.poll(IDLE_POLL_MS)
        while True:
            self.soft_watchdog.feed()
            try:
                recv_req = dpc.sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            self._request_dispatcher(recv_req)


def parse_cpu_list(spec) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the kernel's cpulist format, which SGLANG_CPU_OMP_THREADS_BIND uses)."""
    cpus: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {spec!r}")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def bind_threads_without_amx(original_fn, *args, local_omp_cpuid=None, **kwargs):
    """Upstream resolves each rank's cores from `SGLANG_CPU_OMP_THREADS_BIND` (numa_utils.init_threads_binding) but
    applies them only through sgl_kernel, on AMX or arm64 CPUs; elsewhere it logs a warning and every rank's torch
    keeps one OpenMP team over all cores. Two ranks on two cores then oversubscribe them, and OpenMP's spin-waiting
    made a decode step ~20x slower whenever both ranks were busy. Where upstream skips the binding, do what it
    asks for: as many torch threads as the rank's cores, and the rank's compute thread pinned to them."""
    result = original_fn(*args, local_omp_cpuid=local_omp_cpuid, **kwargs)
    from sglang.srt.distributed import bootstrap

    if bootstrap._is_cpu_amx_available or bootstrap._is_cpu_arm64 or not local_omp_cpuid:
        return result
    import torch

    cpus = [c for c in parse_cpu_list(local_omp_cpuid) if c in os.sched_getaffinity(0)]
    if cpus:
        os.sched_setaffinity(0, cpus)  # this thread: the scheduler's, which runs the forward passes
        torch.set_num_threads(len(cpus))
    return result
