"""Prefix keys: which requests share the leading part of their prompt, as the engine will see it.

vLLM (and SGLang) keep the KV cache of prompt prefixes they have prefilled and skip that prefill when a
later prompt starts the same way. Routing requests that share a prefix to one worker is what makes that
cache pay. A request's prefix is hashed at a few block-sized steps (256, 512, 1,024 ... characters, up to
64 Ki), the way the production-stack and SGLang routers hash token blocks, so a partial overlap (a shared
system prompt, the earlier turns of a conversation) is seen too. Characters stand in for tokens: a
request is keyed where it enters (upload, client, gateway), before any tokenizer, and a prefix of
characters is a prefix of tokens for every tokenizer up to the last partial token.

The text hashed is the request as the chat template lays it out: the served model and adapter, the tool
definitions (templates put them in the system turn), then each message's role and content in order.
Only hashes are kept, never a second copy of the prompt.

- ``prefix_levels(request)``: the hash at each step, shortest first (the single-request path looks the
  owner of each up, longest first, so a conversation's next turn finds the worker of its last one).
- ``group_key(request)``: the one key a batch line is grouped and routed by: the longest step that ends
  before the last message starts (where the question of a RAG prompt usually begins), else the longest
  step of the whole prompt. 52 bits, so it is exact as a Redis sorted-set score.
"""

from __future__ import annotations

import hashlib
import json

from inferpool.wire import AnyRequest, ChatMessage, ChatRequest

#: The shortest step; each next step is twice as long.
BLOCK_CHARS = 256
#: The longest prefix hashed: past this, prompts that agree are the same document for routing.
MAX_PREFIX_CHARS = 64 * 1024
#: Keys fit in a double's 53-bit mantissa (sorted-set scores) with room for one flag bit.
KEY_BITS = 52
_KEY_MASK = (1 << KEY_BITS) - 1
_SEPARATOR = "\x1e"  # between messages: no message text can make two layouts hash alike by accident


def _content_text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        text = "".join(part.text if part.type == "text" else f"<image {part.image_url.url}>" for part in content)
    if message.tool_calls:
        text += json.dumps(message.tool_calls, sort_keys=True, separators=(",", ":"))
    return text


def prompt_layout(request: AnyRequest) -> tuple[str, int]:
    """(the text the prefix keys are taken from, where its last message starts). A completion's prompt (or an
    embedding's inputs) is one message."""
    head = request.model + _SEPARATOR
    if not isinstance(request, ChatRequest):
        return head + request.kind + _SEPARATOR + request.prompt_text(), len(head)
    if request.tools:
        head += json.dumps(request.tools, sort_keys=True, separators=(",", ":")) + _SEPARATOR
    parts = [f"{m.role}:{_content_text(m)}{_SEPARATOR}" for m in request.messages]
    last_start = len(head) + sum(len(part) for part in parts[:-1])
    return head + "".join(parts), last_start


def _steps(length: int) -> list[int]:
    """The step lengths a text of ``length`` characters is hashed at (its whole length when it is shorter
    than one block: a short prompt is its own prefix)."""
    steps = []
    step = BLOCK_CHARS
    while step <= min(length, MAX_PREFIX_CHARS):
        steps.append(step)
        step *= 2
    return steps or [length]


def _key(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big") & _KEY_MASK


def prefix_levels(request: AnyRequest) -> list[int]:
    """The prefix key at each step, shortest prefix first."""
    text, _ = prompt_layout(request)
    return _level_keys(text, _steps(len(text)))


def _level_keys(text: str, cuts: list[int]) -> list[int]:
    hasher = hashlib.blake2b(digest_size=8)
    keys = []
    done = 0
    for cut in cuts:
        hasher.update(text[done:cut].encode("utf-8", "surrogatepass"))
        keys.append(_key(hasher.copy().digest()))
        done = cut
    return keys


def _group_cut(steps: list[int], last_start: int) -> int:
    before_last = [step for step in steps if step <= last_start]
    return before_last[-1] if before_last else steps[-1]


def group_key(request: AnyRequest) -> int:
    """The key a batch line is grouped and routed by (see the module's docstring)."""
    text, last_start = prompt_layout(request)
    cut = _group_cut(_steps(len(text)), last_start)
    return _key(hashlib.blake2b(text[:cut].encode("utf-8", "surrogatepass"), digest_size=8).digest())


def request_keys(request: AnyRequest) -> tuple[list[int], int]:
    """(``prefix_levels``, ``group_key``) of a request, from one layout and one pass of the hash."""
    text, last_start = prompt_layout(request)
    steps = _steps(len(text))
    levels = _level_keys(text, steps)
    return levels, levels[steps.index(_group_cut(steps, last_start))]
