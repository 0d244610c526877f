"""What the router and the engine emulator share about vLLM's OpenAI-compatible API.

One place for: reading and checking a completions or chat body, counting its prompt tokens, vLLM-style error
bodies, and the ``kv_transfer_params`` of vLLM's disaggregated-serving (P/D) protocol.

Prompt token count
------------------
The router needs a prompt's length for the policy; the emulator needs it for timing. Both call
:func:`prompt_token_counts`, so they always agree:

* a prompt given as token ids (``[1, 2, 3]``, or ``[[1, 2, 3]]``) counts exactly: one token per id;
* text counts as ``ceil(utf8_bytes / 4)``, at least 1: the usual "about four characters per token" rule of
  BPE tokenizers on English text and code (deterministic, no tokenizer files needed; a real model's
  tokenizer will differ by tens of percent, which is why replays send token ids);
* a chat request counts every message's text the same way, plus :data:`CHAT_TOKENS_PER_MESSAGE` per message
  and :data:`CHAT_REPLY_PRIMING_TOKENS` once (the chat template's role markers; the OpenAI cookbook's
  estimate for ChatML-style templates). Content given as a list of parts counts its ``text`` parts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

#: Chat template overhead per message, tokens (role marker and separators, ChatML-style templates).
CHAT_TOKENS_PER_MESSAGE = 4
#: Chat template tokens that prime the assistant's reply, once per request.
CHAT_REPLY_PRIMING_TOKENS = 3
#: Bytes of UTF-8 text per estimated token.
BYTES_PER_TOKEN = 4

#: What the router sends to a prefill instance (vLLM's disaggregated proxy, NixlConnector protocol).
PRODUCER_REQUEST_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

#: Fields the router removes from the prefill hop's body (vLLM's proxy: P computes one token only).
PREFILL_HOP_DROPPED_FIELDS = ("stream_options", "min_tokens", "min_completion_tokens")

#: Header carrying a deflection's chunk cap (tokens per step) to the decode instance. vLLM ignores it (it has
#: no per-request chunk cap; its ``--long-prefill-token-threshold`` caps all prompts); the emulator honours it.
CHUNK_CAP_HEADER = "X-Deflectlab-Chunk-Cap"


class RequestError(ValueError):
    """A client request is malformed; ``message`` names the problem. Answered with HTTP ``code``."""

    def __init__(self, message: str, code: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.err_type = err_type
        self.param = param


def error_body(message: str, code: int = 400, err_type: str = "BadRequestError",
               param: str | None = None) -> dict[str, Any]:
    """vLLM's ``ErrorResponse``: ``{"object": "error", "message", "type", "param", "code"}``."""
    return {"object": "error", "message": message, "type": err_type, "param": param, "code": code}


def stream_error_event(message: str, code: int = 502, err_type: str = "BadGatewayError") -> bytes:
    """An SSE event reporting an error mid-stream, as vLLM writes it (``data: {"error": {...}}``); the OpenAI
    client libraries raise on it."""
    payload = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def estimate_text_tokens(text: str) -> int:
    """Deterministic token estimate of a text: ``ceil(utf8 bytes / 4)``, at least 1."""
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


_INT_ONLY = {int}


def _is_token_ids(x: Any) -> bool:
    # set(map(type, ...)) and min() run in C: about twice as fast as a generator over a long prompt
    return isinstance(x, list) and len(x) > 0 and set(map(type, x)) == _INT_ONLY and min(x) >= 0


def _message_text_tokens(content: Any, where: str) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_text_tokens(content) if content else 0
    if isinstance(content, list):
        n = 0
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise RequestError(f"{where}.content[{i}] must be an object with a 'type'", param="messages")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError(f"{where}.content[{i}].text must be a string", param="messages")
                n += estimate_text_tokens(text) if text else 0
        return n
    raise RequestError(f"{where}.content must be a string, a list of parts or null", param="messages")


