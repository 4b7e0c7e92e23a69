"""Retrieval for baseline variants: a knowledge base (KB) of documents, cut into passages, searched with SQLite FTS5.

Owns the whole retrieval side of "base model + retrieval-augmented prompt": reading a KB directory of UTF-8 `.md` /
`.txt` documents into `Passage`s (`split_passages`), the in-memory FTS5 `Index` ranked by bm25, turning free user
text into a *safe* FTS5 query (`match_expression`: user text is never FTS5 syntax), and the prompt side:
`last_user_text` (what to search for), `render_context` (what replaces `{context}`) and `fill` (the replacement).
Building an index is I/O, done once when a policy loads (no network; ~5 ms for the shipped KB); searching is pure
CPU, ~0.1 ms for a question and ~0.25 ms for a paragraph-long request on the shipped KB (`python -m
gateway.retrieval` measures it). `Index.content_hash` covers every file name and byte, so the policy version can
include it and a KB edit is a policy change.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

PLACEHOLDER = "{context}"
PASSAGE_CHARS = 600  # merge short paragraphs up to this size: a few facts per passage, ~150 tokens of prompt
MAX_TERMS = 32  # each OR-ed term costs ~15 µs with bm25 (measured); past 32 every passage matches anyway
MAX_SCAN_CHARS = 4_000  # ~700 words; bounds the tokenizing work per request (~0.4 ms at this size, measured)
KEY_CHARS = 4  # see `match_expression`: how much of a word must match the KB's words to be worth a lookup
MAX_TERM_CHARS = 64  # no real word is longer; a longer token can only be junk
SUFFIXES = frozenset({".md", ".txt"})

# Column weights for bm25, in the table's column order (doc, heading, body). A document's name is its topic, so a
# query word found there is the strongest sign. The heading trail is already in the body of a section's first
# passage; the column mainly carries it to continuation passages, at half weight. On 22 hand-labelled questions
# against the shipped KB, (10, 0.5, 1) put the right document first for 18, (1, 1, 1) for 17, (3, 2, 1) for 16.
_WEIGHTS = (10.0, 0.5, 1.0)
_CREATE = "CREATE VIRTUAL TABLE kb USING fts5(doc, heading, body, tokenize = 'porter unicode61 remove_diacritics 2')"
# Not `ORDER BY rank`: FTS5 prepares a nested statement for it on every query, measured ~40 µs slower than letting
# SQLite sort on bm25() here. rowid breaks ties, so equal scores always come back in KB order.
_SEARCH = (
    f"SELECT rowid FROM kb WHERE kb MATCH ? ORDER BY bm25(kb, {', '.join(map(str, _WEIGHTS))}), rowid LIMIT ?"
)
_WORD = re.compile(r"[^\W_]+")  # letters and digits: what unicode61 keeps as token characters
_HEADING = re.compile(r"(#{1,6})[ \t]+(.*?)[ \t#]*$")
_FENCES = ("```", "~~~")

# Words too common to say anything about which passage is relevant; kept small on purpose (bm25's idf already
# discounts common words, this only keeps them from crowding out real terms under the MAX_TERMS cap).
STOPWORDS = frozenset(
    """
    a about after all also am an and any are as at be been before being but by can could did do does doing for
    from had has have having he her here hers him his how i if in into is it its just me my no nor not now of
    off on once only or our ours out over own please so some such than that the their theirs them then there
    these they this those to too under until up us very was we were what when where which while who whom why
    will with would you your yours
    """.split()  # noqa: SIM905 (a word list reads best as words; ruff would explode it to 110 lines)
)


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable piece of a document: `doc` is the file's path relative to the KB directory."""

    doc: str
    index: int  # position within its document, from 0
    text: str


