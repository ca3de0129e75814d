"""Retrieval for answers grounded in documents: a collection split into passages, a BM25 index over them (bm25s,
NumPy only: `pip install -e ".[rag]"`), saved beside a run and reloaded without indexing again, and the one prompt
layout that RAFT trains and every RAG tool asks in.

A collection is a folder of .txt/.md files (a document's id is its path inside the folder, without the suffix) or
a JSON/JSONL file of records {"id", "text"}. Each document is cut into passages of at most --passage-tokens GPT-2
tokens, at sentence ends where it can be (a longer sentence is cut by tokens). A passage's id is its document's
id when the document is one passage, else "<doc id>#<n>" (n from 0); a question's gold id may name either.

The layout (user message of the model's chat template, so alpaca and plain wrap it as they wrap any question):

    <DOCUMENT>first passage</DOCUMENT>
    <DOCUMENT>second passage</DOCUMENT>
    question

A set of passages too long for the context is cut by whole passages, the lowest-ranked first, with a warning.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .data.chat import render
from .data.sources import read_records
from .utils import NanotuneError, atomic_write

DEFAULT_PASSAGE_TOKENS = 40  # nano's 256-token context: a question, four such passages and an answer
INDEX_FILE = "index.json"  # what makes a folder a saved index (beside passages.jsonl and bm25/)
DOC_OPEN, DOC_CLOSE = "<DOCUMENT>", "</DOCUMENT>"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def bm25s_module():
    try:
        import bm25s
    except ImportError:
        raise NanotuneError('retrieval needs the bm25s package: pip install -e ".[rag]"') from None
    return bm25s


def read_collection(path) -> list[tuple[str, str]]:
    """A folder of .txt/.md files or a JSON/JSONL file of {id, text} records -> [(document id, text)]."""
    path = Path(path)
    docs = []
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()):
            docs.append((f.relative_to(path).with_suffix("").as_posix(), f.read_text(encoding="utf-8")))
    elif path.is_file():
        for i, r in enumerate(read_records(path)):
            if not isinstance(r.get("id"), (str, int)) or not isinstance(r.get("text"), str):
                raise NanotuneError(f"{path}: record {i} needs 'id' (text or a number) and 'text' (text)")
            docs.append((str(r["id"]), r["text"]))
    else:
        raise NanotuneError(f"--docs {path}: no such folder or file")
    seen = set()
    for doc_id, _ in docs:
        if doc_id in seen:
            raise NanotuneError(f"--docs {path}: the document id {doc_id!r} is used twice")
        seen.add(doc_id)
    docs = [(doc_id, text.strip()) for doc_id, text in docs if text.strip()]
    if not docs:
        raise NanotuneError(f"--docs {path}: the collection is empty (no .txt/.md text, or no {{id, text}} records)")
    return docs


def split_passages(enc, docs: list[tuple[str, str]], max_tokens: int) -> list[dict]:
    """[(document id, text)] -> passages [{id, doc, text}], each at most max_tokens tokens: whole sentences packed
    greedily, a sentence longer than max_tokens cut into max_tokens-token pieces."""
    if max_tokens < 1:
        raise NanotuneError(f"--passage-tokens must be >= 1, got {max_tokens}")
    passages = []
    for doc_id, text in docs:
        pieces = []
        for sentence in SENTENCE_END.split(text):
            ids = enc.encode_ordinary(sentence)
            pieces += [enc.decode(ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens)]
        chunks, current = [], ""
        for piece in pieces:
            joined = f"{current} {piece}" if current else piece
            if current and len(enc.encode_ordinary(joined)) > max_tokens:
                chunks.append(current)
                joined = piece
            current = joined
        chunks.append(current)
        for n, chunk in enumerate(chunks):
            passage_id = doc_id if len(chunks) == 1 else f"{doc_id}#{n}"
            passages.append({"id": passage_id, "doc": doc_id, "text": chunk.strip()})
    return passages


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    """bm25s's own word splitting: lower case, words of two or more characters, English stopwords out."""
    return bm25s_module().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Index:
    """BM25 over passages. top_k(query, k) -> [(passage number, id, text, score)], best first."""

    def __init__(self, passages: list[dict], bm25, passage_tokens: int, source: str):
        self.passages, self.bm25, self.passage_tokens, self.source = passages, bm25, passage_tokens, source
        self.position = {p["id"]: i for i, p in enumerate(passages)}
        self.by_doc = {}
        for i, p in enumerate(passages):
            self.by_doc.setdefault(p["doc"], []).append(i)

    @classmethod
    def build(cls, enc, source, passage_tokens: int = DEFAULT_PASSAGE_TOKENS) -> Index:
        passages = split_passages(enc, read_collection(source), passage_tokens)
        bm25 = bm25s_module().BM25()
        bm25.index(bm25_tokens([p["text"] for p in passages]), show_progress=False)
        return cls(passages, bm25, passage_tokens, str(source))

    def save(self, folder):
        """folder/index.json (what was indexed, how), passages.jsonl and bm25/ (bm25s's arrays and vocabulary)."""
        folder = Path(folder)
        (folder / "bm25").mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(folder / "bm25"), show_progress=False)
        atomic_write(folder / "passages.jsonl", "".join(json.dumps(p) + "\n" for p in self.passages))
        meta = {"source": self.source, "passage_tokens": self.passage_tokens, "passages": len(self.passages)}
        atomic_write(folder / INDEX_FILE, json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder) -> Index:
        folder = Path(folder)
        try:
            meta = json.loads((folder / INDEX_FILE).read_text())
            passages = [json.loads(line) for line in (folder / "passages.jsonl").read_text().splitlines()]
            bm25 = bm25s_module().BM25.load(str(folder / "bm25"), show_progress=False)
        except (OSError, ValueError, KeyError) as e:
            raise NanotuneError(f"--docs {folder}: a saved index that cannot be read: {e}") from None
        return cls(passages, bm25, meta["passage_tokens"], meta["source"])

    def top_k(self, query: str, k: int) -> list[tuple[int, str, str, float]]:
        if k < 1:
            raise NanotuneError(f"the number of passages to retrieve must be >= 1, got {k}")
        numbers, scores = self.bm25.retrieve(
            [bm25_tokens([query])[0]], k=min(k, len(self.passages)), show_progress=False, n_threads=1
        )
        return [
            (int(i), self.passages[i]["id"], self.passages[i]["text"], float(s)) for i, s in zip(numbers[0], scores[0])
        ]

    def resolve(self, gold_ids: list[str], where: str) -> list[int]:
        """Gold ids (a passage's or a document's: all its passages) -> passage numbers; an unknown id is an error."""
        found = []
        for gold in gold_ids:
            gold = str(gold)
            numbers = [self.position[gold]] if gold in self.position else self.by_doc.get(gold)
            if not numbers:
                raise NanotuneError(f"{where}: its gold passage {gold!r} is not in the collection {self.source}")
            found += [n for n in numbers if n not in found]
        return found


