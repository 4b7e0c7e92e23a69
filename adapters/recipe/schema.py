"""The `update_crm` tool: its JSON schema, written once here and reused by the data generator, the evaluator, the
golden set and the gateway's tests.

The schema is plain data (JSON Schema draft 2020-12). `tool()` wraps it in the OpenAI `tools[]` shape that clients
send and the golden set records. Validation lives in `evaluate.py` (it needs the `jsonschema` package, which the
gateway's own venv does not carry).
"""

from __future__ import annotations

import copy
from typing import Any

TOOL_NAME = "update_crm"
TOOL_DESCRIPTION = (
    "Update one deal in the CRM: its account, pipeline stage, amount in EUR and expected close date."
)
STAGES = ("lead", "qualified", "proposal", "negotiation", "won", "lost")
REQUIRED = ("account_id", "stage", "amount", "close_date")
NOTE_MAX_CHARS = 200

ARGUMENTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "account_id": {
            "type": "string",
            "pattern": "^ACC-[0-9]{5}$",
            "description": "The account's id: ACC- and five digits.",
        },
        "stage": {"type": "string", "enum": list(STAGES), "description": "The deal's pipeline stage."},
        "amount": {"type": "number", "minimum": 0, "description": "The deal value in EUR, a plain number."},
        "close_date": {"type": "string", "format": "date", "description": "Expected close date, YYYY-MM-DD."},
        "note": {"type": "string", "maxLength": NOTE_MAX_CHARS, "description": "An optional short note."},
    },
    "required": list(REQUIRED),
    "additionalProperties": False,
}


def arguments_schema() -> dict[str, Any]:
    """A fresh copy of the arguments schema (callers may not mutate the shared one)."""
    return copy.deepcopy(ARGUMENTS_SCHEMA)


def tool() -> dict[str, Any]:
    """The tool in OpenAI's `tools[]` format, as clients send it."""
    return {
        "type": "function",
        "function": {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": arguments_schema()},
    }
