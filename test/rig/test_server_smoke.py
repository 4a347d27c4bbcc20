"""Real upstream servers on this CPU with our plugin: it must be loaded in the scheduler processes (not only the
launcher), and /generate must return tokens. Both servers come from the session's pool, shared with other modules
(rig_servers.py): tp1 is the CPU fixes' float32 single-rank server, dp2 the fidelity check's."""
import json
import os

import pytest

import rig_servers
from rig_servers import generate

DEPLOYMENTS = {"tp1": rig_servers.TP1_F32_SKEWED, "dp2": rig_servers.DP2_METRICS}
pytestmark = [pytest.mark.server, pytest.mark.timeout(420)]
# tp1's server belongs to the second pool's tests (test_cpu_fixes_server.py, test_expert_server.py): this case runs
# there, on the other xdist worker (test/conftest.py)
CASES = [pytest.param("tp1", 1, id="tp1",
                      marks=[pytest.mark.second_pool, pytest.mark.rig_servers(DEPLOYMENTS["tp1"])]),
         pytest.param("dp2", 2, id="dp2", marks=[pytest.mark.rig_servers(DEPLOYMENTS["dp2"])])]


def process_titles(trace_path):
    """Current titles of every process that loaded the plugin (SGLang renames its children after start-up)."""
    titles = {}
    for line in open(trace_path):
        entry = json.loads(line)
        try:
            with open(f"/proc/{entry['pid']}/cmdline", "rb") as f:
                titles[entry["pid"]] = (f.read().replace(b"\0", b" ").decode().strip(), entry["active"])
        except OSError:
            pass
    return titles


def main_thread_cores(pid):
    """The CPU list a process's main thread may run on (/proc/PID/status, Cpus_allowed_list)."""
    with open(f"/proc/{pid}/status") as f:
        return f.read().split("Cpus_allowed_list:")[1].split()[0]


def idle_cpu_seconds(titles, name, seconds):
    """CPU seconds the process titled `name` used over `seconds` of an idle server (None if not found)."""
    import time

    import psutil

    pids = [pid for pid, (title, _) in titles.items() if name in title]
    if not pids:
        return None
    proc = psutil.Process(pids[0])
    before = sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    return sum(proc.cpu_times()[:2]) - before


@pytest.mark.parametrize("name, schedulers", CASES)
def test_plugin_loaded_in_schedulers_and_generate_works(rig_pool, name, schedulers):
    srv = rig_pool.get(DEPLOYMENTS[name])
    trace = srv.trace_path  # every pooled server writes the plugin's process trace
    outputs = [generate(srv.url, f"Hello world {i}") for i in range(2 * schedulers)]
    titles = process_titles(trace)
    controller_idle_cpu_s = idle_cpu_seconds(titles, "data_parallel_controller", 2.0)
    scheduler_cores = sorted(main_thread_cores(pid) for pid, (t, _) in titles.items() if "scheduler" in t)
    with open(srv.log_path, errors="replace") as f:
        log = f.read()  # the start-up lines: a shared server may have served other tests since
    for out in outputs:
        assert out["meta_info"]["completion_tokens"] == 8 and len(out["output_ids"]) == 8, out
    scheduler_procs = [t for t, active in titles.values() if "scheduler" in t]
    assert len(scheduler_procs) == schedulers, f"plugin-loaded processes: {titles}\n{log[-6000:]}"
    assert all("cpu-fixes" in active for _, active in titles.values())
    with open(srv.log_path, errors="replace") as f:  # the launcher prints it once, early in the log
        assert "[tiersched] active tiers:" in f.read()
    if schedulers > 1:
        assert any("data_parallel_controller" in t or "dp_controller" in t.lower() for t, _ in titles.values()), titles
        ranks = {out["meta_info"].get("dp_rank") for out in outputs}
        assert ranks == {0, 1}, f"requests should reach both DP ranks: {ranks}"
        # cpu_fixes.block_while_idle: with --sleep-on-idle the idle DP controller waits in zmq poll instead of
        # spinning (upstream's bare NOBLOCK loop used ~1 s of CPU per idle second here)
        assert controller_idle_cpu_s is not None and controller_idle_cpu_s < 0.3, controller_idle_cpu_s
        # cpu_fixes.bind_threads_without_amx: SGLANG_CPU_OMP_THREADS_BIND="0|1" (set by the rig) reaches each
        # rank's compute thread on a CPU without AMX; upstream leaves both ranks on all cores
        assert scheduler_cores == ["0", "1"], scheduler_cores