class Index:
    """A KB's passages in an in-memory FTS5 table. Build with `Index.from_directory` (or `from_documents`).

    Thread-safety: the gateway calls `search` from the event-loop thread only. The connection is opened with
    `check_same_thread=False` because the index is built where the policy loads (possibly a worker thread, e.g. an
    admin reload) and then used on the loop; after the build it is only read, and never from two threads at once.
    Call `close()` when a policy is retired, or let garbage collection close the connection.
    """

    def __init__(
        self, passages: Sequence[Passage], *, content_hash: str, build_seconds: float, directory: str | None
    ) -> None:
        self.passages: tuple[Passage, ...] = tuple(passages)
        self.documents: tuple[str, ...] = tuple(dict.fromkeys(p.doc for p in self.passages))
        self.content_hash = content_hash  # sha256 hex of every file name and its bytes
        self.build_seconds = build_seconds  # read + split + index, measured by `from_directory`
        self.directory = directory
        self.keys = _keys(self.passages)  # see `match_expression`
        self._db = _fill_table(self.passages)

    @classmethod
    def from_directory(
        cls, directory: str | Path, *, clock: Callable[[], float] = time.perf_counter
    ) -> Index:
        """Read every `.md`/`.txt` file under `directory` (recursively, sorted, hidden files skipped) and index it.

        Raises `ConfigError` when the directory is missing, holds no documents, a file is not UTF-8, or this
        Python's SQLite has no FTS5: a policy with a broken KB must not go live.
        """
        start = clock()
        documents, digest = read_documents(Path(directory))
        passages = list(_passages_of(documents))
        index = cls(passages, content_hash=digest, build_seconds=0.0, directory=str(directory))
        index.build_seconds = clock() - start
        return index

    @classmethod
    def from_documents(cls, documents: Mapping[str, str]) -> Index:
        """An index over in-memory documents (name → text), hashed as if each were a UTF-8 file of that name."""
        encoded = {name: text.encode() for name, text in documents.items()}
        passages = list(_passages_of(documents))
        return cls(passages, content_hash=content_hash(encoded), build_seconds=0.0, directory=None)

    def search(self, query: str, top_k: int) -> list[Passage]:
        """The `top_k` passages best matching free text `query` by bm25, best first; [] when nothing matches.

        Any text is safe here: it is reduced to quoted word tokens OR-ed together (`match_expression`), so FTS5
        operators, quotes, NEAR, `*`, parentheses or column filters in it are plain words or dropped, never syntax.
        Cost: one FTS5 phrase lookup plus bm25 per term, ~15 µs a term; `python -m gateway.retrieval` measures it.
        """
        expression = match_expression(query, self.keys) if top_k > 0 else ""
        if not expression:
            return []
        rows = self._db.execute(_SEARCH, (expression, top_k)).fetchall()
        return [self.passages[rowid] for (rowid,) in rows]

    def close(self) -> None:
        self._db.close()


def read_documents(directory: Path) -> tuple[dict[str, str], str]:
    """The KB's documents (relative posix name → text, sorted by name) and their content hash."""
    if not directory.is_dir():
        raise ConfigError(f"knowledge base {str(directory)!r} is not a directory")
    try:
        raw = {_name(path, directory): path.read_bytes() for path in _files(directory)}
    except OSError as exc:
        raise ConfigError(f"knowledge base {str(directory)!r} cannot be read: {exc}") from None
    if not raw:
        raise ConfigError(f"knowledge base {str(directory)!r} holds no .md or .txt documents")
    return {name: _decode(directory, name, data) for name, data in raw.items()}, content_hash(raw)


def content_hash(files: Mapping[str, bytes]) -> str:
    """sha256 over (name, length, bytes) of each file in name order; the lengths keep the framing unambiguous."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(8, "big") + encoded + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut a document into passages: blank-line-separated paragraphs, short ones merged up to `max_chars`.

    A heading stays with the paragraph under it, and a heading always starts a new passage (a passage never spans
    two sections, so it reads as one topic). A single paragraph longer than `max_chars` stays whole rather than be
    cut mid-sentence; fenced code blocks are never cut at their inner blank lines.
    """
    passages: list[str] = []
    for unit, new_section in _units(_paragraphs(text)):
        if passages and not new_section and len(passages[-1]) + 2 + len(unit) <= max_chars:
            passages[-1] = f"{passages[-1]}\n\n{unit}"
        else:
            passages.append(unit)
    return passages


