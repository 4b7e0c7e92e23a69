"""Tool-call validation against a realistic CRM tool: what the request declared, what came back, verdicts."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.toolcalls import (
    MAX_ARGUMENT_DEPTH,
    Completion,
    Expectation,
    SchemaCache,
    ToolCall,
    Verdict,
    check,
    completions_from_response,
    expectation_from_request,
)

UPDATE_CRM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "account_id": {"type": "string", "pattern": "^ACC-[0-9]{6}$"},
        "stage": {
            "type": "string",
            "enum": ["prospecting", "qualification", "proposal", "negotiation", "closed_won", "closed_lost"],
        },
        "amount": {"type": "number", "minimum": 0},
        "close_date": {"type": "string", "format": "date"},
        "line_items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
            },
        },
        "notes": {"type": "string", "maxLength": 500},
    },
    "required": ["account_id", "stage", "amount"],
    "additionalProperties": False,
}

LOOKUP_ACCOUNT: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string", "minLength": 1}},
    "required": ["query"],
}

GOOD_ARGS = {
    "account_id": "ACC-004211",
    "stage": "negotiation",
    "amount": 48000.0,
    "close_date": "2025-09-30",
}


def tool(name: str, parameters: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name, "description": f"{name} tool", **extra}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


def request(tool_choice: Any = None, response_format: Any = None, tools: Any = "crm") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "crm-assistant",
        "messages": [
            {"role": "user", "content": "Move Acme to negotiation at 48k, closing end of September."}
        ],
    }
    if tools == "crm":
        body["tools"] = [tool("update_crm", UPDATE_CRM), tool("lookup_account", LOOKUP_ACCOUNT)]
    elif tools is not None:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if response_format is not None:
        body["response_format"] = response_format
    return body


def call(arguments: Any, name: str = "update_crm", id: str = "chatcmpl-tool-1") -> ToolCall:
    raw = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
    return ToolCall(id=id, name=name, arguments=raw)


def choice(
    *calls: ToolCall, content: str | None = None, finish: str | None = "tool_calls", index: int = 0
) -> Completion:
    return Completion(index=index, content=content, tool_calls=calls, finish_reason=finish)


def verdict(
    *choices: Completion, body: dict[str, Any] | None = None, cache: SchemaCache | None = None
) -> Verdict:
    return check(choices, expectation_from_request(body or request()), cache or SchemaCache())


# --- reading the request ------------------------------------------------------------------------------------


def test_expectation_reads_tools_choice_and_response_format() -> None:
    schema = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    exp = expectation_from_request(
        request(
            tool_choice={"type": "function", "function": {"name": "update_crm"}},
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
    )
    assert dict(exp.tools) == {"update_crm": UPDATE_CRM, "lookup_account": LOOKUP_ACCOUNT}
    assert exp.required is True
    assert exp.forced_name == "update_crm"
    assert exp.tool_choice == "named"
    assert exp.content_schema == schema
    assert exp.active


@pytest.mark.parametrize(
    ("tool_choice", "tools", "expected", "required"),
    [
        (None, "crm", "auto", False),
        (None, None, "none", False),
        ("auto", "crm", "auto", False),
        ("none", "crm", "none", False),
        ("required", "crm", "required", True),
        ({"type": "function"}, "crm", "auto", False),
        ("any", "crm", "auto", False),
    ],
)
def test_tool_choice_forms(tool_choice: Any, tools: Any, expected: str, required: bool) -> None:
    exp = expectation_from_request(request(tool_choice=tool_choice, tools=tools))
    assert (exp.tool_choice, exp.required, exp.forced_name) == (expected, required, None)


def test_expectation_ignores_malformed_entries() -> None:
    tools = [
        "update_crm",
        None,
        {"type": "function"},
        {"type": "function", "function": {"parameters": UPDATE_CRM}},  # no name
        {"type": "function", "function": {"name": 7}},
        {"type": "custom", "custom": {"name": "grammar_tool"}},
        {"type": "function", "function": {"name": "lookup_account", "parameters": "not a schema"}},
        tool("update_crm", UPDATE_CRM),
    ]
    exp = expectation_from_request(
        request(tools=tools, response_format={"type": "json_schema", "json_schema": 1})
    )
    assert dict(exp.tools) == {"lookup_account": None, "update_crm": UPDATE_CRM}
    assert exp.content_schema is None
    assert expectation_from_request(request(tools={"not": "a list"})).tools == {}


def test_active_only_when_something_can_be_checked() -> None:
    assert not expectation_from_request(request(tools=None)).active
    assert not expectation_from_request(request(tools=None, response_format={"type": "json_object"})).active
    assert not expectation_from_request(request(tool_choice="none")).active
    assert expectation_from_request(request(tool_choice="auto")).active
    schema_only = request(tools=None, response_format={"type": "json_schema", "json_schema": {"schema": {}}})
    assert expectation_from_request(schema_only).active


# --- verdicts on tool calls ---------------------------------------------------------------------------------


def test_valid_call() -> None:
    v = verdict(choice(call(GOOD_ARGS)))
    assert v == Verdict("valid", None, None, None, 1)
    assert v.header == "valid"


def test_parallel_calls_all_valid_count_every_call() -> None:
    v = verdict(choice(call({"query": "Acme"}, name="lookup_account"), call(GOOD_ARGS, id="chatcmpl-tool-2")))
    assert (v.status, v.calls) == ("valid", 2)


def test_unknown_tool() -> None:
    v = verdict(choice(call(GOOD_ARGS, name="delete_account")))
    assert (v.status, v.reason, v.header, v.calls) == ("invalid", "unknown_tool", "invalid", 1)


def test_forced_tool_but_another_called_is_unknown_tool() -> None:
    body = request(tool_choice={"type": "function", "function": {"name": "update_crm"}})
    v = verdict(choice(call({"query": "Acme"}, name="lookup_account"), finish="stop"), body=body)
    assert (v.status, v.reason) == ("invalid", "unknown_tool")


def test_malformed_arguments() -> None:
    v = verdict(choice(call('{"account_id": "ACC-004211", "stage": "negotiation", "amount": ')))
    assert (v.status, v.reason, v.path, v.detail) == ("invalid", "malformed_json", None, None)


def test_wrong_type_reports_instance_and_schema_paths() -> None:
    v = verdict(choice(call({**GOOD_ARGS, "amount": "forty-eight thousand"})))
    assert v == Verdict("invalid", "schema_violation", "/amount", "type at /properties/amount/type", 1)


@pytest.mark.parametrize(
    ("change", "path", "detail"),
    [
        ({"stage": "won"}, "/stage", "enum at /properties/stage/enum"),
        ({"amount": -5}, "/amount", "minimum at /properties/amount/minimum"),
        ({"account_id": "acme"}, "/account_id", "pattern at /properties/account_id/pattern"),
        ({"close_date": "next Friday"}, "/close_date", "format at /properties/close_date/format"),
        ({"close_date": "2025-02-30"}, "/close_date", "format at /properties/close_date/format"),
        ({"priority": "high"}, "", "additionalProperties at /additionalProperties"),
        (
            {"line_items": [{"sku": "X1", "qty": 2}, {"sku": "X2", "qty": 0}]},
            "/line_items/1/qty",
            "minimum at /properties/line_items/items/properties/qty/minimum",
        ),
    ],
)
def test_schema_violations(change: dict[str, Any], path: str, detail: str) -> None:
    v = verdict(choice(call({**GOOD_ARGS, **change})))
    assert (v.status, v.reason, v.path, v.detail) == ("invalid", "schema_violation", path, detail)


def test_missing_required_property_points_at_the_object() -> None:
    args = {k: v for k, v in GOOD_ARGS.items() if k != "amount"}
    v = verdict(choice(call(args)))
    assert (v.reason, v.path, v.detail) == ("schema_violation", "", "required at /required")


def test_named_call_with_non_object_arguments() -> None:
    # Seen on vLLM: a forced named call on a non-strict tool returned "arguments": "true".
    body = request(tool_choice={"type": "function", "function": {"name": "update_crm"}})
    v = verdict(choice(call("true"), finish="stop"), body=body)
    assert (v.reason, v.path, v.detail) == ("schema_violation", "", "type at /type")


def test_formats_can_be_left_as_annotations() -> None:
    v = verdict(
        choice(call({**GOOD_ARGS, "close_date": "next Friday"})), cache=SchemaCache(validate_formats=False)
    )
    assert v.status == "valid"


def test_tool_without_parameters_needs_only_json() -> None:
    body = request(tools=[tool("ping", None)])
    assert verdict(choice(call("{}", name="ping")), body=body).status == "valid"
    assert verdict(choice(call("{", name="ping")), body=body).reason == "malformed_json"


def test_pointer_escapes_and_ref_paths() -> None:
    schema = {
        "type": "object",
        "$defs": {"day": {"type": "string", "format": "date"}},
        "properties": {"a/b~c": {"type": "integer"}, "due": {"$ref": "#/$defs/day"}},
    }
    body = request(tools=[tool("t", schema)])
    v = verdict(choice(call({"a/b~c": "x"}, name="t")), body=body)
    assert (v.path, v.detail) == ("/a~1b~0c", "type at /properties/a~1b~0c/type")
    v = verdict(choice(call({"due": "soon"}, name="t")), body=body)
    assert (v.path, v.detail) == ("/due", "format at /$defs/day/format")


# --- text answers, required calls, truncation ---------------------------------------------------------------


def test_text_answer_under_auto_is_none() -> None:
    v = verdict(choice(content="Which Acme account do you mean?", finish="stop"))
    assert (v.status, v.reason, v.header, v.calls) == ("none", None, "none", 0)


def test_required_call_missing() -> None:
    for tc in ("required", {"type": "function", "function": {"name": "update_crm"}}):
        v = verdict(choice(content="Sure, done.", finish="stop"), body=request(tool_choice=tc))
        assert (v.status, v.reason, v.calls) == ("invalid", "missing_tool_call", 0)


@pytest.mark.parametrize(
    "content",
    [
        '<tool_call>{"name": "update_crm", "arguments": {"account_id": ACC-004211}}</tool_call>',  # hermes, bad JSON
        'Done. <tool_call>{"name": "update_crm", "arguments": {"stage": "won"}</tool_call>',
        '[TOOL_CALLS] [{"name": "update_crm", "arguments": {',
    ],
)
def test_a_call_the_engines_parser_could_not_read_is_invalid(content: str) -> None:
    # vLLM's hermes parser returns a call whose JSON does not parse as plain content with no tool_calls.
    v = verdict(choice(content=content, finish="stop"))
    assert (v.status, v.reason, v.header, v.calls) == ("invalid", "unparsed_tool_call", "invalid", 0)


def test_call_markup_is_only_a_verdict_when_tools_are_in_play() -> None:
    text = choice(content="<tool_call> is how the model writes calls", finish="stop")
    assert verdict(text, body=request(tools=None)).status == "none"
    assert verdict(text, body=request(tool_choice="none")).status == "none"


def test_nothing_declared_is_none_even_with_calls() -> None:
    assert verdict(choice(call(GOOD_ARGS)), body=request(tools=None)).status == "none"
    assert verdict(choice(content="hi", finish="stop"), body=request(tools=None)).status == "none"


def test_cut_by_max_tokens_is_truncated_not_invalid() -> None:
    # vLLM returns the cut call as plain content, with no tool_calls.
    cut = choice(content='<tool_call>{"name": "update_crm", "arguments": {"account_id": "AC', finish="length")
    for tc in ("auto", "required"):
        v = verdict(cut, body=request(tool_choice=tc))
        assert (v.status, v.reason, v.header) == ("truncated", "truncated", "none")


def test_several_choices() -> None:
    good = choice(call(GOOD_ARGS), index=0)
    cut = choice(content="<tool_call>{", finish="length", index=1)
    bad = choice(call({**GOOD_ARGS, "stage": "won"}), call(GOOD_ARGS), index=2)
    unknown = choice(call("{}", name="nope"), index=3)
    assert (verdict(good, cut).status, verdict(good, cut).calls) == ("truncated", 1)
    v = verdict(good, cut, bad, unknown)
    assert (v.status, v.reason, v.path, v.calls) == ("invalid", "schema_violation", "/stage", 4)
    assert verdict(good, unknown, bad).reason == "unknown_tool"
    assert verdict(good, choice(content="text", finish="stop", index=1)).status == "valid"
    assert verdict().status == "none"


# --- response_format json_schema ----------------------------------------------------------------------------

SUMMARY = {
    "type": "object",
    "properties": {"account_id": {"type": "string"}, "risk": {"enum": ["low", "medium", "high"]}},
    "required": ["account_id", "risk"],
}


def schema_request() -> dict[str, Any]:
    fmt = {"type": "json_schema", "json_schema": {"name": "summary", "strict": True, "schema": SUMMARY}}
    return request(tools=None, response_format=fmt)


def test_content_schema() -> None:
    body = schema_request()
    ok = choice(content='{"account_id": "ACC-004211", "risk": "low"}', finish="stop")
    assert verdict(ok, body=body) == Verdict("valid", None, None, None, 0)
    v = verdict(choice(content='{"account_id": "ACC-004211", "risk": "severe"}', finish="stop"), body=body)
    assert (v.status, v.reason, v.path, v.detail) == (
        "invalid",
        "schema_violation",
        "/risk",
        "enum at /properties/risk/enum",
    )
    v = verdict(choice(content="The account looks low risk.", finish="stop"), body=body)
    assert (v.status, v.reason) == ("invalid", "malformed_json")
    assert verdict(choice(content=None, finish="stop"), body=body).reason == "malformed_json"
    assert verdict(choice(content='{"account_id": "A', finish="length"), body=body).status == "truncated"


def test_content_schema_with_tools_checks_the_call_not_the_content() -> None:
    body = schema_request()
    body["tools"] = [tool("update_crm", UPDATE_CRM)]
    assert verdict(choice(call(GOOD_ARGS), content=None), body=body).status == "valid"
    assert (
        verdict(choice(content='{"account_id": "x", "risk": "low"}', finish="stop"), body=body).status
        == "valid"
    )


# --- the schema cache ---------------------------------------------------------------------------------------


def test_schema_compiled_once_per_content() -> None:
    cache = SchemaCache()
    first = cache.validator(UPDATE_CRM)
    assert cache.validator(copy.deepcopy(UPDATE_CRM)) is first
    assert cache.size == 1
    for _ in range(3):
        verdict(choice(call(GOOD_ARGS)), cache=cache)
    assert cache.size == 1


def test_cache_is_bounded_lru() -> None:
    cache = SchemaCache(maxsize=2)
    a, b, c = ({"type": t} for t in ("string", "integer", "boolean"))
    va = cache.validator(a)
    cache.validator(b)
    assert cache.validator(a) is va  # a is now the most recent; b gets evicted next
    cache.validator(c)
    assert cache.size == 2
    assert cache.validator(a) is va
    assert cache.validator(b) is not None


BAD_SCHEMAS = [
    ({"type": "objekt"}, "not a valid JSON Schema (draft 2020-12) at /type"),
    ({"type": 5}, "not a valid JSON Schema (draft 2020-12) at /type"),
    (
        {"type": "object", "properties": {"account_id": {"type": "string", "pattern": "(unclosed"}}},
        "at /properties/account_id/pattern",
    ),
    (
        {"$ref": "http://127.0.0.1:9/crm.json"},
        "remote $ref is not allowed",
    ),  # compiled offline: never fetched
    ({"$ref": "crm.json"}, "remote $ref is not allowed"),
]


@pytest.mark.parametrize(("schema", "words"), BAD_SCHEMAS)
def test_a_bad_schema_is_a_400_naming_the_tool_when_the_request_is_read(schema: Any, words: str) -> None:
    cache = SchemaCache()
    body = request(tools=[tool("lookup_account", LOOKUP_ACCOUNT), tool("update_crm", schema)])
    for _ in range(2):
        with pytest.raises(BadRequest) as err:
            expectation_from_request(body, cache)
        assert (err.value.status, err.value.code, err.value.param) == (
            400,
            "invalid_schema",
            "tools[1].function.parameters",
        )
        assert err.value.message.startswith("Tool 'update_crm': its parameters schema ")
        assert words in err.value.message
    assert cache.rejected == 1  # the failed compile is remembered


@pytest.mark.parametrize(("schema", "words"), BAD_SCHEMAS)
def test_a_call_to_a_tool_whose_schema_does_not_compile_is_never_valid(schema: Any, words: str) -> None:
    # Checked without preparing the request's schemas first: the verdict says the schema was unusable.
    cache = SchemaCache()
    body = request(tools=[tool("update_crm", schema)])
    v = verdict(choice(call(GOOD_ARGS)), body=body, cache=cache)
    assert (v.status, v.reason, v.bad_schema, v.calls) == ("invalid", "schema_unusable", True, 1)
    assert verdict(choice(call("{")), body=body, cache=cache).reason == "malformed_json"
    assert cache.rejected == 1
    assert cache.validator(schema) is None


def test_a_bad_schema_makes_the_call_invalid_whatever_its_place() -> None:
    body = request(tools=[tool("broken", {"type": "objekt"}), tool("update_crm", UPDATE_CRM)])
    v = verdict(choice(call(GOOD_ARGS), call("{}", name="broken", id="chatcmpl-tool-2")), body=body)
    assert (v.status, v.reason, v.bad_schema) == ("invalid", "schema_unusable", True)
    v = verdict(choice(call("{}", name="broken"), call({"stage": "won"})), body=body)
    assert (v.status, v.reason, v.bad_schema) == ("invalid", "schema_unusable", True)


def test_a_bad_response_format_schema_is_a_400() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"required": "account_id"}}}
    with pytest.raises(BadRequest) as err:
        expectation_from_request(request(response_format=fmt), SchemaCache())
    assert (err.value.code, err.value.param) == ("invalid_schema", "response_format.json_schema.schema")
    assert err.value.message.startswith("response_format: the json_schema schema is not a valid JSON Schema")


def test_a_prepared_request_is_checked_without_compiling_again() -> None:
    cache = SchemaCache()
    schema_only = {"type": "json_schema", "json_schema": {"name": "s", "schema": SUMMARY}}
    exp = expectation_from_request(request(response_format=schema_only, tools=[tool("ping", {})]), cache)
    assert cache.size == 2
    other = SchemaCache()  # a cache that has compiled nothing: the request's own validators are used
    assert check([choice(call("{}", name="ping"))], exp, other).status == "valid"
    text = choice(content='{"account_id": "ACC-004211", "risk": "severe"}', finish="stop")
    assert check([text], exp, other).reason == "schema_violation"
    assert other.size == 0


def test_a_schema_over_the_size_limit_is_refused_without_compiling() -> None:
    cache = SchemaCache(max_schema_bytes=len(orjson.dumps(UPDATE_CRM)) - 1)
    with pytest.raises(BadRequest) as err:
        expectation_from_request(request(), cache)
    size = len(orjson.dumps(UPDATE_CRM))
    assert (err.value.code, err.value.param) == ("schema_too_large", "tools[0].function.parameters")
    assert err.value.message == (
        f"Tool 'update_crm': its parameters schema is {size:,} bytes of JSON; "
        f"the limit is {size - 1:,} bytes per schema."
    )
    assert (cache.size, cache.rejected) == (0, 0)
    assert verdict(choice(call(GOOD_ARGS)), cache=cache).reason == "schema_unusable"
    assert SchemaCache(max_schema_bytes=size).validator(UPDATE_CRM) is not None  # the limit itself is allowed


def _sized(i: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}_{k}": {"type": "integer"} for k in range(50)}}


def test_cache_is_bounded_by_estimated_bytes() -> None:
    probe = SchemaCache()
    probe.validator(_sized(0))
    one = probe.bytes  # the estimate for one such schema (they all serialize to the same length)
    assert one > 20 * len(orjson.dumps(_sized(0)))
    cache = SchemaCache(max_bytes=2 * one)
    first, second = cache.validator(_sized(0)), cache.validator(_sized(1))
    assert (cache.size, cache.bytes) == (2, 2 * one)
    assert cache.validator(_sized(0)) is first  # 0 is now the most recent: 1 goes next
    cache.validator(_sized(2))
    assert (cache.size, cache.bytes) == (2, 2 * one)
    assert cache.validator(_sized(0)) is first
    assert cache.validator(_sized(1)) is not second  # evicted, compiled again


def test_a_schema_larger_than_the_whole_cache_is_used_but_not_kept() -> None:
    cache = SchemaCache(max_bytes=1000)
    exp = expectation_from_request(request(), cache)
    assert (cache.size, cache.bytes) == (0, 0)
    assert check([choice(call(GOOD_ARGS))], exp, cache).status == "valid"
    assert check([choice(call({**GOOD_ARGS, "amount": -1}))], exp, cache).reason == "schema_violation"


# --- model output the validator cannot take ----------------------------------------------------------------


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a": ' * depth + leaf + "}" * depth


RECURSIVE = {"type": "object", "additionalProperties": {"$ref": "#"}}


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        # The reported crash: a violation at the top of arguments nested ~300 deep (jsonschema-rs raised while
        # handing the error's instance back to Python).
        ('{"account_id": "ACC-004211", "stage": "won", "amount": ' + nested(300) + "}", "arguments_too_deep"),
        ('{"account_id": ' + "[" * 2000 + "]" * 2000 + "}", "arguments_too_deep"),  # past orjson's 1,024 too
        (nested(MAX_ARGUMENT_DEPTH), "schema_violation"),  # at the limit: checked as usual
        (nested(MAX_ARGUMENT_DEPTH + 1), "arguments_too_deep"),
    ],
)
def test_deeply_nested_arguments_are_invalid_never_an_error(
    arguments: str, expected: str, prepared: bool
) -> None:
    cache = SchemaCache()
    body = request()
    v = check([choice(call(arguments))], expectation_from_request(body, cache if prepared else None), cache)
    assert (v.status, v.reason, v.calls) == ("invalid", expected, 1)


def test_depth_is_limited_whatever_the_schema_allows() -> None:
    body = request(tools=[tool("tree", RECURSIVE), tool("ping", None)])
    assert verdict(choice(call(nested(MAX_ARGUMENT_DEPTH, "{}"), name="tree")), body=body).status == "invalid"
    assert (
        verdict(choice(call(nested(MAX_ARGUMENT_DEPTH - 1, "{}"), name="tree")), body=body).status == "valid"
    )
    v = verdict(choice(call(nested(400), name="ping")), body=body)  # no schema: JSON only, depth still counts
    assert (v.status, v.reason) == ("invalid", "arguments_too_deep")
    schema_only = {"type": "json_schema", "json_schema": {"name": "tree", "schema": RECURSIVE}}
    deep = choice(content=nested(300, "{}"), finish="stop")
    assert verdict(deep, body=request(tools=None, response_format=schema_only)).reason == "arguments_too_deep"


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    v = verdict(choice(call({**GOOD_ARGS, "notes": "{[" * 200})))
    assert v.status == "valid"


class _RaisingValidator:
    """A validator that fails the way a binding can: on the instance, or while building its error."""

    def __init__(self, valid: bool | None) -> None:
        self.valid = valid

    def is_valid(self, _instance: Any) -> bool:
        if self.valid is None:
            raise ValueError("cannot convert the instance")
        return self.valid

    def iter_errors(self, _instance: Any) -> Any:
        raise ValueError("Recursion limit reached")


@pytest.mark.parametrize(("valid", "reason"), [(None, "unvalidatable"), (False, "schema_violation")])
def test_a_validator_that_raises_gives_an_invalid_verdict(valid: bool | None, reason: str) -> None:
    exp = Expectation(
        tools={"update_crm": UPDATE_CRM},
        required=False,
        forced_name=None,
        content_schema=None,
        tool_choice="auto",
        validators={"update_crm": _RaisingValidator(valid)},
    )
    v = check([choice(call(GOOD_ARGS))], exp, SchemaCache())
    assert (v.status, v.reason, v.path, v.detail) == ("invalid", reason, None, None)


# --- privacy ------------------------------------------------------------------------------------------------


def _verdict_text(v: Verdict) -> str:
    return repr(v) + "".join(str(getattr(v, f)) for f in ("status", "reason", "path", "detail", "header"))


def test_verdict_never_quotes_the_instance() -> None:
    secret = "SECRET-jane.doe@acme.example"
    cases = [
        {**GOOD_ARGS, "amount": secret},
        {**GOOD_ARGS, "stage": secret},
        {**GOOD_ARGS, "close_date": secret},
        {**GOOD_ARGS, secret: 1},  # a key the model invented (additionalProperties: false)
        {**GOOD_ARGS, "line_items": [{"sku": secret, "qty": secret}]},
    ]
    for args in cases:
        v = verdict(choice(call(args)))
        assert v.reason == "schema_violation"
        assert "SECRET" not in _verdict_text(v)


def test_model_chosen_keys_are_redacted_from_the_path() -> None:
    schema = {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "patternProperties": {"^x-": False},
    }
    body = request(tools=[tool("tags", schema)])
    assert verdict(choice(call({"SECRET-key": "v"}, name="tags")), body=body).path == "/*"
    assert verdict(choice(call({"x-SECRET": 1}, name="tags")), body=body).path == "/*"


@given(
    field=st.sampled_from(["account_id", "stage", "amount", "close_date", "notes", "extra", "line_items"]),
    value=st.one_of(
        st.text(min_size=1).map(lambda s: "SECRET" + s),
        st.lists(st.text().map(lambda s: "SECRET" + s), min_size=1),
        st.dictionaries(
            st.text().map(lambda s: "SECRET" + s), st.text().map(lambda s: "SECRET" + s), min_size=1
        ),
    ),
)
def test_no_instance_text_in_any_verdict(field: str, value: Any) -> None:
    args = {**GOOD_ARGS, field: value}
    v = check([choice(call(args))], expectation_from_request(request()), _CACHE)
    assert "SECRET" not in _verdict_text(v)


_CACHE = SchemaCache()


# --- non-stream bodies --------------------------------------------------------------------------------------


def test_completions_from_response_reads_a_vllm_body() -> None:
    body = {
        "id": "chatcmpl-9f1c",
        "object": "chat.completion",
        "model": "crm-lora@3",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "chatcmpl-tool-a1",
                            "type": "function",
                            "function": {"name": "update_crm", "arguments": orjson.dumps(GOOD_ARGS).decode()},
                        },
                        {"id": "x", "type": "function", "function": "garbage"},
                    ],
                },
                "finish_reason": "tool_calls",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "No update needed."},
                "finish_reason": "stop",
            },
            "garbage",
        ],
        "usage": {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450},
    }
    completions = completions_from_response(body)
    assert completions == [
        Completion(
            0,
            None,
            (ToolCall("chatcmpl-tool-a1", "update_crm", orjson.dumps(GOOD_ARGS).decode()),),
            "tool_calls",
        ),
        Completion(1, "No update needed.", (), "stop"),
    ]
    assert check(completions, expectation_from_request(request()), SchemaCache()).status == "valid"
    assert completions_from_response({"error": {"message": "x"}}) == []


def test_expectation_is_plain_data() -> None:
    exp = Expectation(tools={}, required=False, forced_name=None, content_schema=None, tool_choice="none")
    assert not exp.active
    with pytest.raises(AttributeError):
        exp.required = True  # type: ignore[misc]
