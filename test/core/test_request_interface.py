"""The request tier's policy interface: what a policy must define, and what its hooks default to."""
from __future__ import annotations

import pytest

from tiersched.core.request import OrderingPolicy, PreemptionPolicy, WaitingRequest
from tiersched.core.request.ordering import AgingPrefixOrdering
from tiersched.core.request.preemption import LatencySensitivePreemption
from tiersched.core.request.upstream import (FcfsOrdering, FcfsPriorityOrdering, HrrnOrdering, LpmOrdering,
                                             PriorityPreemption, ShortestPrefillFirstOrdering)


def test_an_ordering_without_order_cannot_be_instantiated():
    class NoOrder(OrderingPolicy):
        name = "no-order"

        def observe_prefill_tokens(self, tokens: int) -> None:
            pass

    with pytest.raises(TypeError, match="abstract method.*order"):
        NoOrder()


def test_a_preemption_without_choose_victims_cannot_be_instantiated():
    class NoVictims(PreemptionPolicy):
        preempts_on_kv_shortage = False

    with pytest.raises(TypeError, match="abstract method.*choose_victims"):
        NoVictims()


def test_overriding_chunk_limit_requires_declaring_limits_chunks():
    with pytest.raises(TypeError, match="limits_chunks"):
        class Forgot(OrderingPolicy):
            def order(self, waiting, now_s):
                return list(range(len(waiting)))

            def chunk_limit(self, *args, **kwargs):
                return 64

    class Declared(OrderingPolicy):  # the same class with the flag set is accepted
        limits_chunks = True

        def order(self, waiting, now_s):
            return list(range(len(waiting)))

        def chunk_limit(self, *args, **kwargs):
            return 64

    assert Declared().chunk_limit(0, 100, [], 8192, 1) == 64


def test_a_minimal_ordering_gets_the_documented_defaults():
    class Lifo(OrderingPolicy):
        def order(self, waiting, now_s):
            return sorted(range(len(waiting)), key=lambda i: -waiting[i].arrival_s)

    pol = Lifo()
    waiting = [WaitingRequest("a", 0, 0.0, 10), WaitingRequest("b", 5, 1.0, 10)]
    assert pol.order(waiting, 2.0) == [1, 0]
    assert not pol.limits_chunks and pol.chunk_limit(0, 1000, [(5, 10)], 8192, 1) is None
    assert pol.ls_priority is None and not pol.is_latency_sensitive(5)
    assert pol.be_admission_tokens(3, 3, 0) is None
    assert pol.lockstep_signal_lag_steps is None and pol.observe_group_ls_waiting(2, 0.0) == 2
    assert pol.observe_prefill_tokens(100) is None


def test_every_policy_names_itself_and_declares_its_hooks():
    orderings = [FcfsOrdering(), FcfsPriorityOrdering(), LpmOrdering(), HrrnOrdering(), ShortestPrefillFirstOrdering(),
                 AgingPrefixOrdering()]
    names = [o.name for o in orderings]
    assert all(isinstance(o, OrderingPolicy) for o in orderings) and len(set(names)) == len(names) and all(names)
    assert [o.limits_chunks for o in orderings] == [False, False, False, False, True, True]
    assert AgingPrefixOrdering().ls_priority == 1 and AgingPrefixOrdering().is_latency_sensitive(1)
    assert PriorityPreemption().name and LatencySensitivePreemption().name
    # Upstream preempts only when the running slots are full; ours also on a KV shortage.
    assert not PriorityPreemption.preempts_on_kv_shortage and LatencySensitivePreemption.preempts_on_kv_shortage
