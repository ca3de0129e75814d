"""python -m nanotune.serve --docs: chats answered from documents. The last user message is the question; its top
--passages passages (BM25, nanotune/retrieval.py) go before it in the layout RAFT trains on, inside the chat
template the server uses, whole passages giving way when the context is short. Each request's passages are
logged on stderr, and returned in the answer's top-level FIELD when the request sets FIELD: true (nanotune's
extension of OpenAI's API; the OpenAPI document describes it only on a server that runs with --docs).

/v1/completions is not touched: it continues its prompt as it is, token for token, which is what evaluation
harnesses score (lm-eval's log-likelihoods); text with passages wrapped around it would be another prompt."""

import sys

from ..data.chat import render
from ..retrieval import Index, answer_reserve, with_passages
from ..utils import NanotuneError
from .api_schema import ApiError

FIELD = "nanotune_passages"
ANSWER_FIELD = {
    "type": "array",
    "description": f"only when the request set {FIELD}: true: the passages put before the question, best first "
    "(with stream: true, in the first chunk)",
    "items": {
        "type": "object",
        "required": ["id", "text", "score"],
        "properties": {
            "id": {"type": "string", "description": "the passage's id: its document's, or '<document id>#<n>'"},
            "text": {"type": "string"},
            "score": {"type": "number", "description": "its BM25 score for the question"},
        },
    },
}
REQUEST_FIELD = {
    "type": ["boolean", "null"],
    "default": False,
    "description": f"nanotune's extension (a server run with --docs): the answer carries {FIELD}, the passages "
    "retrieved for the last user message and put before it, best first, [{id, text, score}] (with stream: true, "
    "in the first chunk)",
}


class Documents:
    """The index a server answers from, opened once, and how many passages each question gets."""

    def __init__(self, index: Index, passages: int, template: str, context: int, default_max_tokens: int):
        self.index, self.passages, self.template, self.context = index, passages, template, context
        self.default_reserve = answer_reserve(default_max_tokens, context)  # what generate keeps for the answer

    def chat_prompt(self, enc, messages: list[dict], max_tokens: int | None) -> tuple[list[int], list[dict]]:
        """Checked messages -> (the prompt's token ids, the passages in it: [{id, text, score}], best first).
        The answer keeps max_tokens, or when the request gives none what generate keeps (answer_reserve)."""
        if not any(m["role"] == "user" for m in messages):  # nothing asked, nothing to retrieve for: as it is
            return render(enc, messages, self.template, add_generation_prompt=True)[0], []
        reserve = max_tokens if max_tokens is not None else self.default_reserve
        try:
            _, ids, hits = with_passages(enc, messages, self.index, self.passages, self.template, self.context, reserve)
        except NanotuneError as e:  # the question alone leaves no room for the answer
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        return ids, [{"id": i, "text": text, "score": score} for _, i, text, score in hits]


def log_passages(answer_id: str, passages: list[dict]):
    """One line on the server's stderr per request: which passages it was given, with their BM25 scores."""
    used = ", ".join(f"{p['id']} (BM25 {p['score']:.2f})" for p in passages) or "none"
    print(f"nanotune: {answer_id} passages: {used}", file=sys.stderr, flush=True)
