"""Continuous batching for the server (nanotune/serve/server.py): one loop owns the model and decodes every running
request together, one token per row per step; a request that arrives meanwhile joins the batch at the next step,
and one that ends (or whose client left) leaves it. So tokens per second grow with the number of clients, where
one generate() call per request would make them queue.

Each row keeps its own place in one KV cache (model.decode_step with a slot per row): the prompts of the requests
that join at a step run once, together (prefill), and their keys and values are copied into new rows;
cache.valid marks each row's real keys, so rows of different lengths never see each other's padding. This module
knows nothing of HTTP.
"""

from __future__ import annotations

import codecs
import contextlib
import queue
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.instruct import token_logprobs
from ..decoding import KVCache, packed_layers
from ..generate import pick_tokens
from ..model.gpt import GPT

SLOTS = 64  # the cache grows in steps of this many positions (fewer reallocations, attention over few unused)


@dataclass
class Request:
    """One prompt to continue n times. The engine calls emit(choice, text, finish_reason, n_tokens) from its
    loop's thread for every piece of text (finish_reason None until the choice ends: "stop", "length", or
    "error", with .error saying why). A request that asks for log-probabilities (logprobs: the token's and this
    many alternatives'; score_prompt: the prompt's own tokens too) gets them as a fifth argument, logprobs=, a
    list of scored() entries for the tokens behind that piece; max_tokens 0 with score_prompt scores the prompt
    alone."""

    prompt: list[int]
    max_tokens: int
    emit: object  # callable(choice: int, text: str, finish_reason: str | None, n_tokens: int)
    n: int = 1
    temperature: float = 1.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token to report (None: no log-probabilities)
    score_prompt: bool = False  # the log-probabilities of the prompt's tokens too (echo)
    cancelled: bool = False  # set by the server when the client has gone: the rows leave at the next step
    error: Exception | None = None  # what failed this request (the others go on)


class TextStream:
    """A choice's tokens -> the text to send so far. Bytes are decoded incrementally (a character split across
    tokens waits for its last byte), and text that could be the start of a stop string is held back until it
    cannot (so a stop string is never sent, even in part)."""

    def __init__(self, enc, stop: tuple[str, ...]):
        self.enc, self.stop = enc, stop
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.sent = "", 0  # all text decoded, how much of it went out

    def feed(self, token: int) -> tuple[str, bool]:
        """-> (new text to send, whether a stop string ended the choice)."""
        self.text += self.decoder.decode(self.enc.decode_single_token_bytes(token))
        found = [at for s in self.stop if (at := self.text.find(s, max(0, self.sent - len(s)))) != -1]
        if found:  # the earliest in the text, whichever stop string it is
            self.text = self.text[: min(found)]
            return self._release(len(self.text)), True
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - held), False

    def finish(self) -> str:
        """The rest, when the choice ends for another reason (the held-back text was no stop string after all)."""
        self.text += self.decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out


@dataclass
class Row:
    """One choice of one request: a row of the batch."""

    request: Request
    choice: int
    length: int  # positions of the cache it fills (its next token goes into slot `length`)
    text: TextStream
    generator: torch.Generator | None
    produced: int = 0
    token: int = -1  # the token picked last (the next decode step's input)

    def advance(self, logits: torch.Tensor, greedy: int, eos: int, context: int) -> str | None:
        """The next token (greedy, or sampled with the row's own generator, so that a request's seed gives the
        same answer whoever else is in the batch) and its text sent. logits (V,), float32. -> finish_reason."""
        request = self.request
        token = greedy
        if request.temperature > 0:
            token = int(pick_tokens(logits[None], request.temperature, None, request.top_p, _NONE, self.generator))
        self.token, self.produced = token, self.produced + 1
        finish = None
        if token == eos:
            text, finish = self.text.finish(), "stop"
        else:
            text, stopped = self.text.feed(token)
            if stopped:
                finish = "stop"
            elif self.produced >= request.max_tokens or self.length + 1 >= context:
                text, finish = text + self.text.finish(), "length"
        if request.logprobs is None:
            request.emit(self.choice, text, finish, self.produced)
        else:
            scores = scored(logits[None], torch.tensor([token], device=logits.device), request.logprobs)
            request.emit(self.choice, text, finish, self.produced, logprobs=scores)
        return finish