def open_index(spec, enc, passage_tokens: int = DEFAULT_PASSAGE_TOKENS) -> Index:
    """--docs: a saved index folder (index.json inside: reloaded as it was saved) or a collection (indexed now)."""
    if (Path(spec) / INDEX_FILE).is_file():
        return Index.load(spec)
    return Index.build(enc, spec, passage_tokens)


def recall_at_k(index: Index, questions: list[str], golds: list[list[int]], k: int) -> float:
    """Recall@k: over the questions, the mean share of each one's gold passages among its top k."""
    shares = []
    for question, gold in zip(questions, golds):
        found = {number for number, *_ in index.top_k(question, k)}
        shares.append(sum(g in found for g in gold) / len(gold))
    return sum(shares) / len(shares)


def rag_content(question: str, passages: list[str]) -> str:
    """The user message: each passage in a <DOCUMENT> block, then the question."""
    return "".join(f"{DOC_OPEN}{p}{DOC_CLOSE}\n" for p in passages) + question


def answer_reserve(max_new_tokens: int, context: int) -> int:
    """Room a prompt with passages leaves for the answer: --max-new-tokens, but at most a quarter of the context
    (generate and evaluate: passages give way to the answer only that far)."""
    return max(1, min(max_new_tokens, context // 4))


def fit_passages(
    enc, before: list[dict], question: str, passages: list[str], template: str, context: int, reserve: int, after=()
):
    """The conversation `before` (earlier messages, often none), then the question with its passages (best first)
    as the user message, then `after` (messages that follow it, rarely any), in `template`, leaving `reserve`
    tokens of `context` for the answer: passages that do not fit are left out whole, the last first.
    -> (messages, prompt ids, how many passages were kept)"""
    kept = len(passages)
    while True:
        messages = [*before, {"role": "user", "content": rag_content(question, passages[:kept])}, *after]
        ids = render(enc, messages, template, add_generation_prompt=True)[0]
        if len(ids) + reserve <= context:
            return messages, ids, kept
        if kept == 0:
            raise NanotuneError(
                f"the question alone takes {len(ids)} tokens: no room for {reserve} answer token(s) in the "
                f"context of {context}"
            )
        kept -= 1


def warn_cut(given: int, kept: int, context: int, reserve: int):
    if kept < given:
        print(
            f"warning: {given} passages do not fit the context of {context} with the question and {reserve} "
            f"answer token(s); kept the first {kept}",
            file=sys.stderr,
            flush=True,
        )


def rag_prompt_ids(
    enc, question: str, passages: list[str], template: str, context: int, reserve: int = 1, warn: bool = True
) -> tuple[list[int], int]:
    """The prompt's token ids for a question and its passages (best first) in `template`, leaving `reserve` tokens
    of `context` for the answer; passages that do not fit are left out whole, the last first (with a warning on
    stderr). -> (ids, how many passages were kept). The layout RAFT trains on: a server answers --docs with it."""
    _, ids, kept = fit_passages(enc, [], question, passages, template, context, reserve)
    if warn:
        warn_cut(len(passages), kept, context, reserve)
    return ids, kept


def with_passages(enc, messages: list[dict], index: Index, k: int, template: str, context: int, reserve: int):
    """A conversation (with a user message) whose last user message gets its top k passages put before it, the
    messages around it kept (evaluate's prompts, the server's chats). -> (messages, prompt ids, the hits kept:
    top_k's (number, id, text, score), best first)"""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    user, after = messages[last], messages[last + 1 :]
    question = user["content"] + (f"\n{user['input']}" if user.get("input") else "")
    hits = index.top_k(question, k)
    passages = [h[2] for h in hits]
    new, ids, kept = fit_passages(enc, messages[:last], question, passages, template, context, reserve, after)
    warn_cut(len(hits), kept, context, reserve)
    return new, ids, hits[:kept]
