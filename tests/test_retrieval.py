"""Retrieval for baseline variants: passages, search on the shipped CRM knowledge base, hostile queries, the prompt.

The shipped KB (policies/kb/crm) is what the baseline variant retrieves from, so its relevance is tested on it
directly; everything else uses small in-memory or tmp_path KBs.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.retrieval import (
    MAX_TERMS,
    Index,
    Passage,
    fill,
    last_user_text,
    match_expression,
    render_context,
    require_fts5,
    split_passages,
)

KB = Path(__file__).resolve().parent.parent / "policies" / "kb" / "crm"
SAFE_EXPRESSION = re.compile(r'("[^\W_]+"( OR "[^\W_]+")*)?')


@pytest.fixture(scope="module")
def kb() -> Index:
    return Index.from_directory(KB)


def docs_found(index: Index, query: str, top_k: int = 3) -> list[str]:
    return [p.doc for p in index.search(query, top_k)]


# --- passages -------------------------------------------------------------------------------------------------


def test_a_heading_stays_with_its_paragraph_and_starts_a_new_passage() -> None:
    text = "# Stages\n\nThere are six.\n\n## won\n\nSigned by both sides.\n\n## lost\n\nThey said no."
    assert split_passages(text) == [
        "# Stages\n\nThere are six.",
        "## won\n\nSigned by both sides.",
        "## lost\n\nThey said no.",
    ]


def test_short_paragraphs_of_one_section_merge_up_to_the_limit() -> None:
    paragraphs = [f"Paragraph {i} " + "x" * 180 for i in range(5)]
    passages = split_passages("## Rules\n\n" + "\n\n".join(paragraphs), max_chars=600)
    assert passages[0].startswith("## Rules\n\nParagraph 0")
    assert all(len(p) <= 600 for p in passages)
    assert [p.count("Paragraph") for p in passages] == [3, 2]  # greedy: fill a passage, then start the next
    # nothing lost, nothing reordered
    assert "\n\n".join(passages) == "## Rules\n\n" + "\n\n".join(paragraphs)


def test_a_long_paragraph_stays_whole_and_a_trailing_heading_is_kept() -> None:
    long = "word " * 300
    assert split_passages(f"{long.strip()}\n\n## Appendix") == [long.strip(), "## Appendix"]


def test_consecutive_headings_join_the_first_paragraph_after_them() -> None:
    assert split_passages("# Title\n\n## Section\n\nBody.") == ["# Title\n\n## Section\n\nBody."]


def test_a_fenced_code_block_is_not_cut_at_its_blank_lines() -> None:
    text = '## Example\n\n```json\n{"a": 1}\n\n# not a heading\n{"b": 2}\n```\n\nAfter.'
    (passage,) = split_passages(text)
    assert '{"a": 1}\n\n# not a heading\n{"b": 2}\n```' in passage


def test_passages_carry_their_document_and_position() -> None:
    index = Index.from_documents({"b.md": "# B\n\nbee", "a.txt": "first\n\n# Second\n\nsecond"})
    assert index.passages == (
        Passage("a.txt", 0, "first"),
        Passage("a.txt", 1, "# Second\n\nsecond"),
        Passage("b.md", 0, "# B\n\nbee"),
    )
    assert index.documents == ("a.txt", "b.md")


def test_the_shipped_kb_has_several_documents_of_short_passages(kb: Index) -> None:
    assert 6 <= len(kb.documents) <= 10
    assert all(p.doc.endswith(".md") for p in kb.passages)
    assert max(len(p.text) for p in kb.passages) <= 700


# --- search relevance on the shipped KB -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "document"),
    [
        ("What does the negotiation stage mean?", "deal-stages.md"),
        ("What stage is a contract signed by both sides?", "deal-stages.md"),
        ("How do I write the amount 18,500 EUR?", "amounts-and-currency.md"),
        ("€18.5k", "amounts-and-currency.md"),
        ("The amount is in USD, not euros", "amounts-and-currency.md"),
        ("How to convert 30/09/2024?", "close-dates.md"),
        ("how do I normalise an account number like acc 12345", "account-ids.md"),
        ("can I put a phone number in the note", "notes.md"),
        ("which fields does update_crm take", "update-crm-tool.md"),
    ],
)
def test_a_question_finds_the_document_that_answers_it_first(kb: Index, question: str, document: str) -> None:
    assert docs_found(kb, question)[0] == document


def test_a_realistic_request_retrieves_stage_amount_and_example_passages(kb: Index) -> None:
    request = (
        "Just got off the phone with Northwind (account ACC-20931): they signed the proposal, 18,500 EUR a year, "
        "closing end of Q3. Please move them to negotiation and note that legal review is pending."
    )
    hits = kb.search(request, 5)
    assert len(hits) == 5
    assert {"examples-correct.md", "deal-stages.md"} <= {p.doc for p in hits}


def test_top_k_bounds_the_result_and_nothing_is_returned_for_no_match(kb: Index) -> None:
    assert len(kb.search("stage amount date account note", 2)) == 2
    assert len(kb.search("stage amount date account note", 1000)) <= len(kb.passages)
    assert kb.search("stage", 0) == []
    assert kb.search("stage", -1) == []
    assert kb.search("zyxwvut qqqq", 3) == []
    assert kb.search("", 3) == []
    assert kb.search("the and of to", 3) == []  # stopwords only


def test_search_is_deterministic_across_builds(kb: Index) -> None:
    again = Index.from_directory(KB)
    assert again.passages == kb.passages
    assert again.content_hash == kb.content_hash
    for question in ["stage", "amount in euros", "close date format", "account id note example", "won lost"]:
        assert kb.search(question, 5) == again.search(question, 5) == kb.search(question, 5)


# --- hostile input ----------------------------------------------------------------------------------------------

HOSTILE = [
    '"',
    '""',
    '"unterminated stage',
    "NEAR(stage amount, 2)",
    "stage NEAR amount",
    "stage AND amount OR NOT date",
    "AND OR NOT",
    "*",
    "stage*",
    "^stage",
    "(((stage",
    "amount)))",
    "body: stage",
    "{doc heading}: amount",
    "- stage",
    "stage + amount",
    "'; DROP TABLE kb; --",
    "\x00stage\x00",
    "stage\u200bamount",
    "🙂 stage 🙂",
    "_ __ stage_amount",
    "Ünïcödé ÀMOUNT",
    "amount " * 20_000,
    " ".join(f"w{i}" for i in range(50_000)) + " stage",
]


@pytest.mark.parametrize("query", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_text_never_raises_and_is_searched_as_plain_words(kb: Index, query: str) -> None:
    hits = kb.search(query, 3)
    assert len(hits) <= 3
    assert all(isinstance(p, Passage) for p in hits)
    assert SAFE_EXPRESSION.fullmatch(match_expression(query))


@pytest.mark.parametrize("query", ["NEAR(stage amount, 2)", "stage*", "(((stage", '"unterminated stage'])
def test_operators_in_the_text_do_not_hide_the_words_around_them(kb: Index, query: str) -> None:
    assert kb.search(query, 3)
    assert kb.search(query, 3) == kb.search(re.sub(r"[^\w ]", " ", query), 3)


def test_the_expression_quotes_each_word_drops_stopwords_and_is_capped() -> None:
    assert match_expression('What is "NEAR"(a* OR b)? Stage: won!') == '"near" OR "stage" OR "won"'
    many = " ".join(f"term{i:03d}" for i in range(100)) + " averyveryverylongword"
    terms = match_expression(many).split(" OR ")
    assert len(terms) == MAX_TERMS
    assert '"averyveryverylongword"' in terms  # past the cap the longest words are kept


def test_words_absent_from_the_kb_are_not_looked_up(kb: Index) -> None:
    assert match_expression("negotiation zyxwvut", kb.keys) == '"negotiation"'
    assert match_expression("stages", kb.keys) == '"stages"'  # prefix match: FTS5 stems "stages" to "stage"


_SMALL = Index.from_documents(
    {"a.md": "# Alpha\n\nstage amount date\n\nÜber naïve café 😀", "b.md": "beta stage"}
)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_any_text_becomes_a_safe_expression_and_a_search_that_does_not_raise(text: str) -> None:
    assert SAFE_EXPRESSION.fullmatch(match_expression(text))
    assert len(_SMALL.search(text, 3)) <= 3


# --- the prompt ---------------------------------------------------------------------------------------------------


def test_render_context_prefixes_each_passage_with_its_document() -> None:
    passages = [Passage("deal-stages.md", 4, "## won\n\nSigned."), Passage("notes.md", 0, "Short.")]
    assert render_context(passages) == "[deal-stages.md]\n## won\n\nSigned.\n\n[notes.md]\nShort."
    assert render_context([]) == ""


def test_fill_replaces_only_the_context_placeholder() -> None:
    prompt = 'Answer with JSON like {"stage": "won", "amount": 1}.\n\nReference:\n{context}\n\n{user} {0} {'
    filled = fill(prompt, "ctx with {braces} and {context}")
    assert filled == (
        'Answer with JSON like {"stage": "won", "amount": 1}.\n\nReference:\nctx with {braces} and {context}'
        "\n\n{user} {0} {"
    )
    assert fill("no placeholder {x}", "ctx") == "no placeholder {x}"
    assert fill("{context} and {context}", "c") == "c and c"


def test_last_user_text_reads_strings_and_text_parts() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "move ACC-12345"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "to won"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert last_user_text(messages) == "move ACC-12345\nto won"
    assert last_user_text(messages[:3]) == "first question"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": None}],
        [{"role": "user"}],
        ["junk"],
    ],
)
def test_last_user_text_is_empty_when_there_is_no_user_text(messages: list[Any]) -> None:
    assert last_user_text(messages) == ""


def test_the_prompt_pieces_compose(kb: Index) -> None:
    messages = [{"role": "user", "content": "What does the negotiation stage mean?"}]
    prompt = fill("Use these notes:\n{context}", render_context(kb.search(last_user_text(messages), 2)))
    assert prompt.startswith("Use these notes:\n[deal-stages.md]\n## negotiation")


# --- building: hash, time, errors ---------------------------------------------------------------------------------


def write_kb(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_the_content_hash_follows_every_name_and_byte(tmp_path: Path) -> None:
    files = {"stages.md": b"# Stages\n\nwon", "sub/amounts.txt": b"amount 1"}
    first = Index.from_directory(write_kb(tmp_path / "a", files)).content_hash
    assert Index.from_directory(write_kb(tmp_path / "b", files)).content_hash == first
    assert Index.from_documents({n: d.decode() for n, d in files.items()}).content_hash == first
    changed = Index.from_directory(write_kb(tmp_path / "c", {**files, "stages.md": b"# Stages\n\nlost"}))
    renamed = Index.from_directory(write_kb(tmp_path / "d", {"stage.md": files["stages.md"], **files}))
    assert len({first, changed.content_hash, renamed.content_hash}) == 3
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_only_visible_md_and_txt_files_are_read(tmp_path: Path) -> None:
    root = write_kb(
        tmp_path,
        {"a.md": b"alpha", "b.TXT": b"beta", "c.json": b"{}", ".hidden.md": b"x", ".git/x.md": b"y"},
    )
    index = Index.from_directory(root)
    assert index.documents == ("a.md", "b.TXT")
    assert index.content_hash == Index.from_documents({"a.md": "alpha", "b.TXT": "beta"}).content_hash


def test_the_build_time_is_recorded_with_the_given_clock(tmp_path: Path) -> None:
    ticks = iter([10.0, 10.25])
    index = Index.from_directory(write_kb(tmp_path, {"a.md": b"alpha"}), clock=lambda: next(ticks))
    assert index.build_seconds == 0.25
    assert index.directory == str(tmp_path)


def test_a_broken_kb_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        Index.from_directory(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"no \.md or \.txt"):
        Index.from_directory(write_kb(tmp_path / "empty", {"readme.rst": b"x"}))
    with pytest.raises(ConfigError, match="not UTF-8"):
        Index.from_directory(write_kb(tmp_path / "latin1", {"a.md": "café".encode("latin-1")}))


class NoFts5:
    def execute(self, sql: str) -> None:
        raise sqlite3.OperationalError("no such module: fts5")


def test_a_sqlite_without_fts5_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="FTS5") as caught:
        require_fts5(NoFts5())  # type: ignore[arg-type]
    assert "no such module: fts5" in caught.value.message
