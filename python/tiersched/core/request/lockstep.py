"""prefix-aging's protection of latency-sensitive (LS) requests from best-effort (BE) prefill.

SGLang runs a whole step at once, so an LS request that waits behind a long BE chunked prefill waits for that
step. While LS work waits, BE prefill per step is capped: the running BE chunk (`chunk_token_limit`) and the BE
requests newly admitted in the step (`be_admission_budget`). Under DP attention every rank's forward step is one
lockstep step, so "LS work waits" means on ANY rank of the group: `LockstepLsSignal` turns the per-step group
counts into the value both caps read.
"""
from __future__ import annotations

import math
from typing import Sequence

from tiersched.core.request import RequestTierConfig


def chunk_token_limit(
    chunked_priority: int,
    chunked_remaining_tokens: int,
    waiting_uncached: Sequence[tuple[int, int]],
    budget_tokens: int,
    page_size: int,
    config: RequestTierConfig,
    group_ls_waiting: int = 0,
) -> int | None:
    """Cap on the tokens the running chunked prefill may advance this step, or None for no cap.

    chunked_priority / chunked_remaining_tokens: the request being chunk-prefilled.
    waiting_uncached: (priority, uncached_tokens) of waiters, in scheduling order.
    budget_tokens: this step's prefill token budget (upstream's rem_chunk_tokens).
    group_ls_waiting: the largest LS-waiting count any rank of this rank's lockstep (DP-attention) group
    published (0 without DP attention); counts when `config.lockstep_chunk_cap` is on.

    Two rules, the smaller cap wins:
      * shorter-waiter reservation (as upstream shortest-prefill-first's shortest_prefill_chunk_limit): reserve
        budget for waiters whose uncached work is shorter than the chunk's remainder, in order, while the chunk
        keeps at least `min_chunk_tokens`; so a long prefill never blocks short waiters for more than a step;
      * LS protection (the QLLM analog in SGLang's whole-step execution): while an LS request waits behind a BE
        chunk, the BE chunk advances at most `be_chunk_tokens`, so the step the LS request waits on is short.
        Under DP attention every rank's step is one lockstep step, so "waits" means on ANY rank of the group.
    Page-aligned; never below `min_chunk_tokens` rounded up to a page.
    """
    page = max(1, page_size)
    floor = -(-config.min_chunk_tokens // page) * page
    if budget_tokens <= floor:
        return None
    caps: list[int] = []
    reserved = 0
    for priority, uncached in waiting_uncached:
        charge = -(-max(uncached, 1) // page) * page
        if uncached >= chunked_remaining_tokens or reserved + charge > budget_tokens - floor:
            break
        reserved += charge
    if reserved:
        caps.append(budget_tokens - reserved)
    ls_waiting = any(config.is_latency_sensitive(p) for p, _ in waiting_uncached) or (
        config.lockstep_chunk_cap and group_ls_waiting > 0)
    if ls_waiting and not config.is_latency_sensitive(chunked_priority):
        caps.append(config.be_chunk_tokens)
    if not caps:
        return None
    limit = max(floor, min(caps) // page * page)
    return limit if limit < budget_tokens else None


def be_admission_budget(local_ls_waiting: int, group_ls_waiting: int, be_tokens_this_step: int,
                        config: RequestTierConfig) -> int | None:
    """Prefill tokens a BE request newly admitted this step may take (None: no cap; 0: admit no BE this step).

    While LS work waits (on this rank, or with `lockstep_chunk_cap` on any rank of the lockstep group), this
    rank's BE prefill per step is bounded by `be_chunk_tokens` in total: the capped running chunk plus new BE
    admissions (without this, a BE request admitted on an idle rank takes a whole 8192-token first chunk and
    the LS request on another rank waits for that step). `be_tokens_this_step`: BE tokens already in this
    step's batch. A remainder below `min_chunk_tokens` admits nothing (the BE request waits one short step).
    """
    ls_active = local_ls_waiting > 0 or (config.lockstep_chunk_cap and group_ls_waiting > 0)
    if not ls_active or not config.cap_be_admissions:
        return None
    left = config.be_chunk_tokens - max(0, be_tokens_this_step)
    return left if left >= config.min_chunk_tokens else 0


class LockstepLsSignal:
    """The DP-wide "LS work waiting" signal one rank applies, from the per-step group counts it receives.

    `observe(group_ls_waiting, now_s)` is called once per scheduling step with the largest LS-waiting count
    any rank of the lockstep group published (SGLang: gathered with the previous step's MLP-sync all-gather);
    it returns the value the chunk cap uses this step: the count itself, or 1 while `ls_hold_s` has not passed
    since a nonzero count was last seen. Every rank observes the same gathered values, so all ranks of a group
    agree. `expire(now_s)` is for a step without a fresh count (no gather ran): only the hold remains, and it
    runs out, so a stale signal cannot keep BE capped.
    """

    def __init__(self, config: RequestTierConfig):
        self.config = config
        self.last_seen_s = -math.inf

    def observe(self, group_ls_waiting: int, now_s: float) -> int:
        if group_ls_waiting > 0:
            self.last_seen_s = now_s
            return int(group_ls_waiting)
        return self.expire(now_s)

    def expire(self, now_s: float) -> int:
        return 1 if now_s - self.last_seen_s <= self.config.ls_hold_s else 0
