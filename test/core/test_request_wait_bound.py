"""Property test of the request tier's wait bound (docs/request-tier.md, Theorem 1).

An adversary (hypothesis) chooses a stream of short high-priority jobs, possibly far above the server's
capacity, plus best-effort jobs; a single non-preemptive server runs the real ordering policy. Every job
must start within aging_cap_s + max_step + (service of older jobs still waiting when it is promoted) + (service of
the LS jobs allowed to overtake it after its promotion: burst + ls_overtakes_per_promoted per older job served).
"""
from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tiersched.core.request import RequestTierConfig, max_overtakes, wait_bound_s
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.upstream import FcfsPriorityOrdering
from tiersched.core.request.single_server import Job, run_single_server

CAP_S = 2.0


def _after_promotion(job, served_by_rid, jobs, cap_s):
    """(service of older jobs that start after `job` is promoted, how many of them start before it,
    how many LS jobs that were not promoted start after its promotion and before it)."""
    promoted_at = job.arrival_s + cap_s
    start = served_by_rid[job.rid].start_s
    backlog, older_before, overtaking = 0.0, 0, 0
    for other in jobs:
        if other.rid == job.rid:
            continue
        s = served_by_rid[other.rid].start_s
        if other.arrival_s <= job.arrival_s and s >= promoted_at - 1e-9:
            backlog += other.service_s
            older_before += s < start
        elif other.priority > 0 and promoted_at - 1e-9 <= s < start and s - other.arrival_s < cap_s:
            overtaking += 1
    return backlog, older_before, overtaking


ls_stream = st.lists(
    st.tuples(st.floats(0.0, 6.0), st.floats(0.01, 0.2), st.integers(5, 20)), min_size=1, max_size=60
)
be_jobs = st.lists(st.tuples(st.floats(0.0, 3.0), st.floats(0.05, 0.6), st.integers(1, 50_000)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(ls=ls_stream, be=be_jobs, aging_rate=st.floats(0.0, 3.0), credit=st.floats(0.0, 5000.0),
       burst=st.integers(0, 6), per_promoted=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
# A sustained LS flood (2x capacity for 6 s) behind two BE jobs: every BE job is promoted while LS jobs wait, so
# the overtake budget decides (random streams rarely stay overloaded that long).
@example(ls=[(i * 0.05, 0.1, 10) for i in range(60)], be=[(0.0, 0.3, 4000), (0.5, 0.2, 10)], aging_rate=0.0,
         credit=0.0, burst=2, per_promoted=1.0)
def test_every_wait_is_bounded_by_the_documented_cap(ls, be, aging_rate, credit, burst, per_promoted):
    cfg = RequestTierConfig(aging_rate=aging_rate, aging_cap_s=CAP_S, token_credit_per_s=credit,
                            ls_overtake_burst=burst, ls_overtakes_per_promoted=per_promoted)
    jobs = [Job(f"ls{i}", p, a, s, 10) for i, (a, s, p) in enumerate(ls)]
    jobs += [Job(f"be{i}", 0, a, s, tokens) for i, (a, s, tokens) in enumerate(be)]
    served = run_single_server(jobs, AgingPrefixOrdering(cfg))
    by_rid = {s.rid: s for s in served}
    assert sorted(by_rid) == sorted(j.rid for j in jobs)
    max_step = max(j.service_s for j in jobs)
    max_ls = max(j.service_s for j in jobs if j.priority > 0)
    for job in jobs:
        backlog, older_before, overtaking = _after_promotion(job, by_rid, jobs, CAP_S)
        allowed = max_overtakes(cfg, older_before)
        assert overtaking <= allowed, (job, overtaking, allowed)  # the budget's invariant
        bound = wait_bound_s(CAP_S, max_step, backlog, allowed, max_ls)
        assert by_rid[job.rid].wait_s <= bound + 1e-9, (job, by_rid[job.rid], bound)


@settings(max_examples=60, deadline=None)
@given(n_ls=st.integers(40, 120), gap=st.floats(0.02, 0.09))
def test_low_priority_wait_stays_under_cap_against_short_high_priority_flood(n_ls, gap):
    """A lone BE job at t=0 against a back-to-back flood of 0.1 s LS jobs (overload: gap < service)."""
    cfg = RequestTierConfig(aging_rate=0.0, aging_cap_s=CAP_S)
    jobs = [Job("be", 0, 0.0, 0.3, 4000)] + [Job(f"ls{i}", 10, i * gap, 0.1, 10) for i in range(n_ls)]
    wait = {s.rid: s.wait_s for s in run_single_server(jobs, AgingPrefixOrdering(cfg))}["be"]
    # cap + the one LS step in flight + the burst of LS overtakes; nothing older than it.
    assert wait <= CAP_S + 0.1 + cfg.ls_overtake_burst * 0.1 + 1e-9
    strict = RequestTierConfig(aging_rate=0.0, aging_cap_s=CAP_S, ls_overtake_burst=0, ls_overtakes_per_promoted=0.0)
    assert {s.rid: s.wait_s for s in run_single_server(jobs, AgingPrefixOrdering(strict))}["be"] <= CAP_S + 0.1 + 1e-9
    # The adversary is a real one: without aging (upstream fcfs + priority) the BE job waits out the flood.
    fcfs_wait = {s.rid: s.wait_s for s in run_single_server(jobs, FcfsPriorityOrdering())}["be"]
    assert fcfs_wait >= 0.1 * n_ls - 1e-9 > CAP_S