class Batch:
    """The rows decoded together: their KV cache (grown in steps of SLOTS positions, at most the model's context),
    their next-token logits, and one decode step for all of them. fail(request, error) ends one request."""

    def __init__(self, model: GPT, enc, packed: bool, fail):
        self.model, self.enc, self.fail, self.device = model, enc, fail, model.wte.weight.device
        # the tied head copied once for the server's life (see KVCache: on a CPU a packed copy for every row
        # count, on a GPU a (C, V) copy for one row); the batch's keys and values follow
        self.cache = KVCache(model, 0, SLOTS, copy_head=True, packed=packed)
        self.logits = torch.empty(0, model.config.vocab_size, device=self.device)  # (B, V)
        self.rows: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, requests: list[Request]):
        """The prompts once through the model, together (left-padded to the longest: requests that arrive at once
        wait for one forward, not one each); each prompt's keys and values become n new rows, each with its first
        token. A request with score_prompt joins alone: the same forward also gives the prompt's own
        log-probabilities (each token's, given those before it), sent before the first token; with max_tokens 0
        they are all there is."""
        model, lengths = self.model, [len(request.prompt) for request in requests]
        scoring = requests[0].score_prompt
        if len(requests) > 1 and any(request.score_prompt for request in requests):
            raise ValueError("a request that scores its prompt joins the batch alone")
        T, nv = max(lengths), model.n_virtual
        ids = torch.tensor([[0] * (T - n) + r.prompt for r, n in zip(requests, lengths)], device=self.device)
        real = torch.tensor([[False] * (T - n) + [True] * n for n in lengths], device=self.device)
        padded = not bool(real.all())  # (R, T): the prompts' real tokens; padding only when their lengths differ
        scoring_alone = scoring and not requests[0].max_tokens  # (no rows join: no cache to fill)
        own = None if scoring_alone else KVCache(model, len(requests), T + nv, copy_head=False)
        if own is not None:  # the batch's copies of the head: the first token's logits 3x sooner
            own.share_head(self.cache)
        if scoring:
            hidden = model(ids, cache=own, hidden=True)[0]  # (T, C)
            with torch.autocast(self.device.type, enabled=False):  # the head in float32, as forward's own
                every = F.linear(hidden.float(), model.wte.weight.float())  # (T, V)
            request = requests[0]
            scores = [(request.prompt[0], None, [])] + scored(every[:-1], ids[0, 1:], request.logprobs or 0)
            for choice in range(request.n):
                request.emit(choice, "", "length" if scoring_alone else None, 0, logprobs=scores)
            if scoring_alone:
                return
            logits = every[-1:]  # (1, V)
        else:
            logits = model(ids, attention_mask=real if padded else None, cache=own)[:, -1]  # (R, V), float32
        own.valid[:, : own.length] = torch.cat([real.new_ones(len(requests), nv), real], dim=1)  # (+ prompt tuning)
        copies = [request.n for request in requests]
        self._grow(own.length + 1)
        prompt_rows = self.cache.add_rows(own, own.length, copies)  # (each row's real keys first: its own room)
        self.logits = torch.cat([self.logits, logits.index_select(0, prompt_rows)])
        for request in requests:
            for choice in range(request.n):
                generator = None
                if request.temperature > 0:
                    seed = request.seed + choice if request.seed is not None else int(torch.randint(2**62, ()))
                    generator = torch.Generator(self.device).manual_seed(seed)
                length = nv + len(request.prompt)  # (its own positions, whoever it was prefilled with)
                self.rows.append(Row(request, choice, length, TextStream(self.enc, request.stop), generator))

    def _grow(self, needed: int):
        if needed > self.cache.max_len:
            self.cache.resize(min(-(-needed // SLOTS) * SLOTS, self.model.config.n_positions))

    def keep(self, keep: list[int]):
        """Only these rows stay (the others ended, were cancelled or failed); an empty batch shrinks the cache."""
        self.rows = [self.rows[i] for i in keep]
        if len(keep) != self.cache.k.shape[1]:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.cache.keep_rows(index)
            self.logits = self.logits[index]
        if not keep:  # nothing running: back to the smallest cache
            self.cache.resize(SLOTS)

    def step(self) -> bool:
        """Pick each row's next token from its logits, send its text, retire the rows that ended, then one
        decode step for the rest: their next logits. A fault in one row's work fails its request alone; a fault
        in the decode step, which every row shares, fails the requests in the batch. -> whether it decoded"""
        greedy = self.logits.argmax(-1).tolist()  # (B,): every greedy row at once
        context, keep = self.model.config.n_positions, []
        for i, row in enumerate(self.rows):
            try:
                ended = row.request.cancelled or row.advance(self.logits[i], greedy[i], self.enc.eot_token, context)
            except Exception as e:
                self.fail(row.request, e)
                continue
            if ended is None:
                keep.append(i)
        self.keep([i for i in keep if not self.rows[i].request.cancelled])
        if not self.rows:
            return False
        try:
            span = max(row.length for row in self.rows) + 1  # the slots any row has filled, this step's included
            self._grow(span)
            at = torch.tensor([row.length for row in self.rows], device=self.device)  # (B,) each row's next slot
            token = torch.tensor([row.token for row in self.rows], device=self.device)[:, None]  # (B, 1)
            self.cache.ragged = len(self.rows) > 1  # (rows of different lengths: each sees only its own keys)
            self.logits = self.model.decode_step(token, self.cache, at, span)  # (B, V)
        except Exception as e:
            self.fail_all(e)
            return False
        for row in self.rows:
            row.length += 1
        return True

    def fail_all(self, error: Exception):
        """Every request in the batch ends (a fault in the step they share); the batch starts afresh."""
        for request in {id(row.request): row.request for row in self.rows}.values():
            if not request.cancelled:
                self.fail(request, error)
        self.keep([])  # (every tensor of the batch cut to no rows, whatever state the fault left them in)


class Engine:
    """The model, its batch of rows and the queue of requests waiting for room. submit() from any thread;
    the decoding runs in one thread, run() (or start(): run() in a new thread)."""

    def __init__(self, model: GPT, enc, max_batch: int = 8, max_queue: int = 32, dtype: torch.dtype | None = None):
        self.model, self.enc, self.max_batch, self.max_queue = model.eval(), enc, max_batch, max_queue
        self.device = model.wte.weight.device
        self.dtype = dtype
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.batch: Batch | None = None  # made in run()
        self.steps = 0  # decode steps run (for the tests and /health)
        self.faults = 0  # requests that failed while being decoded (for the tests and /health)
        self._next = None  # a request taken from the queue before there was room for it: it goes first
        self._stop = threading.Event()
        self._thread = None
        self._closed = False  # run() has ended: nothing more is taken (under _lock, with submit)
        self._lock = threading.Lock()
        self.error: Exception | None = None  # what ended run(), if the model failed

    # ---- called from the server's threads

    def submit(self, request: Request) -> bool:
        """Queue a request; False when the queue is full (the server answers 429). A request that comes after
        run() ended gets its end at once, finish_reason "error" (the server answers 500)."""
        if request.n > self.max_batch:
            raise ValueError(f"n = {request.n} choices cannot fit a batch of {self.max_batch} rows")
        with self._lock:
            if self._closed:
                for choice in range(request.n):
                    request.emit(choice, "", "error", 0)
                return True
            if self.waiting.qsize() >= self.max_queue:
                return False
            self.waiting.put(request)
            return True

    def stats(self) -> dict:
        running = len(self.batch) if self.batch is not None else 0
        return {"running": running, "waiting": self.waiting.qsize(), "steps": self.steps, "faults": self.faults}

    def start(self):
        """run() in a thread of its own (the server runs it in the main thread instead: see serve.main)."""
        self._thread = threading.Thread(target=self.run, name="nanotune-engine", daemon=True)
        self._thread.start()

    def stop_soon(self):
        """Make run() return after the step in progress (within 0.5 s when idle); safe in a signal handler."""
        self._stop.set()

    def stop(self):
        """stop_soon(), and wait for run() to end."""
        self.stop_soon()
        self.waiting.put(None)  # wake it if it waits for work
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the decoding loop

    def run(self):
        """Decode until stop(): admit waiting requests, drop cancelled rows, one step for all the rest. A fault
        while serving a request (its prefill, its sampling, a decode step it was part of) fails the requests it
        touched (_fail) and the loop goes on; only a fault outside them (a bug here) is kept in .error and ends
        run(). Either way every request still running or waiting when run() ends gets finish_reason "error"."""
        packed = self.dtype == torch.bfloat16 and self.device.type == "cpu"
        bf16 = self.dtype is not None and self.device.type != "cpu"
        # on a CPU the large layers keep packed copies for the server's life (decoding.packed_layers; in float32
        # one row reads the weights themselves)
        layers = torch.bfloat16 if packed else torch.float32
        context = packed_layers(self.model, layers) if self.device.type == "cpu" else contextlib.nullcontext()
        with torch.inference_mode(), context, torch.autocast(self.device.type, dtype=self.dtype, enabled=bf16):
            self.batch = batch = Batch(self.model, self.enc, packed, self._fail)
            try:
                while not self._stop.is_set():
                    self._admit(block=not batch.rows)
                    batch.keep([i for i, row in enumerate(batch.rows) if not row.request.cancelled])
                    if batch.rows:
                        self.steps += batch.step()
            except Exception as e:
                self.error = e
                traceback.print_exc()  # into the server's log
            finally:
                self._close()

    def _close(self):
        """No more requests; those running or waiting end now."""
        with self._lock:
            self._closed = True
        for row in self.batch.rows if self.batch is not None else []:
            row.request.emit(row.choice, "", "error", row.produced)
        waiting = [self._next] + [self.waiting.get() for _ in range(self.waiting.qsize())]
        for request in filter(None, waiting):
            for choice in range(request.n):
                request.emit(choice, "", "error", 0)

    def _admit(self, block: bool):
        """Move waiting requests into the batch while it has room for all their choices; those waiting now join
        together (one prefill for them all), except one that scores its prompt, which joins alone."""
        taken, room = [], self.max_batch - len(self.batch)
        while room > 0:
            request, self._next = self._next, None
            try:
                request = request or self.waiting.get(block=block and not taken, timeout=0.5 if block else None)
            except queue.Empty:
                break
            if request is None:  # stop()
                break
            if request.cancelled:
                continue
            if request.n > room:  # no room for all its choices yet: it goes first later
                self._next = request
                break
            taken.append(request)
            room -= request.n
        together = [request for request in taken if not request.score_prompt]
        for group in [[r] for r in taken if r.score_prompt] + ([together] if together else []):
            self._join(group)

    def _join(self, group: list[Request]):
        """The group into the batch. If it fails before the batch changed, a group of several tries again one
        request at a time, so that only a request whose own prompt fails (too long for memory, say) ends."""
        try:
            self.batch.join(group)
        except Exception as e:
            untouched = self.batch.cache.k.shape[1] == len(self.batch)
            if len(group) > 1 and untouched:
                for request in group:
                    self._join([request])
                return
            for request in group:
                self._fail(request, e)
            if not untouched:  # it failed while joining the batch: afresh
                self.batch.fail_all(e)

    def _fail(self, request: Request, error: Exception):
        """This request alone ends with finish_reason "error" (the server answers 500, naming the error)."""
        print(f"nanotune: a request failed, the others go on: {type(error).__name__}: {error}", file=sys.stderr)
        traceback.print_exception(error)
        self.faults += 1
        request.error, request.cancelled = error, True
        for choice in range(request.n):
            request.emit(choice, "", "error", 0)


def scored(logits: torch.Tensor, tokens: torch.Tensor, alternatives: int) -> list[tuple]:
    """logits (T, V) float32 and the tokens (T,) they were followed by -> [(token, log p(token), [(alternative,
    log p)] for the `alternatives` most likely)] in float32 (nanotune.data.instruct.token_logprobs', the training's)."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # (T,)
    chosen = token_logprobs(logits[None], tokens[None], lse[None])[0].tolist()  # (T,)
    top = torch.topk(logits.float(), alternatives, dim=-1) if alternatives else None
    tops = [[] for _ in chosen]
    if top is not None:
        values = (top.values - lse[:, None]).tolist()  # (T, k): picked - lse, as token_logprobs computes it
        tops = [list(zip(ids, lps)) for ids, lps in zip(top.indices.tolist(), values)]
    return list(zip(tokens.tolist(), chosen, tops))


_NONE = torch.empty(0, dtype=torch.long)  # no banned tokens