def match_expression(text: str, vocabulary: Container[str] | None = None) -> str:
    """Free text → an FTS5 MATCH expression that cannot be anything but an OR of quoted words ("" when none).

    Tokens are runs of letters/digits (so no quote, operator or bracket can survive), lower-cased, de-duplicated,
    stopwords and single letters dropped; numbers stay ("30/09/2024" or "18,500" find the rules for their format).
    A text longer than MAX_SCAN_CHARS is read at its head and its tail (a pasted e-mail with the request at the end
    keeps both). With `vocabulary` (an index's `keys`), a term is kept only when its first KEY_CHARS letters begin
    some word of the KB: a term the KB lacks matches nothing but still costs its lookup and takes a place under the
    cap. Prefixes, not whole words, because FTS5 matches Porter stems, which are not computed here ("dates" and
    "date" share "date"); a false positive only costs a lookup. Past MAX_TERMS, the longest terms are kept: a cheap
    stand-in for rarity.
    """
    terms = [
        t for t in dict.fromkeys(_WORD.findall(_window(text).lower())) if t not in STOPWORDS and _useful(t)
    ]
    if vocabulary is not None:
        terms = [t for t in terms if t[:KEY_CHARS] in vocabulary]
    if len(terms) > MAX_TERMS:
        keep = set(sorted(terms, key=len, reverse=True)[:MAX_TERMS])  # stable sort: ties keep text order
        terms = [t for t in terms if t in keep]
    return " OR ".join(f'"{t}"' for t in terms)


@dataclass(frozen=True, slots=True, eq=False)
class Retrieval:
    """What a variant's `retrieval = { documents = ..., top_k = ... }` becomes: search the user's last message."""

    index: Index
    top_k: int = 3

    def context_for(self, messages: list[dict[str, Any]]) -> str:
        return render_context(self.index.search(last_user_text(messages), self.top_k))


def render_context(passages: Sequence[Passage]) -> str:
    """What replaces `{context}`: each passage under its document's name, separated by blank lines ("" if none)."""
    return "\n\n".join(f"[{p.doc}]\n{p.text}" for p in passages)


def fill(system_prompt: str, context: str) -> str:
    """Replace every `{context}` in the prompt, and nothing else.

    Not `str.format`: prompts carry JSON examples whose braces are not fields. One pass of `str.replace`, so
    braces (even `{context}`) inside the retrieved text itself are left alone.
    """
    return system_prompt.replace(PLACEHOLDER, context)


def last_user_text(messages: Sequence[Any]) -> str:
    """The text of the last user message: a string, or the text parts of OpenAI's list of content parts."""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def require_fts5(db: sqlite3.Connection) -> None:
    """Create the KB table, translating a SQLite built without FTS5 into a clear `ConfigError`."""
    try:
        db.execute(_CREATE)
    except sqlite3.OperationalError as exc:
        raise ConfigError(
            f"retrieval needs SQLite's FTS5 extension, which this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) "
            f"lacks ({exc}); use a Python whose SQLite is built with FTS5 (the official python images are)"
        ) from None


def _fill_table(passages: Sequence[Passage]) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    require_fts5(db)
    rows = ((i, _title(p.doc), heading, p.text) for i, (p, heading) in enumerate(_with_headings(passages)))
    with db:
        db.executemany("INSERT INTO kb(rowid, doc, heading, body) VALUES (?, ?, ?, ?)", rows)
    return db


def _passages_of(documents: Mapping[str, str]) -> Iterator[Passage]:
    for name in sorted(documents):
        for i, text in enumerate(split_passages(documents[name])):
            yield Passage(name, i, text)


def _with_headings(passages: Sequence[Passage]) -> Iterator[tuple[Passage, str]]:
    """Each passage with its heading trail ("Deal stages > Negotiation"), continuation passages included."""
    trail: dict[int, str] = {}
    doc = None
    for passage in passages:
        if passage.doc != doc:
            doc, trail = passage.doc, {}
        for level, title in _leading_headings(passage.text):
            trail = {lvl: t for lvl, t in trail.items() if lvl < level}
            trail[level] = title
        yield passage, " > ".join(trail[lvl] for lvl in sorted(trail))


