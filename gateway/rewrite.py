"""How a variant changes the client's request before it goes to the engine. Pure.

The variant names the engine model (a base model or a LoRA adapter) and may carry a system prompt. The prompt is
*merged*: when the conversation already starts with a system (or developer) message whose content is a string, the
variant's prompt is put in front of it, separated by a blank line, so the engine still sees exactly one leading
system message (many chat templates accept no other); otherwise a new system message is inserted first. Fields the
gateway does not know pass through untouched. Streams always ask the engine for the usage chunk, so that every
stream can be priced; the relay drops that chunk again when the client did not ask for it.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import BadRequest
from gateway.openai_types import MAX_DEPTH, deeper_than, deepest_field, nesting_too_deep
from gateway.policy import Variant

CONTEXT = "{context}"


def engine_body(body: dict[str, Any], variant: Variant, *, stream: bool, context: str | None = None) -> bytes:
    """The engine's request. `context` (retrieved passages) replaces `{context}` in the variant's prompt."""
    out = dict(body)
    out["model"] = variant.model
    if variant.system_prompt:
        prompt = variant.system_prompt
        if context is not None:
            prompt = prompt.replace(CONTEXT, context)  # not str.format: prompts may hold JSON braces
        out["messages"] = with_system_prompt(body["messages"], prompt)
    if stream:
        options = body.get("stream_options")
        out["stream_options"] = {**options, "include_usage": True} if options else {"include_usage": True}
    try:
        return orjson.dumps(out)
    except orjson.JSONEncodeError as exc:  # only the client's content can cause it
        # orjson writes 254 levels: the nesting limit is checked here, for free.
        if deeper_than(out, MAX_DEPTH):
            raise nesting_too_deep(deepest_field(out)) from None
        raise BadRequest(f"The request cannot be forwarded to the engine: {exc}.") from None


def with_system_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    first = messages[0]
    if first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
        merged = {**first, "content": f"{prompt}\n\n{first['content']}"}
        return [merged, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
