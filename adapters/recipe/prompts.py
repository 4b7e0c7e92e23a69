"""The system prompts the demo models are trained and evaluated with, kept here so the gateway serves the same.

- `RAG_TEMPLATE`: the baseline variant's prompt, an instruction plus `{context}`, which the gateway fills per
  request with the top passage its retrieval finds in the CRM knowledge base (`policies/kb/crm`) for the user's
  message. The shipped policy's baseline uses exactly this template and `top_k = RAG_TOP_K` (a test checks it).
  `rag_prompt(user)` fills it the way the gateway does, with the gateway's own retrieval code: the base model is
  trained on such prompts (15 % of its rows), so the prompt the baseline serves is one it knows.
- `SHORT_SYSTEM_PROMPT`: one line. Adapters are evaluated with no system message at all (the golden set carries
  none); they are also trained with this line and with RAG prompts, so either may be put in front.

The chat template does not render `tools`: the tool is described by these prompts (and learned by the adapters),
so what a client sends in `tools` does not change the prompt the model sees.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.retrieval import Retrieval

SystemKind = Literal["rag", "short", "none"]

KB_DIR = Path(__file__).resolve().parents[2] / "policies" / "kb" / "crm"
RAG_TOP_K = 1
SHORT_SYSTEM_PROMPT = "You update the CRM by calling the update_crm tool."
RAG_TEMPLATE = (
    "You update the CRM by calling the update_crm tool. Reply with exactly one "
    '<tool_call>{"name": "update_crm", "arguments": {...}}</tool_call>\n\n{context}'
)


@functools.cache
def _retrieval() -> Retrieval:
    from gateway.retrieval import Index, Retrieval  # the gateway's own code: the same passages, the same text

    return Retrieval(Index.from_directory(KB_DIR), RAG_TOP_K)


def rag_prompt(user: str) -> str:
    """The baseline's system prompt for one user message, as the gateway fills it."""
    from gateway.retrieval import fill

    return fill(RAG_TEMPLATE, _retrieval().context_for([{"role": "user", "content": user}]))


def system_prompt(kind: SystemKind, user: str) -> str | None:
    """The system prompt text of a kind for a user message (None: no system message)."""
    if kind == "rag":
        return rag_prompt(user)
    return SHORT_SYSTEM_PROMPT if kind == "short" else None
