"""Sampling: what a request may ask for, and how one token per row is drawn.

SamplingParams validates a request's settings against what the sampler's float32 / int64
tensors can hold (a 400 naming the field, never a NaN in a batch). `sample` is the whole
per-row pipeline, in this order: the vocabulary mask, the raw logprobs (log_softmax before
anything else, as OpenAI reports them), logit_bias (OpenAI's: added to the logits; -100 bans a
token outright, +100 makes the +100 tokens the only candidates), repetition penalty (CTRL, Keskar et al. 2019: seen
tokens' positive logits are divided by it, negative ones multiplied), presence / frequency
penalties (OpenAI: logit -= f * count + p * [count > 0] over generated tokens), the grammar mask (constrained decoding: grammar.py; only tokens that keep
the output valid), temperature (0 = argmax), top-k, top-p (Holtzman et al. 2019), min-p (Nguyen et al. 2024: keep
p >= min_p * p_max), the validity check, and one inverse-CDF draw from a number fixed by
(seed, position): counter-based, so a seed gives the same tokens whatever else is batched.
Stop strings are matched on the decoded text, and text that may begin one is held back.

Left out: beam search, typical / eta sampling, mirostat.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # per stop string: every token is checked against each stop's prefixes
MAX_STOP_IDS = 1024  # stop_token_ids per request
MIN_POSITIVE = torch.finfo(torch.float32).tiny  # 1.2e-38: smaller positive temperatures / top_p are 0 in float32
INT64 = 1 << 63
MAX_N = 64  # choices per request
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries per request
DEFAULTS_FROM_MODEL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # generation_config.json


# -----------------------------------------------------------------------------
# Errors and per-request settings

class RequestError(ValueError):
    """A request the engine cannot run as asked; `param` names the field (for HTTP 400s)."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def need(ok, param, message):
    if not ok:
        raise RequestError(f"{param}: {message}", param)


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = None  # None: up to the end of the context
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None  # choice i of n uses seed + i
    stop: list = field(default_factory=list)  # strings; the text ends before the first one
    stop_token_ids: list = field(default_factory=list)  # on top of EOS and <|im_end|>
    ignore_eos: bool = False  # keep going past EOS / <|im_end|> (benchmarks)
    logprobs: bool = False  # per-token logprob of each sampled token
    top_logprobs: int = 0  # and this many best alternatives
    n: int = 1
    logit_bias: dict = field(default_factory=dict)  # {token id (an int, or its decimal string): bias in [-100, 100]}
    json_schema: Optional[dict] = None  # the output must be JSON valid against it (grammar.py); {} = any JSON
    skip_special_tokens: bool = True  # False: special tokens appear in the text (tool-call markers such as [TOOL_CALLS])
    stop_id_set: frozenset = field(init=False, repr=False, compare=False)  # stop_token_ids, for O(1) checks

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
              f"must be an integer >= 1 (got {self.max_tokens!r})")
        # Bounds are those of the float32 / int64 tensors the sampler builds: a positive
        # value below float32's smallest would become 0 there and turn a row into NaNs.
        t = self.temperature
        need(is_num(t) and (t == 0 or MIN_POSITIVE <= t <= 2), "temperature",
              f"must be 0 (greedy) or a number in [{MIN_POSITIVE:.3g}, 2] (got {t!r})")
        need(is_int(self.top_k) and 0 <= self.top_k < INT64, "top_k",
              f"must be an integer in [0, 2**63), 0 = off (got {self.top_k!r})")
        need(is_num(self.top_p) and MIN_POSITIVE <= self.top_p <= 1, "top_p",
              f"must be a number in [{MIN_POSITIVE:.3g}, 1] (got {self.top_p!r})")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be a number in [0, 1] (got {self.min_p!r})")
        # Past 100 a seen token's logit is pushed to about 0 or -inf either way; the bound
        # keeps float32 logits finite (logit / 0.01 stays far from 3.4e38).
        need(is_num(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100, "repetition_penalty",
              f"must be a number in [0.01, 100], 1 = off (got {self.repetition_penalty!r})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(is_num(value) and -2 <= value <= 2, name, f"must be a number in [-2, 2] (got {value!r})")
        need(self.seed is None or (is_int(self.seed) and -INT64 <= self.seed < INT64), "seed",
              f"must be a 64-bit integer (got {self.seed!r:.40})")
        need(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop), "stop",
              f"must be a non-empty string or a list of them (got {self.stop!r:.60})")
        need(len(self.stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings (got {len(self.stop)})")
        need(all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
              f"each stop string may have at most {MAX_STOP_CHARS} characters")
        ids = self.stop_token_ids
        need(isinstance(ids, (list, tuple)) and all(is_int(i) and 0 <= i < INT64 for i in ids), "stop_token_ids",
              f"must be a list of token ids (got {ids!r:.60})")
        need(len(ids) <= MAX_STOP_IDS, "stop_token_ids", f"at most {MAX_STOP_IDS} ids (got {len(ids)})")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "must be true or false")
        need(isinstance(self.logprobs, bool), "logprobs", "must be true or false")
        need(is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
              f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (got {self.top_logprobs!r})")
        need(self.logprobs or not self.top_logprobs, "top_logprobs", "needs logprobs=true")
        need(is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}] (got {self.n!r})")
        self.logit_bias = check_logit_bias(self.logit_bias)
        need(self.json_schema is None or isinstance(self.json_schema, dict), "json_schema",
             "must be a JSON schema object (a dict)")
        need(isinstance(self.skip_special_tokens, bool), "skip_special_tokens", "must be true or false")
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        self.stop_id_set = frozenset(self.stop_token_ids)


def check_logit_bias(bias) -> dict:
    """OpenAI's logit_bias -> {token id: float}: keys are ids or their decimal strings, values in [-100, 100]."""
    need(isinstance(bias, dict), "logit_bias", f"must be an object mapping token ids to biases (got {bias!r:.60})")
    need(len(bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} entries (got {len(bias)})")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        need(is_int(token) and 0 <= token < INT64, "logit_bias", f"key {key!r:.40} is not a token id")
        need(is_num(value) and -100 <= value <= 100, "logit_bias",
             f"the bias of token {token} must be a number in [-100, 100] (got {value!r:.40})")
        out[token] = float(value)
    return out


# -----------------------------------------------------------------------------
# Sampling filters: pure functions on a batch of logits, one setting per row

def apply_penalties(logits, seen, counts, repetition, presence, frequency):
    """logits (B, V); seen (B, V) bool: token in the prompt or output; counts (B, V):
    times generated so far; repetition, presence, frequency (B,). Returns new logits."""
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_logit_bias(logits, biases):
    """logits (B, V); biases: per row {token id: bias}. Added to the logits, except that -100 bans a token
    (-inf) and a row with +100 entries keeps only those tokens (OpenAI: "exclusive selection")."""
    for b, bias in enumerate(biases):
        if not bias:
            continue
        ids = torch.tensor(list(bias), device=logits.device)
        values = torch.tensor(list(bias.values()), device=logits.device)
        row = logits[b].index_add(0, ids, values).index_fill(0, ids[values == -100], float("-inf"))
        forced = ids[values == 100]
        if len(forced):
            row = torch.full_like(row, float("-inf")).index_copy(0, forced, row[forced])
        logits[b] = row
    return logits


def unpack_bitmask(bitmask, V) -> torch.Tensor:
    """(B, W) int32 words -> (B, V) bool: bit t % 32 of word t // 32, as grammar.Matcher.bitmask packs them."""
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # (B, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :V].bool()


def filter_logits(logits, top_k, top_p, min_p):
    """Set to -inf every token outside a row's top-k, top-p nucleus and min-p set.

    logits (B, V), already divided by the temperature; top_k (B,) long, 0 = off;
    top_p, min_p (B,). Top-k keeps ties with the k-th value; top-p keeps the
    smallest prefix (by probability) whose mass reaches top_p; min-p keeps
    p >= min_p * p_max. The best token always survives.
    """
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # (B, 1)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better-ranked tokens
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # < 1: cumsum rounding must not cut the tail
    drop |= probs < min_p[:, None] * probs[:, :1]  # a ratio, so renormalising after top-k does not change it
    drop[:, 0] = False  # whatever the settings, the best token survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def find_stop(text, stops, start):
    """Index of the first stop string in text that ends after `start`, else None."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits, default=None)


def held_back(text, stops):
    """Length of the longest end of text that could begin a stop string:
    ("say ST", ["STOP"]) -> 2. A stream must not show it until it is sure."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


# -----------------------------------------------------------------------------
# Counter-based sampling: a token's random number depends on (seed, choice, position) only

MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser (Steele, Lea, Flood 2014): a bijection on 64-bit ints that scrambles every bit."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """The random number in [0, 1) that draws the token at `position` of a choice with this seed."""
    return (_mix64(_mix64(seed & MASK64) ^ position) >> 11) / float(1 << 53)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, all rows at once: row b takes the first token whose cumulative probability
    exceeds u_b times the row's total. probs (B, V), u (B,) float64 -> tokens (B,).

    One number per row instead of a generator per request: a seed gives the same tokens whatever else
    is batched, however a batch is split, and after a preemption, because each draw depends only on
    its row's distribution and (seed, choice, position). Tokens of zero probability are never drawn.
    """
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]  # (B, 1)
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.shape[1] - 1)


# -----------------------------------------------------------------------------
# The pipeline: a batch of logits -> one token per row

@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list  # [(token_id, logprob)], best first; empty unless top_logprobs > 0


def sample(logits, rows, vocab_size):
    """One token per row, and its TokenLogprob for the rows whose params ask (else None).

    logits (B, V) float32 at each row's last position; rows: objects with .params (SamplingParams),
    .seed, .prompt, .tokens and .grammar (scheduler.Sequence; grammar: a grammar.Matcher or None), whose next position is len(prompt) + len(tokens);
    ids at or past vocab_size (a padded vocabulary the tokenizer cannot decode) are never drawn.
    A row left with no distribution (NaN, or nothing after the filters) raises ValueError, so the
    caller can rerun the rows alone and fail only that one. One transfer to the host.
    """
    B, P = len(rows), [r.params for r in rows]
    def col(name, dtype=torch.float32):  # one setting for every row: (B,)
        return torch.tensor([getattr(p, name) for p in P], dtype=dtype, device=logits.device)
    # 1. the vocabulary mask; the raw distribution's logprobs, before anything changes it
    logits[:, vocab_size:] = float("-inf")
    logprobs = logits.log_softmax(dim=-1) if any(p.logprobs for p in P) else None  # (B, V)
    # 2. penalties on what each row has seen
    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in P):
        seen, counts = history(rows, logits.shape[1], logits.device)
        logits = apply_penalties(logits, seen, counts, col("repetition_penalty"), col("presence_penalty"),
                                 col("frequency_penalty"))
    # 3. logit_bias, then the grammar: the tokens that keep each constrained row's output valid
    if any(p.logit_bias for p in P):
        logits = apply_logit_bias(logits, [p.logit_bias for p in P])
    constrained = [b for b in range(B) if rows[b].grammar is not None]
    if constrained:
        words = torch.stack([rows[b].grammar.bitmask() for b in constrained])  # (B', ceil(vocab_size / 32))
        allowed = unpack_bitmask(words, vocab_size).to(logits.device)  # (B', vocab_size)
        logits[constrained, :vocab_size] = logits[constrained, :vocab_size].masked_fill(~allowed, float("-inf"))
    # 4. greedy rows take the argmax; a NaN row (amax is NaN) or an all -inf one is not a distribution
    tokens = logits.argmax(dim=-1)  # (B,)
    ok = logits.amax(dim=-1) > float("-inf")
    # 5. temperature, filters, the counter-based draw
    hot = [b for b in range(B) if P[b].temperature > 0]
    if hot:
        # Subtract the max before dividing: any temperature > 0 then gives a finite
        # distribution (the best token at 0, the rest <= 0), where x / 1e-30 overflows.
        x = logits[hot]
        x = (x - x.max(dim=-1, keepdim=True).values) / col("temperature")[hot, None]  # (B', V)
        if any(P[b].top_k or P[b].top_p < 1 or P[b].min_p for b in hot):
            x = filter_logits(x, col("top_k", torch.long)[hot], col("top_p")[hot], col("min_p")[hot])
        probs = x.softmax(dim=-1)
        ok[hot] &= probs.isfinite().all(dim=-1) & (probs.sum(dim=-1) > 0)
        u = torch.tensor([uniform(rows[b].seed, len(rows[b].prompt) + len(rows[b].tokens)) for b in hot],
                         dtype=torch.float64)
        tokens[hot] = draw(probs, u)
    # 6. to the host, with the logprobs asked for
    tokens = torch.where(ok, tokens, -1)
    ids, lps = (tokens.tolist(), [None] * B) if logprobs is None else chosen_logprobs(P, tokens, logprobs)
    if -1 in ids:
        raise ValueError(f"no valid sampling distribution in rows {[b for b in range(B) if ids[b] < 0]} "
                         "(NaN or empty after filters)")
    return ids, lps


def history(rows, V, device):
    """Penalty state: seen (B, V) in prompt or output, counts (B, V) of output."""
    seen = torch.zeros(len(rows), V, dtype=torch.bool, device=device)
    counts = torch.zeros(len(rows), V, device=device)
    for b, r in enumerate(rows):
        seen[b, torch.tensor(r.prompt + r.tokens, device=device)] = True
        if r.tokens:
            counts[b].index_add_(0, torch.tensor(r.tokens, device=device), torch.ones(len(r.tokens), device=device))
    return seen, counts


def chosen_logprobs(P, tokens, logprobs):
    """Token ids (B,) and, per row that asked, the chosen token's logprob and its top alternatives."""
    chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
    k = max(p.top_logprobs for p in P)
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
    ids, chosen, top_v, top_i = tokens.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist()
    return ids, [TokenLogprob(ids[b], chosen[b], list(zip(top_i[b][:p.top_logprobs], top_v[b][:p.top_logprobs])))
                 if p.logprobs else None for b, p in enumerate(P)]
