"""The router's block hashes and its estimate of each instance's prefix cache (serving/prefix_view.py)."""

from __future__ import annotations

import pytest

from deflectlab.envs.profile import load_profile
from deflectlab.serving.prefix_view import (
    BYTES_PER_TOKEN,
    CacheEstimate,
    PrefixView,
    byte_block_hashes,
    request_block_hashes,
    token_block_hashes,
)
from deflectlab.serving.router import RoutedRequest, Router
from deflectlab.serving.router_config import RouterConfig


def test_token_hashes_chain_over_full_blocks():
    a = list(range(50))  # 3 full blocks of 16 and 2 tokens
    b = list(range(40)) + [999] * 10  # same first 2 blocks, third differs
    ha, hb = token_block_hashes(a, 16), token_block_hashes(b, 16)
    assert len(ha) == 3 and len(hb) == 3  # the partial block is not hashed
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    c = [7] + a[1:]  # first token changed: every later hash changes (chained)
    assert all(x != y for x, y in zip(token_block_hashes(c, 16), ha))
    assert token_block_hashes(a[16:32] + a[:16], 16)[1] != ha[1]  # a block's hash depends on its parent


def test_byte_stand_in_and_request_bodies():
    size = 16 * BYTES_PER_TOKEN
    text = "x" * size + "y" * size + "z" * 10
    assert len(byte_block_hashes(text.encode(), 16)) == 2
    assert request_block_hashes({"prompt": text}, 16) == byte_block_hashes(text.encode(), 16)
    assert request_block_hashes({"prompt": list(range(40))}, 16) == token_block_hashes(list(range(40)), 16)
    assert request_block_hashes({"prompt": [list(range(40))]}, 16) == token_block_hashes(list(range(40)), 16)
    msgs = [{"role": "user", "content": "hello " * 100}]
    h = request_block_hashes({"messages": msgs}, 16)
    longer = request_block_hashes({"messages": msgs + [{"role": "assistant", "content": "ok " * 100}]}, 16)
    assert h and longer[:len(h) - 1] == h[:-1]  # a conversation that grows keeps its earlier blocks (but the last)


def test_cache_estimate_is_an_lru_of_blocks():
    c = CacheEstimate(capacity=4)
    c.add([1, 2, 3])
    c.add([9])
    assert c.match([1, 2, 3, 4]) == 3 and c.match([2]) == 1
    c.add([1, 2])  # touched: 3 and 9 are now the oldest
    c.add([5, 6])  # two over capacity: 3 then 9 go
    assert list(c.blocks) == [1, 2, 5, 6]
    assert c.match([1, 2, 3]) == 2


def test_prefix_view_annotates_from_routing_history():
    prof = load_profile("a100-80gb_deepseek-v2-lite")
    pv = PrefixView(2, 2, prof, prof)
    toks = list(range(1000))
    h = token_block_hashes(toks, 16)  # 62 blocks = 992 tokens
    pv.record(h, prefill=1, decode=0)
    router = Router(RouterConfig.of([("127.0.0.1", 1), ("127.0.0.1", 2)], [("127.0.0.1", 3), ("127.0.0.1", 4)],
                                    "round_robin"))
    view = router.views.view(0.0, 1.0, router.prefill, router.decode)
    pv.annotate(view, h, 1000)
    assert [v.cached_tokens for v in view.prefill] == [0, 992]
    assert [v.cached_tokens for v in view.decode] == [992, 0]
    view = router.views.view(0.0, 1.0, router.prefill, router.decode)
    pv.annotate(view, h, 992)  # a prompt of whole blocks: at most L - 1 tokens count as cached
    assert view.prefill[1].cached_tokens == 991


def test_router_passes_its_estimate_to_the_policy():
    """The second request with the same prefix sees the instances the first was routed to as holding it."""
    seen = []

    from deflectlab.envs.view import Decision, Policy

    class Spy(Policy):
        name = "spy"

        def decide(self, view, request):
            seen.append(([p.cached_tokens for p in view.prefill], [d.cached_tokens for d in view.decode]))
            return Decision.prefill(1, 0) if len(seen) == 1 else Decision.deflect(1)

    router = Router(RouterConfig.of([("127.0.0.1", 1), ("127.0.0.1", 2)], [("127.0.0.1", 3), ("127.0.0.1", 4)],
                                    Spy()))
    body = {"prompt": list(range(700))}
    for i in range(3):
        router.decide(RoutedRequest(i, 0.1 * i, 700, router.prefix.hashes(body)))
    assert seen[0] == ([0, 0], [0, 0])
    assert seen[1] == ([0, 688], [688, 0])  # 43 blocks of 16 on the instances of the first route
    assert seen[2] == ([0, 688], [688, 688])  # the deflection to decode 1 counted too


@pytest.mark.parametrize("body", [{}, {"prompt": 3}])
def test_no_prompt_no_hashes(body):
    assert request_block_hashes(body, 16) == []
