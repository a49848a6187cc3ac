"""What a caller of the engine holds: the Request handle (iterate it for Deltas, result() for the Result,
abort()), the finished Choices, and TextOutput, one choice's text as it streams (whole UTF-8 characters,
stop strings cut, what may begin a stop string held back). The engine thread fills them
(push / complete / fail); callers only read them. engine.py re-exports EngineError.
"""

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

from sampling import find_stop, held_back
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
# Errors

class EngineError(RuntimeError):
    """The engine failed while running a request; the cause is chained."""


# -----------------------------------------------------------------------------
# What callers get back

@dataclass
class Delta:
    """New output of one choice since its previous Delta."""
    index: int  # which of the n choices
    text: str
    token_ids: list
    logprobs: Optional[list]  # TokenLogprob per token, if asked for
    finish_reason: Optional[str] = None  # on a choice's last Delta: "stop", "length" or "abort"


@dataclass
class Choice:
    index: int
    text: str  # excludes stop strings and stop tokens
    token_ids: list  # every sampled token, including a stop token that ended the choice
    finish_reason: str
    logprobs: Optional[list]


@dataclass
class Result:
    id: str
    prompt_token_ids: list
    choices: list
    usage: dict  # prompt_tokens (counted once), completion_tokens (all choices), total_tokens

    text = property(lambda self: self.choices[0].text)
    token_ids = property(lambda self: self.choices[0].token_ids)
    finish_reason = property(lambda self: self.choices[0].finish_reason)
    logprobs = property(lambda self: self.choices[0].logprobs)


_request_ids = itertools.count()
UNREAD_LIMIT = 64  # Deltas per choice a streaming caller may leave unread before its sequences pause


class Request:
    """The handle submit() returns: iterate it for Deltas, result() for the Result, abort() to cancel.

    The engine completes it through push / complete / fail; callers only read it."""

    def __init__(self, prompt_ids, params, max_tokens, wake):
        self.id = f"req-{next(_request_ids)}"
        self.prompt_ids, self.params, self.max_tokens = prompt_ids, params, max_tokens
        self.submitted_at, self.first_token_at = time.perf_counter(), None
        self.aborted, self.streamed = False, False  # streamed: a caller reads Deltas as they come
        self._wake = wake  # tells the scheduler to look at us now (abort)
        self._queue = queue.SimpleQueue()  # Deltas, or the exception that failed the request
        self._choices = [None] * params.n
        self._open = params.n
        self._error = None
        self._done = threading.Event()

    # -- the caller's side

    def __iter__(self):
        return (d for d in self.deltas() if d is not None)

    def deltas(self, timeout=None):
        """Yield Deltas until every choice has finished. With a timeout, yield None
        whenever that long passes without one, so the caller can look elsewhere
        (the server checks whether its client is still there)."""
        remaining, self.streamed = self.params.n, True
        while remaining:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, BaseException):
                raise EngineError(f"{self.id} failed: {item!r}") from item
            remaining -= item.finish_reason is not None
            yield item

    def wait(self, timeout=None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout=None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id} is still running after {timeout} s")
        if self._error is not None:
            raise EngineError(f"{self.id} failed: {self._error!r}") from self._error
        completion = sum(len(c.token_ids) for c in self._choices)
        usage = {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(self.prompt_ids) + completion}
        return Result(self.id, self.prompt_ids, list(self._choices), usage)

    def abort(self):
        """Cancel: the choices finish with "abort" and their memory frees within one step.
        A no-op once the request is done."""
        if not self._done.is_set():
            self.aborted = True
            self._wake()

    # -- the engine's side

    @property
    def backlogged(self) -> bool:
        """A streaming caller is UNREAD_LIMIT Deltas per choice behind: its sequences wait for it to read
        (backpressure), so a client that stops reading holds its KV blocks, not a growing queue, until the
        server's write timeout aborts it. result()-only callers are never behind: nobody reads their queue."""
        return self.streamed and self._queue.qsize() >= UNREAD_LIMIT * self.params.n

    @property
    def gone(self):
        """Aborted or failed: its sequences should stop."""
        return self.aborted or self._error is not None

    def push(self, delta):
        self._queue.put(delta)

    def complete(self, choice) -> bool:
        """Record a finished choice; True once it was the last one."""
        self._choices[choice.index] = choice
        self._open -= 1
        if self._open == 0 and not self._done.is_set():
            self._done.set()
            return True
        return False

    def fail(self, error) -> bool:
        """Fail the whole request; False if it had already ended."""
        if self._done.is_set():
            return False
        self._error = error
        self._queue.put(error)
        self._done.set()
        return True


class TextOutput:
    """One choice's text as it streams: whole UTF-8 characters, stop strings cut, and what the
    caller has not been sent yet (text, token ids, logprobs)."""

    def __init__(self, tokenizer, stops, skip_special=True):
        self.decoder, self.stops = StreamDecoder(tokenizer, skip_special=skip_special), stops
        self.text, self.sent = "", 0
        self.ids, self.logprobs = [], []

    def add(self, token, lp, as_text=True) -> bool:
        """Append a token (its text too unless it is a stop token); True if a stop string now ends the text."""
        self.ids.append(token)
        if lp is not None:
            self.logprobs.append(lp)
        if not as_text:
            return False
        start = len(self.text)
        self.text += self.decoder.feed(token)
        cut = find_stop(self.text, self.stops, start)
        if cut is not None:
            assert cut >= self.sent, f"stop string at {cut} but {self.sent} characters were already sent"
            self.text = self.text[:cut]
        return cut is not None

    def delta(self, index, want_logprobs, reason=None, flush=False):
        """The next Delta, or None if nothing is ready. Until the end, the text that could
        still begin a stop string is held back; flush ends an unfinished character as U+FFFD."""
        if flush:
            self.text += self.decoder.flush()
        upto = len(self.text) if reason else len(self.text) - held_back(self.text[self.sent:], self.stops)
        text = self.text[self.sent:upto]
        if not (text or reason):
            return None
        d = Delta(index, text, self.ids, self.logprobs if want_logprobs else None, reason)
        self.sent, self.ids, self.logprobs = upto, [], []
        return d
