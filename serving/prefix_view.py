"""The router's estimate of what each vLLM instance holds in its prefix cache, for cache-aware policies.

**Block hashes.** vLLM's automatic prefix caching hashes a prompt in full blocks of ``block_size`` tokens (16 by
default), each hash chained to its parent's (``vllm/v1/core/kv_cache_utils.py``, ``hash_block_tokens``: the
parent hash, the block's token ids and extra keys). The router does the same over the request's token ids when
it carries them (a completions ``prompt`` given as token ids); otherwise it hashes the prompt's UTF-8 bytes (a
chat request's messages as JSON) in blocks of ``block_size x BYTES_PER_TOKEN`` bytes, a stand-in: it chains
over equal prefixes of text as vLLM's chains over equal prefixes of tokens, with the block boundaries placed by
an assumed 4 bytes per token. The hash function itself (BLAKE2b, 8 bytes) need not equal vLLM's: only equality
of prefixes matters, and the values never leave the router.

**Cache contents.** vLLM does not export which blocks an instance caches, so the router estimates them from its
own routing history: every prompt it sends to an instance is taken as cached there, the instance's cache being an
LRU of whole blocks as large as the instance's KV pool (``kv_capacity_tokens`` of its profile). A prefill-path
request counts on its prefill instance and, when the policy names it, on its decode instance (which receives the
KV); a deflected one on its decode instance. The estimate is optimistic: it ignores the room running requests
take from the pool (vLLM evicts cached blocks for them) and requests routed by anyone else. The view's
``cached_tokens`` of each instance is the estimate's longest cached prefix of the arriving prompt, at most the
prompt less one token (vLLM recomputes the last token).
"""

from __future__ import annotations

import json
from array import array
from collections import OrderedDict
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel
    from deflectlab.envs.view import ClusterView

#: Assumed bytes of prompt text per token for the byte stand-in (English text under BPE tokenizers of the GPT
#: and Llama families runs at about 4 characters a token; an assumption, not measured here).
BYTES_PER_TOKEN = 4
_ROOT = b"deflectlab-prefix"
_INT_ONLY = {int}
_ITEM = array("q").itemsize  # 8 bytes per token id


def _chain(blocks: list[bytes]) -> list[int]:
    out, parent = [], _ROOT
    for b in blocks:
        parent = blake2b(parent + b, digest_size=8).digest()
        out.append(int.from_bytes(parent, "little"))
    return out


def token_block_hashes(token_ids: list[int], block_tokens: int) -> list[int]:
    """Chained hashes of the full ``block_tokens``-token blocks of ``token_ids`` (a partial last block: none)."""
    n = len(token_ids) // block_tokens
    data = array("q", token_ids[:n * block_tokens]).tobytes()  # one conversion, then byte slices of each block
    size = block_tokens * _ITEM
    return _chain([data[i * size:(i + 1) * size] for i in range(n)])


def byte_block_hashes(text: bytes, block_tokens: int) -> list[int]:
    """The stand-in over text: chained hashes of full blocks of ``block_tokens x BYTES_PER_TOKEN`` bytes."""
    size = block_tokens * BYTES_PER_TOKEN
    return _chain([text[i * size:(i + 1) * size] for i in range(len(text) // size)])


def request_block_hashes(body: dict[str, Any], block_tokens: int) -> list[int]:
    """A completions or chat request body's block hashes: token ids when ``prompt`` is a list of ints, else the
    bytes of ``prompt`` (text) or of ``messages`` (JSON)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]  # a batch of token-id prompts: the router routes the first's prefix
    if isinstance(prompt, list) and (not prompt or set(map(type, prompt)) == _INT_ONLY):  # ints, no bools (in C)
        return token_block_hashes(prompt, block_tokens)
    if isinstance(prompt, str):
        return byte_block_hashes(prompt.encode(), block_tokens)
    if "messages" in body:
        return byte_block_hashes(json.dumps(body["messages"], sort_keys=True).encode(), block_tokens)
    return []


class CacheEstimate:
    """One instance's estimated prefix cache: an LRU of block hashes, ``capacity`` blocks at most."""

    __slots__ = ("capacity", "blocks")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` estimated cached."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def add(self, hashes: list[int]) -> None:
        """The prompt was sent here: its blocks are the most recently used (the oldest beyond capacity go)."""
        blocks = self.blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class PrefixView:
    """Per-instance cache estimates of a router (see the module docstring).

    :param num_prefill: prefill instances (view indices).
    :param num_decode: decode instances.
    :param prefill_profile: the prefill instances' profile (KV capacity, block size).
    :param decode_profile: the decode instances' profile.
    """

    def __init__(self, num_prefill: int, num_decode: int, prefill_profile: LatencyModel,
                 decode_profile: LatencyModel) -> None:
        self.block_tokens = decode_profile.kv_block_tokens
        self.prefill = [CacheEstimate(prefill_profile.kv_capacity_tokens // prefill_profile.kv_block_tokens)
                        for _ in range(num_prefill)]
        self.decode = [CacheEstimate(decode_profile.kv_capacity_tokens // decode_profile.kv_block_tokens)
                       for _ in range(num_decode)]

    def hashes(self, body: dict[str, Any]) -> list[int]:
        return request_block_hashes(body, self.block_tokens)

    def annotate(self, view: ClusterView, hashes: list[int], prompt_tokens: int) -> None:
        """Set each node view's ``cached_tokens`` to the estimate's hit for this prompt."""
        if not hashes:
            return
        cap = max(prompt_tokens - 1, 0)
        bt = self.block_tokens
        for v, est in zip(view.prefill, self.prefill):
            v.cached_tokens = min(est.match(hashes) * bt, cap)
        for v, est in zip(view.decode, self.decode):
            v.cached_tokens = min(est.match(hashes) * bt, cap)

    def record(self, hashes: list[int], prefill: int | None, decode: int | None) -> None:
        """A request was routed: its prompt will be cached on ``prefill`` and ``decode`` (view indices, or None)."""
        if not hashes:
            return
        if prefill is not None:
            self.prefill[prefill].add(hashes)
        if decode is not None:
            self.decode[decode].add(hashes)
