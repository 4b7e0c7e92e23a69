"""The system prompts the demo models were trained and evaluated with, kept here so the gateway can reuse them.

- `RAG_SYSTEM_PROMPT`: the baseline variant's prompt, an instruction plus the field guide a retrieval step would
  bring in (what each field means, the allowed stages, how to write amounts and dates). The base model's golden-set
  numbers in its lineage were measured with exactly this text as the only system message.
- `SHORT_SYSTEM_PROMPT`: one line, the same as the shipped policy's baseline prompt. Adapters are evaluated with no
  system message at all (the golden set carries none); they were also trained with this line and with the RAG
  prompt, so either may be put in front without leaving the training distribution.

The chat template does not render `tools`: the tool is described by these prompts (and learned by the adapters),
so what a client sends in `tools` does not change the prompt the model sees.
"""

from __future__ import annotations

from typing import Literal

SystemKind = Literal["rag", "short", "none"]

SHORT_SYSTEM_PROMPT = "You update the CRM by calling the update_crm tool."

FIELD_GUIDE = """\
Fields (from the CRM handbook):
- account_id: ACC- and five digits, e.g. ACC-04821.
- stage: one of lead, qualified, proposal, negotiation, won, lost. Closed-won or signed is won; closed-lost is lost.
- amount: EUR as a plain number, never a string: "€18.5k" is 18500.
- close_date: YYYY-MM-DD. "Next month" is the first day of the month after today's date.
- note: optional, at most 200 characters."""

RAG_SYSTEM_PROMPT = (
    "You update the CRM by calling the update_crm tool. Reply with exactly one "
    '<tool_call>{"name": "update_crm", "arguments": {...}}</tool_call>\n\n' + FIELD_GUIDE
)

SYSTEM_PROMPTS: dict[SystemKind, str | None] = {
    "rag": RAG_SYSTEM_PROMPT,
    "short": SHORT_SYSTEM_PROMPT,
    "none": None,
}


def system_prompt(kind: SystemKind) -> str | None:
    """The system prompt text of a kind (None: no system message)."""
    return SYSTEM_PROMPTS[kind]