def prompt_token_counts(body: dict[str, Any], chat: bool) -> list[int]:
    """Prompt length of each prompt in a request, tokens (see the module docstring for the rule).

    A completions request may batch several prompts (a list of strings or of token-id lists); a chat request
    has one. Raises :class:`RequestError` naming the problem for a missing or malformed prompt.
    """
    if chat:
        msgs = body.get("messages")
        if msgs is None:
            hint = ("; this body has a 'prompt': send completions to /v1/completions" if "prompt" in body else "")
            raise RequestError(f"'messages' is required for /v1/chat/completions{hint}", param="messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' must be a non-empty list of messages", param="messages")
        n = CHAT_REPLY_PRIMING_TOKENS
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
            n += CHAT_TOKENS_PER_MESSAGE + _message_text_tokens(m.get("content"), f"messages[{i}]")
        return [n]
    if "prompt" not in body or body["prompt"] is None:
        hint = ("; this body has 'messages': send chat requests to /v1/chat/completions" if "messages" in body
                else "")
        raise RequestError(f"'prompt' is required for /v1/completions{hint}", param="prompt")
    p = body["prompt"]
    if isinstance(p, str):
        if not p:
            raise RequestError("'prompt' must not be empty", param="prompt")
        return [estimate_text_tokens(p)]
    if _is_token_ids(p):
        return [len(p)]
    if isinstance(p, list) and p and all(type(t) is int for t in p):
        raise RequestError("'prompt' token ids must be integers >= 0", param="prompt")
    if isinstance(p, list) and p:
        out = []
        for i, q in enumerate(p):
            if isinstance(q, str) and q:
                out.append(estimate_text_tokens(q))
            elif _is_token_ids(q):
                out.append(len(q))
            else:
                raise RequestError(f"prompt[{i}] must be a non-empty string or a non-empty list of token ids "
                                   "(integers >= 0)", param="prompt")
        return out
    raise RequestError("'prompt' must be a non-empty string, a list of token ids (integers >= 0), or a list of "
                       "those", param="prompt")


def _positive_int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if type(v) is not int:
        raise RequestError(f"'{name}' must be an integer, got {v!r}", param=name)
    if v < 1:
        raise RequestError(f"'{name}' must be at least 1, got {v}", param=name)
    return v


@dataclass(slots=True)
class ParsedRequest:
    """A checked completions or chat request.

    :param body: the JSON body as parsed.
    :param chat: ``/v1/chat/completions`` (True) or ``/v1/completions``.
    :param prompt_tokens: prompt length of each prompt, tokens.
    :param max_tokens: requested output cap, tokens (``max_completion_tokens`` wins for chat), or None.
    :param stream: SSE streaming asked for.
    """

    body: dict[str, Any]
    chat: bool
    prompt_tokens: list[int]
    max_tokens: int | None
    stream: bool

    @property
    def total_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens)


def parse_request(raw: bytes, chat: bool) -> ParsedRequest:
    """Parse and check a request body. Raises :class:`RequestError` (HTTP 400) naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    counts = prompt_token_counts(body, chat)
    max_tokens = _positive_int_field(body, "max_tokens")
    if chat:
        mct = _positive_int_field(body, "max_completion_tokens")
        if mct is not None:
            max_tokens = mct
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be a boolean, got {stream!r}", param="stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    kvp = body.get("kv_transfer_params")
    if kvp is not None and not isinstance(kvp, dict):
        raise RequestError("'kv_transfer_params' must be an object", param="kv_transfer_params")
    return ParsedRequest(body, chat, counts, max_tokens, stream)


def prefill_hop_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body the router sends to a prefill instance: a copy of the client's with vLLM's producer
    ``kv_transfer_params``, ``stream`` false, ``max_tokens`` 1 (and ``max_completion_tokens`` 1 if present),
    and ``stream_options``, ``min_tokens``, ``min_completion_tokens`` removed."""
    out = dict(body)
    out["kv_transfer_params"] = dict(PRODUCER_REQUEST_PARAMS)
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    for k in PREFILL_HOP_DROPPED_FIELDS:
        out.pop(k, None)
    return out


_JSON_SPACE = b" \t\n\r"


def with_kv_params(raw: bytes, kvp: dict[str, Any]) -> bytes | None:
    """The client's body bytes ``raw`` (a JSON object without ``kv_transfer_params``) with
    ``"kv_transfer_params": kvp`` added as its last member, without re-serialising the rest: on a long
    token-id prompt that saves a whole ``json.dumps`` of the body (about 0.4 ms for 8,000 ids). None when
    ``raw`` is not plain UTF-8 object text (a BOM, UTF-16/32, an empty object): the caller serialises then."""
    body = raw.strip(_JSON_SPACE)
    if len(body) < 3 or body[0] != 0x7B or body[-1] != 0x7D or body[1] == 0 or body[-2] == 0:  # '{', '}'
        return None
    if body[1:-1].strip(_JSON_SPACE) == b"":
        return None
    return body[:-1] + b',"kv_transfer_params":' + dumps(kvp) + b"}"


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (what the router sends upstream)."""
    return json.dumps(obj, separators=(",", ":")).encode()
