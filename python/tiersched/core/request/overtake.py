"""Request tier: how many latency-sensitive (LS) requests may go ahead of promoted (aged-out) requests.

Why. Promotion (wait >= aging_cap_s) is what bounds every wait, but under SUSTAINED overload the promoted set
never empties: if promoted requests always went first, every LS request would wait until it was promoted itself,
i.e. LS TTFT would grow to the cap (measured: LS P99 27.7-36.1 s after 120 s at 1.5x capacity, docs/request-tier.md,
"LS overtakes"). And an admission step stops at the first request it cannot admit (upstream PrefillAdder:
KV short, or a second chunked prefill), so a promoted 16k-token BE request at the head also blocks the small LS
requests behind it. So LS requests may overtake promoted ones, but only a bounded number: promoted requests
keep a guaranteed share of admissions, and the wait bound keeps an explicit LS term (Theorem 1 in the docs).

Rule (one instance per waiting queue, i.e. per scheduler / simulated rank; state survives between steps):
  * `credit` starts at `ls_overtake_burst` and is reset to it whenever no promoted request waits;
  * the first floor(credit) non-promoted LS requests (in key order) are placed ahead of the promoted ones;
  * a request that left the queue since the previous call was admitted (or aborted): each LS request that had
    been placed ahead costs 1 credit, each promoted one earns `ls_overtakes_per_promoted` (credit <= burst).
Hence after a request is promoted, at most burst + ls_overtakes_per_promoted x (promoted requests admitted
before it) LS requests overtake it. With both knobs 0 promoted requests always go first (the earlier rule).
"""
from __future__ import annotations

import math
from typing import Callable, Hashable

import numpy as np


class LsOvertakeBudget:
    def __init__(self, burst: int, per_promoted: float, aging_cap_s: float):
        self.burst = int(burst)
        self.per_promoted = float(per_promoted)
        self.aging_cap_s = float(aging_cap_s)
        self.credit = float(self.burst)
        self._ahead: dict = {}  # rid -> arrival_s of the LS requests placed ahead of promoted ones last time
        self._promoted = 0  # how many requests were promoted last time
        self._last_now = -np.inf
        self.overtakes = 0  # LS admissions that went ahead of a waiting promoted request (read by tests/bench)

    @property
    def tracked(self) -> int:
        """LS requests remembered as placed ahead of promoted ones (at most `burst`: cleared when none is promoted)."""
        return len(self._ahead)

    def reorder(self, perm: np.ndarray, rid_of: Callable[[int], Hashable], is_ls: np.ndarray,
                arrival_s: np.ndarray, now_s: float) -> np.ndarray:
        """`perm` (int64[n]): the key order (order_keys: every promoted request first). rid_of(i): request i's id;
        is_ls: bool[n]; arrival_s: float64[n] (the key's arrival). Returns the order with up to floor(credit)
        non-promoted LS requests moved ahead of the promoted ones. O(n) numpy; rids are read only for the few
        requests whose arrival equals that of one placed ahead last time."""
        promoted = (now_s - arrival_s) >= self.aging_cap_s  # the same test as order_keys (cap > 0)
        if self._ahead or self._promoted:
            # Promoted last time and still here: last_now - arrival >= cap (waits only grow). Whatever else was
            # promoted last time left the queue. (A preempted request re-queued in between counts as still here,
            # which only earns less credit.)
            still = int(np.count_nonzero((self._last_now - arrival_s) >= self.aging_cap_s))
            gone_promoted = max(0, self._promoted - still)
            gone_ahead = 0
            if self._ahead:
                present = {rid_of(int(i)) for a in set(self._ahead.values()) for i in np.flatnonzero(arrival_s == a)}
                gone_ahead = sum(1 for rid in self._ahead if rid not in present)
            self.credit = min(float(self.burst), self.credit + self.per_promoted * gone_promoted) - gone_ahead
            self.overtakes += gone_ahead
        self._last_now = now_s
        n_promoted = int(np.count_nonzero(promoted))
        self._promoted = n_promoted
        if n_promoted == 0:
            self.credit = float(self.burst)
            self._ahead = {}
            return perm
        rest = perm[n_promoted:]
        n_ahead = int(math.floor(max(self.credit, 0.0)))
        at = np.flatnonzero(is_ls[rest])[:n_ahead]  # positions in `rest` of the LS requests that go ahead
        ls_rest = rest[at]
        self._ahead = {rid_of(int(i)): float(arrival_s[i]) for i in ls_rest}
        if ls_rest.size == 0:
            return perm
        keep = np.ones(len(rest), dtype=bool)
        keep[at] = False
        return np.concatenate([ls_rest, perm[:n_promoted], rest[keep]])