def _leading_headings(text: str) -> Iterator[tuple[int, str]]:
    """The headings a passage starts with (a section's headings always lead its first passage)."""
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match is None:
            if line.strip():
                return
            continue
        yield len(match.group(1)), match.group(2)


def _paragraphs(text: str) -> Iterator[str]:
    """Blank-line-separated blocks, right-trimmed; blank lines inside a fenced code block do not separate."""
    block: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(_FENCES):
            fenced = not fenced
        if line.strip() or fenced:
            block.append(line.rstrip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _units(blocks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Paragraphs with heading-only blocks glued to the paragraph after them; flag: does it start a section."""
    headings: list[str] = []
    for block in blocks:
        if "\n" not in block and _HEADING.match(block):
            headings.append(block)
        elif headings:
            yield "\n\n".join([*headings, block]), True
            headings = []
        else:
            yield block, _HEADING.match(block.partition("\n")[0]) is not None
    if headings:
        yield "\n\n".join(headings), True


def _window(text: str) -> str:
    if len(text) <= MAX_SCAN_CHARS:
        return text
    half = MAX_SCAN_CHARS // 2
    return f"{text[:half]} {text[-half:]}"


def _keys(passages: Sequence[Passage]) -> frozenset[str]:
    """The KEY_CHARS-letter prefixes of every word the index holds (text and document names)."""
    words = _WORD.findall(" ".join([*(p.text for p in passages), *(_title(p.doc) for p in passages)]).lower())
    return frozenset(w[:KEY_CHARS] for w in words)


def _useful(term: str) -> bool:
    return (len(term) > 1 or term.isdigit()) and len(term) <= MAX_TERM_CHARS


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = (part.get("text") for part in content if isinstance(part, Mapping) and part.get("type") == "text")
    return "\n".join(t for t in texts if isinstance(t, str))


def _files(directory: Path) -> list[Path]:
    """Sorted, so passages and the hash never depend on the file system's listing order; hidden paths skipped."""
    paths = (p for p in directory.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    return sorted(
        p for p in paths if not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _name(path: Path, directory: Path) -> str:
    return path.relative_to(directory).as_posix()


def _title(name: str) -> str:
    """A document's name as words for the `doc` column: "deal-stages.md" → "deal stages"."""
    return re.sub(r"[-_./]+", " ", name.rsplit(".", 1)[0])


def _decode(directory: Path, name: str, data: bytes) -> str:
    try:
        # Tolerate a BOM (some editors add one); anything else that is not UTF-8 is an authoring error.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"knowledge base file {str(directory / name)!r} is not UTF-8: {exc}") from None


def _benchmark(directory: str, queries: Sequence[str], top_k: int = 3, rounds: int = 500) -> None:
    """`python -m gateway.retrieval DIR [QUERY ...]`: build time, then each query's µs per search and its hits."""
    index = Index.from_directory(directory)
    print(
        f"{len(index.documents)} documents, {len(index.passages)} passages, sha256 {index.content_hash[:16]}…"
    )
    print(f"build: {index.build_seconds * 1e3:.1f} ms")
    print("   wall     CPU  (µs per search, best of 5 × rounds)")
    for query in queries:
        wall, cpu = min(_time_searches(index, query, top_k, rounds) for _ in range(5))
        hits = [f"{p.doc}#{p.index}" for p in index.search(query, top_k)]
        print(f"{wall * 1e6:7.1f} {cpu * 1e6:7.1f}  {query[:60]!r} → {hits}")


def _time_searches(index: Index, query: str, top_k: int, rounds: int) -> tuple[float, float]:
    """Wall and CPU seconds per search; CPU time is the figure that holds on a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        index.search(query, top_k)
    return (time.perf_counter() - wall) / rounds, (time.process_time() - cpu) / rounds


if __name__ == "__main__":
    import sys

    _benchmark(
        sys.argv[1] if len(sys.argv) > 1 else "policies/kb/crm",
        sys.argv[2:]
        or [
            "What does the negotiation stage mean?",
            "How do I write the amount €18.5k?",
            "Just got off the phone with Northwind (account ACC-20931): they signed the proposal, 18,500 EUR a "
            "year, closing end of Q3. Please move them to negotiation and note that legal review is pending.",
        ],
    )
