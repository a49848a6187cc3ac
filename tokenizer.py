"""Byte-level BPE tokenizer: train, encode, decode, save/load as a Hugging Face tokenizer.json.

Byte-level BPE as in GPT-2 (Sennrich et al. 2016; Radford et al. 2019: BPE on UTF-8 bytes, with
`bytes_to_unicode` and the merge loop of GPT-2's encoder.py), a regex pre-tokenizer, special tokens
and UTF-8-safe incremental decoding for streaming. Training follows minbpe (Karpathy) with pair counts
updated incrementally, as the `tokenizers` BPE trainer does. `tokenizers` and `transformers` read the
tokenizer.json we write; we read the byte-level BPE ones they write (GPT-2, Llama-3, Qwen2 style)
with identical ids. A Tokenizer holds a chat.ChatTemplate (`tok.chat`) and encodes what it lays out.

Leaves out: byte fallback (SentencePiece-style files such as Llama-2's), BPE dropout, normalizers
other than Unicode NFC/NFKC/NFD/NFKD, the lstrip/rstrip/single_word flags of added tokens,
post-processors (we never add BOS/EOS implicitly; chat templates write bos_token themselves).

    python tokenizer.py train --input corpus.txt --vocab-size 4096 --out runs/tok  # tok = load("runs/tok")
    python tokenizer.py encode --tokenizer runs/tok "你好, world"
"""

import argparse
import codecs
import hashlib
import heapq
import json
import operator
import os
import shutil
import unicodedata
from collections import Counter, defaultdict
from itertools import repeat
from pathlib import Path

import regex  # not `re`: the patterns need Unicode classes \p{L} and \p{N}

import cli
from chat import IM_END, IM_START, ChatTemplate, chatml_jinja

# -----------------------------------------------------------------------------
# Pre-tokenization patterns and special tokens

# Qwen2's split: GPT-4's cl100k_base pattern with single digits, as in Qwen2's
# tokenizer.json and transformers' models/qwen2/tokenization_qwen2.py
# (PRETOKENIZE_REGEX; a test checks they are equal). Case-insensitive contractions;
# a letter run takes at most one leading non-letter (" world", "的世界", "_init");
# each digit is its own piece so numbers tokenize uniformly; punctuation runs
# keep their trailing newlines; a whitespace run leaves its last space to the
# next word. Han characters are \p{L}, so a run of Chinese is one piece.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's pattern (encoder.py); `tokenizers` applies it for ByteLevel(use_regex=true).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# `regex` and Oniguruma (inside `tokenizers`) split every character assigned up
# to Unicode 14 identically (checked exhaustively); characters assigned later
# may split differently because the two libraries ship different Unicode tables.

ENDOFTEXT = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ChatML's two (chat.py) after end of document
CACHE_SIZE = 100_000  # pre-token -> ids entries kept before the cache is cleared
INF = float("inf")


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest (space, control bytes) shift to U+0100.. so
    that every token is a readable string without whitespace: b" " -> "Ġ", b"\\n" -> "Ċ" (tokenizer.json).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    shifted = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return dict(sorted(chars.items()))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def token_to_str(token):
    """b" the" -> "Ġthe": the byte-level spelling used in tokenizer.json."""
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def str_to_token(text):
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(f"token {text!r} has the character {e.args[0]!r}, which is not in the "
                         "GPT-2 byte alphabet: this is not a byte-level BPE tokenizer") from None


# -----------------------------------------------------------------------------
# Pre-tokenization


def pretokenize(text, patterns):
    """Split text into the pieces BPE runs on; merges never cross a piece boundary.

    Each pattern acts like a `tokenizers` Split(behavior="isolated"): matches and
    the gaps between them both become pieces, and the next pattern splits each
    piece again. "Hi  世界!" -> ["Hi", " ", " 世界", "!"] with QWEN2_PATTERN.
    """
    pieces = [text] if text else []
    for pattern in patterns:
        pieces = [p for piece in pieces for p in _split_isolated(piece, pattern)]
    return pieces


def _split_isolated(text, pattern):
    if not pattern.groups:  # findall returns whole matches only without capture groups
        found = pattern.findall(text)
        if sum(map(len, found)) == len(text):  # fast path: the matches cover the text
            return found
    out, pos = [], 0
    for m in pattern.finditer(text):
        out += [text[pos:m.start()]] if m.start() > pos else []
        out += [m.group()] if m.end() > m.start() else []
        pos = m.end()
    return out + ([text[pos:]] if pos < len(text) else [])


# -----------------------------------------------------------------------------
# Training


def find_pair(ids, pair):
    """Starts of the occurrences of pair, left to right, not overlapping: [1, 1, 1, 2], (1, 1) -> [0]."""
    starts, i, last = [], 0, len(ids) - 1
    while True:
        try:
            i = ids.index(pair[0], i, last)  # list.index scans in C; stop before the end so i + 1 exists
        except ValueError:
            return starts
        if ids[i + 1] == pair[1]:
            starts.append(i)
            i += 2
        else:
            i += 1


def merge_at(ids, starts, new_id):
    """Replace the pairs starting at starts by new_id: [5, 1, 2, 1, 2], [1, 3], 9 -> [5, 9, 9]."""
    out, prev = [], 0
    for i in starts:
        out += ids[prev:i]
        out.append(new_id)
        prev = i + 2
    return out + ids[prev:]


def merge_pair(ids, pair, new_id):
    """[1, 1, 1], (1, 1), 9 -> [9, 1]: GPT-2 merges each occurrence, left to right."""
    return merge_at(ids, find_pair(ids, pair), new_id)


def train_merges(words, counts, vocab_target, incremental=True):
    """Learn merges over unique pre-token words until the vocab has vocab_target tokens.

    words: byte-id lists, one per unique pre-token; counts: how often each occurs. Returns (tokens,
    merges): tokens[id] is the bytes of token id (0..255 are the bytes themselves), merges[r] = (a, b)
    is the r-th merge. Each step merges the most frequent adjacent pair; ties go to the smallest
    (a, b), so the result does not depend on dict order. incremental=False recounts every pair of
    every word at each step (minbpe): the slow reference the fast path is tested against.
    """
    words = [list(w) for w in words]
    tokens = [bytes([b]) for b in range(256)]
    token_ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    pair_counts, where = _count_pairs(words, counts)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(tokens) < vocab_target:
        if incremental:
            pair = _pop_best(heap, pair_counts)
        else:
            pair_counts = _count_pairs(words, counts)[0]
            pair = min(pair_counts, key=lambda p: (-pair_counts[p], p), default=None)
        if pair is None:
            break  # every word is a single token: nothing left to merge
        new = tokens[pair[0]] + tokens[pair[1]]
        if new not in token_ids:  # two merge paths can spell the same bytes: reuse the id
            token_ids[new] = len(tokens)
            tokens.append(new)
        merges.append(pair)
        if incremental:
            _apply_merge(words, counts, pair, token_ids[new], pair_counts, where, heap)
        else:
            words = [merge_pair(word, pair, token_ids[new]) for word in words]
    return tokens, merges


def _count_pairs(words, counts):
    """pair -> total count over the corpus, pair -> indices of the words containing it."""
    pair_counts, where = defaultdict(int), defaultdict(set)
    for i, (word, n) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += n
            where[pair].add(i)
    return pair_counts, where


def _pop_best(heap, pair_counts):
    # The heap holds (-count, pair) entries that may be stale. Counts of old pairs only fall, and a pair
    # whose count rises gets a fresh entry, so one whose count is current is the maximum; a stale one is re-queued.
    while heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count == -neg and count > 0:
            return pair
        if count > 0:
            heapq.heappush(heap, (-count, pair))
    return None


def _apply_merge(words, counts, pair, new_id, pair_counts, where, heap):
    """Merge pair in the words that contain it; update only the pairs around each merge.

    In [x, a, b, y], merging (a, b) -> n removes pairs (x, a), (a, b), (b, y) and
    adds (x, n), (n, y); the rest of the word and every other word are untouched."""
    risen = set()
    for w in where.pop(pair, ()):
        word, count = words[w], counts[w]
        starts = find_pair(word, pair)
        if not starts:
            continue  # stale index: the pair was consumed here by an earlier merge
        merged = merge_at(word, starts, new_id)
        # Old pair positions next to or on a merge (a set: [a, b, a, b] shares (b, a)).
        for j in {j for i in starts for j in (i - 1, i, i + 1) if 0 <= j < len(word) - 1}:
            pair_counts[word[j], word[j + 1]] -= count
        # The t-th merge lands at merged index starts[t] - t; its new pairs are either side.
        for k in {k for t, i in enumerate(starts) for k in (i - t - 1, i - t) if 0 <= k < len(merged) - 1}:
            p = (merged[k], merged[k + 1])
            pair_counts[p] += count
            where[p].add(w)
            risen.add(p)
        words[w] = merged
    del pair_counts[pair]
    for p in sorted(risen):
        heapq.heappush(heap, (-pair_counts[p], p))


def train(texts, vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern=QWEN2_PATTERN,
          default_system=None, incremental=True):
    """Train a byte-level BPE tokenizer on an iterable of strings.

    Ids: 0..255 are the bytes, then one id per merge, then the special tokens,
    so vocab_size counts all three. Stops early if the corpus runs out of pairs.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not one string: wrap it in a list")
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) < len(special_tokens) or not all(s and isinstance(s, str) for s in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens}")
    need = 256 + len(special_tokens)
    if vocab_size < need:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                         f"+ {len(special_tokens)} special tokens = {need}; pass at least {need}")
    split = regex.compile(pattern)
    word_counts = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"texts must contain strings, got {type(text).__name__}")
        word_counts.update(pretokenize(text, [split]))
    words = [w.encode("utf-8") for w in word_counts]
    n_bpe = vocab_size - len(special_tokens)
    tokens, merges = train_merges(words, list(word_counts.values()), n_bpe, incremental)
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [(len(tokens) + k, s, True) for k, s in enumerate(special_tokens)]
    return Tokenizer(vocab, [(tokens[a], tokens[b]) for a, b in merges], added, [pattern],
                     chat=ChatTemplate(default_system=default_system))


# -----------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Encode text to ids and back. Build one with train() or load(), not by hand.

    vocab: bytes -> id for the BPE tokens; merges: ordered (bytes, bytes) pairs;
    added: (id, content, special) for tokens matched verbatim in text, like
    "<|im_end|>"; patterns: pre-tokenizer regexes applied in turn; chat: a chat.ChatTemplate.
    """

    def __init__(self, vocab, merges, added, patterns, normalizer=None, ignore_merges=False,
                 chat=None, unk=None):
        self._tokens = _token_table(vocab, added)  # id -> bytes
        self._added = {content: i for i, content, _ in added}
        self._special = {content for _, content, special in added if special}
        self._special_ids = {self._added[s] for s in self._special}
        self._model_ids = set(vocab.values()) - set(self._added.values())
        # Real vocabularies may lack bytes their training text never had (control
        # characters, 0xC0, 0xF5..0xFF). `tokenizers` drops such bytes when encoding, or
        # emits the unk token, and merges the symbols either side; so do we (_bpe).
        self._byte_ids = [vocab.get(bytes([b])) for b in range(256)]  # None: not in the vocab
        self.unk, self._unk_id = unk, None  # unk: (token bytes, fuse) or None
        if unk is not None:
            if unk[0] not in vocab:
                raise ValueError(f"the unk token {token_to_str(unk[0])!r} is not in the vocab: the file is corrupt")
            self._unk_id = vocab[unk[0]]
        # (id, id) in rank order; (id, id) -> rank (lower merges first); (id, id) -> merged id
        self._merges, self._ranks, self._merged = _merge_tables(vocab, merges)
        self.patterns = list(patterns)
        self._compiled = [regex.compile(p) for p in self.patterns]
        self.normalizer = normalizer
        self.ignore_merges = ignore_merges
        self._vocab = vocab  # only read when ignore_merges is set
        self._cache = {}
        by_length = sorted(self._added, key=len, reverse=True)  # longest first, as `tokenizers` matches
        self._added_re = _alternation(by_length)  # allow_special=True: all added tokens
        self._plain_re = _alternation([t for t in by_length if t not in self._special])  # non-special only
        self.special_re = _alternation([t for t in by_length if t in self._special])  # chat.py reads it
        self._fingerprint = None
        self.chat = chat or ChatTemplate()  # its special_tokens_map also names eos and pad

    # --- properties the other modules use

    vocab_size = property(lambda self: len(self._tokens))

    def token_id(self, token):
        """Id of an added token such as "<|im_end|>"; None if the vocab has no such token."""
        return self._added.get(token)

    eos_id = property(lambda self: self.token_id(self.chat.special_tokens_map.get("eos_token", ENDOFTEXT)),
                      doc="ends a document: tokenizer_config.json's eos_token, ours <|endoftext|>")
    pad_id = property(lambda self: self.token_id(self.chat.special_tokens_map.get("pad_token")) or self.eos_id,
                      doc="pad_token if the config names one, else eos")
    im_start_id = property(lambda self: self.token_id(IM_START))
    im_end_id = property(lambda self: self.token_id(IM_END), doc="ends a chat turn")
    special_ids = property(lambda self: set(self._special_ids))

    def is_special(self, token_id):
        """True for a special token (<|im_end|>, ...): text a user cannot type into a prompt."""
        return self._check_id(token_id) in self._special_ids

    stop_ids = property(lambda self: {i for i in (self.eos_id, self.im_end_id) if i is not None},
                        doc="ids that end generation: end of document or end of turn")

    @property
    def fingerprint(self):
        """sha256 of the canonical tokenizer.json; it changes with anything that changes ids.
        Data files store it, so tokens made by one tokenizer are never read with another."""
        if self._fingerprint is None:
            canonical = json.dumps(self.to_hf_json(), sort_keys=True, ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    # --- encode / decode

    def encode(self, text, allow_special=False, plain_spans=()):
        """Text -> ids. Special tokens in the text are plain text unless allow_special, and even then
        where they overlap a (start, end) of plain_spans (chat.py: the contents of a rendered chat).
        Untrusted text (a user message containing "<|im_end|>") must not be able to close its turn
        early, so matching special tokens is opt-in. Non-special added tokens are always matched, as
        `tokenizers` does."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        added_re = self._added_re if allow_special else self._plain_re
        if added_re is None:
            return self._encode_ordinary(text)
        ids, pos = [], 0
        for m in added_re.finditer(text):
            if m.group() in self._special and any(a < m.end() and m.start() < b for a, b in plain_spans):
                continue  # stays text: a user cannot close their turn by typing <|im_end|>
            ids += self._encode_ordinary(text[pos:m.start()]) + [self._added[m.group()]]
            pos = m.end()
        return ids + self._encode_ordinary(text[pos:])

    def _encode_ordinary(self, text):
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        ids = []
        for piece in pretokenize(text, self._compiled):
            piece_ids = self._cache.get(piece)
            if piece_ids is None:
                piece_ids = self._bpe(piece.encode("utf-8"))
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()  # crude, but keeps memory bounded on endless streams
                self._cache[piece] = piece_ids
            ids += piece_ids
        return ids

    def _bpe(self, piece):
        """Bytes of one pre-token -> ids: apply the earliest-learned merge until none applies."""
        if self.ignore_merges and piece in self._vocab:  # Llama-3: whole-word vocab hit wins
            return [self._vocab[piece]]
        ids = [self._byte_ids[b] for b in piece]
        if None in ids:  # bytes the vocab lacks: dropped, or the unk token (one per run if fused)
            ids = self._replace_missing(ids)
        rank = self._ranks.get
        ranks = list(map(rank, zip(ids, ids[1:]), repeat(INF)))  # ranks[j]: rank of (ids[j], ids[j + 1])
        while ranks:
            best = min(ranks)  # min/index/count run in C; the Python work per merge is O(1)
            if best == INF:
                break
            i = ranks.index(best)
            new_id = self._merged[ids[i], ids[i + 1]]
            if ranks.count(best) > 1:  # the pair occurs again: merge all, left to right, and re-rank
                ids = merge_pair(ids, (ids[i], ids[i + 1]), new_id)
                ranks = list(map(rank, zip(ids, ids[1:]), repeat(INF)))
                continue
            ids[i:i + 2] = [new_id]  # only the pairs either side of the new token change
            lo = max(i - 1, 0)
            ranks[lo:i + 2] = [rank((ids[j], ids[j + 1]), INF) for j in range(lo, min(i + 1, len(ids) - 1))]
        return ids

    def _replace_missing(self, ids):
        """[5, None, None, 7] -> [5, 7] without an unk token; [5, unk, unk, 7] with one,
        [5, unk, 7] if it is fused (as the BPE model of `tokenizers` does)."""
        out = []
        for k, i in enumerate(ids):
            if i is not None:
                out.append(i)
            elif self._unk_id is not None and not (self.unk[1] and k and ids[k - 1] is None):
                out.append(self._unk_id)
        return out

    def _check_id(self, token_id):
        """-> a plain int; accepts Python, NumPy and 0-d torch integers."""
        try:
            i = operator.index(token_id)
        except TypeError:
            raise ValueError(f"token ids must be integers, got {token_id!r}") from None
        if not 0 <= i < len(self._tokens):
            raise ValueError(f"token id {i} is out of range for a vocabulary of {len(self._tokens)}: "
                             "were these ids made by another tokenizer?")
        return i

    def token_bytes(self, token_id):
        return self._tokens[self._check_id(token_id)]

    def decode(self, ids, skip_special=False):
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = [self._check_id(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(self._tokens[i] for i in ids).decode("utf-8", errors="replace")

    # --- chat: chat.py lays out a conversation (self.chat), this vocabulary encodes it

    chat_template = property(lambda self: self.chat.source, doc="the model's own Jinja template; None: our ChatML")

    def set_chat_template(self, source, special_tokens_map=None):
        """A model's Jinja template (None: our ChatML) and the {"bos_token": ...} names it may use."""
        self.chat = ChatTemplate(source, special_tokens_map, self.chat.default_system)

    def render_chat(self, messages, add_generation_prompt=False, tools=None):  # -> the prompt text
        return self.chat.render(messages, add_generation_prompt, tools)

    def encode_chat(self, messages, add_generation_prompt=True, tools=None):  # -> prompt ids
        return self.chat.encode(self, messages, add_generation_prompt, tools)

    def apply_chat_template(self, messages, add_generation_prompt=False):  # -> (ids, SFT assistant mask)
        return self.chat.encode_with_mask(self, messages, add_generation_prompt)

    def chat_template_jinja(self):  # our ChatML as Jinja, with this tokenizer's default system message
        return chatml_jinja(self.chat.default_system)

    # --- save

    def to_hf_json(self):
        """The `tokenizers` tokenizer.json as a dict (model BPE, byte-level pre-tokenizer)."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        splits = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                  for p in self.patterns]
        added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": c in self._special}
                 for c, i in sorted(self._added.items(), key=lambda item: item[1])]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": self.normalizer} if self.normalizer else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits + [byte_level]},
            "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": self.unk and token_to_str(self.unk[0]),
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": bool(self.unk and self.unk[1]), "byte_fallback": False,
                      "ignore_merges": self.ignore_merges,
                      "vocab": {token_to_str(self._tokens[i]): i for i in sorted(self._model_ids)},
                      "merges": [[token_to_str(self._tokens[a]), token_to_str(self._tokens[b])]
                                 for a, b in self._merges]},
        }

    def save(self, directory):
        """Write tokenizer.json and tokenizer_config.json (for transformers.AutoTokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        eos = ENDOFTEXT if self.token_id(ENDOFTEXT) is not None else None
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat.source or self.chat_template_jinja(),
            "bos_token": None, "eos_token": eos, "pad_token": eos, "unk_token": None,
            **self.chat.special_tokens_map,  # a model's own, kept when we fine-tune it
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "split_special_tokens": False,
            "model_max_length": 1 << 30,  # the model's config.json holds the real context length
            "default_system_message": self.chat.default_system,  # ours: lets load() rebuild ChatML
            "fingerprint": self.fingerprint,
        }
        for name, content in [("tokenizer.json", self.to_hf_json()), ("tokenizer_config.json", config)]:
            (directory / name).write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")


def _token_table(vocab, added):
    """id -> bytes of every token (BPE tokens, then added ones as UTF-8). Ids must be non-negative
    integers running 0..N-1 without gaps, as in any tokenizer.json `tokenizers` writes."""
    ids = [*vocab.values(), *(i for i, _, _ in added)]
    bad = [i for i in ids if not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"token ids must be non-negative integers, got {bad[:3]}: the file is corrupt")
    tokens = [None] * (1 + max(ids))
    for token, i in vocab.items():
        tokens[i] = token
    for i, content, _ in added:
        tokens[i] = content.encode("utf-8")
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ValueError(f"token ids must run 0..{len(tokens) - 1} without gaps; {len(holes)} ids are "
                         f"missing, first {holes[0]}")
    return tokens


def _merge_tables(vocab, merges):
    """merges [(bytes, bytes)] in rank order -> ([(id, id)], {(id, id): rank}, {(id, id): merged id}).
    Each merge must join two vocab tokens into a third; a repeated merge keeps its last rank, as in
    `tokenizers`."""
    order, ranks, merged = [], {}, {}
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError(f"merge {token_to_str(a)!r} + {token_to_str(b)!r} uses or makes a token "
                             "that is not in the vocab: the file is corrupt")
        pair = (vocab[a], vocab[b])
        ranks[pair], merged[pair] = len(order), vocab[a + b]
        order.append(pair)
    return order, ranks, merged


def _alternation(strings):
    return regex.compile("|".join(map(regex.escape, strings))) if strings else None


# -----------------------------------------------------------------------------
# Streaming decode


class StreamDecoder:
    """Feed ids one at a time; get back only whole UTF-8 characters.

    A Chinese character is 3 bytes and may be spread over 2-3 byte tokens; decoding each token alone
    would print U+FFFD. An incremental UTF-8 decoder holds an incomplete trailing sequence until its
    last byte arrives; bytes that can never become valid UTF-8 still come out as U+FFFD at once.

        stream = StreamDecoder(tok)
        text = "".join(stream.feed(i) for i in ids) + stream.flush()
    """

    def __init__(self, tokenizer, skip_special=False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id):
        """One id -> the characters it completes (often "", or several at once)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self):
        """The remainder at the end of the stream; an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


# -----------------------------------------------------------------------------
# Loading tokenizer.json files written by us or by `tokenizers`


def load(path):
    """Load a tokenizer from a model directory (tokenizer.json inside) or a tokenizer.json path, with
    the chat template and special-token names of tokenizer_config.json / chat_template.jinja beside it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no tokenizer.json at {path}: pass a model directory (of a run directory, the step_* "
                         "its `latest` names), a directory written by Tokenizer.save, or a tokenizer.json file")
    config_file = file.parent / "tokenizer_config.json"
    spec = _read_json(file)
    config = _read_json(config_file) if config_file.is_file() else {}
    try:
        tok = from_hf_json(spec, source=str(file))
        tok.chat = ChatTemplate.from_config(file.parent, config)
    except (KeyError, TypeError, AttributeError, IndexError, regex.error) as e:  # missing or mistyped field
        raise ValueError(f"{file} is malformed ({type(e).__name__}: {e}); re-save it with "
                         "Tokenizer.save or tokenizers") from None
    return tok


def _read_json(file):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): re-save it with Tokenizer.save") from None


def from_hf_json(spec, source="tokenizer.json"):
    """Build a Tokenizer from a parsed `tokenizers` tokenizer.json (byte-level BPE only)."""
    def fail(what):
        raise ValueError(f"{source}: {what}; only byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 style) "
                         "are supported, not SentencePiece / Metaspace ones (Llama-2, Mistral-7B-v0.1)")

    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        fail("no 'model' object")
    if spec.get("version", "1.0") != "1.0":
        fail(f"unknown tokenizer.json version {spec.get('version')!r} (expected '1.0')")
    model = spec["model"]
    if model.get("type", "BPE") != "BPE":
        fail(f"model type is {model.get('type')!r}, not BPE")
    if any(model.get(k) for k in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")):
        fail("the model uses byte_fallback or subword prefixes/suffixes (SentencePiece/WordPiece style)")
    if model.get("dropout"):
        fail("BPE dropout is not supported")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        fail("model.vocab must be an object and model.merges a list")
    decoder = (spec.get("decoder") or {}).get("type", "ByteLevel")
    if decoder != "ByteLevel":
        fail(f"decoder is {decoder!r}, not ByteLevel")
    normalizer = _parse_normalizer(spec.get("normalizer"), fail)
    patterns = _parse_pre_tokenizer(spec.get("pre_tokenizer"), fail)
    vocab = {str_to_token(s): i for s, i in model["vocab"].items()}
    merges = [_parse_merge(m, fail) for m in model["merges"]]
    added = [(t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or []]
    ignore_merges = bool(model.get("ignore_merges"))
    unk = (str_to_token(model["unk_token"]), bool(model.get("fuse_unk"))) if model.get("unk_token") else None
    return Tokenizer(vocab, merges, added, patterns, normalizer, ignore_merges, unk=unk)


def _parse_normalizer(spec, fail):
    if spec is None:
        return None
    if spec.get("type") in ("NFC", "NFKC", "NFD", "NFKD"):
        return spec["type"]
    fail(f"normalizer {spec.get('type')!r} is not supported (only none or Unicode NF*)")


def _parse_pre_tokenizer(spec, fail):
    """-> regex patterns. ByteLevel must come last; with use_regex it adds GPT-2's split."""
    steps = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    if not steps or not steps[-1] or steps[-1].get("type") != "ByteLevel":
        fail("the pre-tokenizer does not end in ByteLevel")
    patterns = []
    for step in steps[:-1]:
        if step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert"):
            fail(f"pre-tokenizer step {step} is not a Split(behavior='Isolated', invert=false)")
        pattern = step.get("pattern", {})
        patterns.append(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern.get("String", "")))
    if steps[-1].get("add_prefix_space"):
        fail("ByteLevel(add_prefix_space=true) is not supported")
    if steps[-1].get("use_regex", True):
        patterns.append(GPT2_PATTERN)
    return patterns


def _parse_merge(merge, fail):
    # tokenizers < 0.20 writes "a b"; newer versions write ["a", "b"].
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        fail(f"merge {merge!r} is neither 'a b' nor ['a', 'b']")
    return str_to_token(parts[0]), str_to_token(parts[1])


# -----------------------------------------------------------------------------
# CLI

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}  # what Tokenizer.save writes


def load_arg(path, flag="--tokenizer"):
    """load() for a command-line flag: a run directory means its latest checkpoint, and a path that
    is not a tokenizer is a UsageError naming the flag."""
    try:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            import checkpoint  # it imports torch: only for a run directory (or none), to name the error
            path = checkpoint.resolve(path)
        return load(path)
    except (OSError, ValueError, ImportError) as e:
        raise cli.UsageError(f"{flag}: {e}") from None


def _read_texts(files):
    """Each line of a .txt file is a text; .jsonl lines are objects with a "text" field. A bad line is
    a UsageError naming the file and line; so is a corpus without any text (not a tokenizer of bytes alone)."""
    found = False
    for name in files:
        try:
            for lineno, line in cli.read_lines(name):
                if name.endswith(".jsonl") and line.strip():
                    yield _jsonl_text(line, lineno)
                elif not name.endswith(".jsonl"):
                    yield line
                found = found or bool(line.strip())
        except ValueError as e:
            raise cli.UsageError(f"{name}: {e}") from None
    if not found:
        raise cli.UsageError(f"--input {' '.join(files)}: no text (empty, or blank lines only): "
                         "give it the text to train on")


def _jsonl_text(line, lineno):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'line {lineno}: no "text" field (a string): write each line as {{"text": "..."}}')
    return record["text"]


def _check_train_args(args):
    """Every flag of `train`, before the corpus is read."""
    for name in args.input:
        if not os.path.isfile(name):
            raise cli.UsageError(f"--input {name}: no such file: pass .txt or .jsonl files")
    need = 256 + len(DEFAULT_SPECIAL_TOKENS)
    if args.vocab_size < need:
        raise cli.UsageError(f"--vocab-size {args.vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                             f"+ {len(DEFAULT_SPECIAL_TOKENS)} special tokens: pass at least {need}")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise cli.UsageError(f"--out {out} is a file: pass a directory for tokenizer.json and tokenizer_config.json")
    # --out is replaced whole, so it may hold nothing but a tokenizer; and replacing one needs --force,
    # because data prepared with the old tokenizer will not open with the new one (fingerprints differ).
    names = set(os.listdir(out)) if os.path.isdir(out) else set()
    if names - TOKENIZER_FILES:
        raise cli.UsageError(f"--out {out} holds files that are not a tokenizer's "
                             f"({', '.join(sorted(names - TOKENIZER_FILES)[:3])}): choose a new or empty directory")
    if names and not args.force:
        raise cli.UsageError(f"--out {out} holds a tokenizer already, and data prepared with it would not open "
                             "with a new one: pass --force to replace it, or choose another --out")
    cli.check_writable(out)


def _save(tok, out):
    """Save into out.partial<PID> beside out, then swap it in (replace_dir): out holds the old tokenizer
    or the new one, never the tokenizer.json of one beside the tokenizer_config.json of the other."""
    tmp = f"{os.path.realpath(out)}.partial{os.getpid()}"
    try:
        tok.save(tmp)
        cli.replace_dir(tmp, out)
    except OSError as e:
        if e.filename is None:  # a full disk fails in write(), whose error names no file
            raise OSError(e.errno, f"{e.strerror} while saving the tokenizer", out) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a tokenizer on text or JSONL files")
    p.add_argument("--input", nargs="+", required=True, help=".txt (one text per line) or .jsonl with 'text'")
    p.add_argument("--vocab-size", type=int, default=4096, help="bytes + merges + special tokens")
    p.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    p.add_argument("--force", action="store_true", help="replace the tokenizer in --out (data prepared with "
                   "it will no longer open)")
    p.add_argument("--default-system", default=None, help="system message used when a chat has none")
    p = sub.add_parser("encode", help="print the ids and pieces of a text (special tokens as text)")
    p.add_argument("--tokenizer", required=True, help="model or run directory, or tokenizer.json")
    p.add_argument("text")
    args = parser.parse_args()
    if args.command == "train":
        cli.clean_leftovers(args.out)  # first: it may put back an old tokenizer, which then needs --force
        _check_train_args(args)
        tok = train(_read_texts(args.input), args.vocab_size, default_system=args.default_system)
        _save(tok, args.out)
        print(f"vocab {tok.vocab_size} | fingerprint {tok.fingerprint[:16]} | saved to {args.out}")
    else:
        tok = load_arg(args.tokenizer)
        ids = tok.encode(args.text)
        pieces = []
        for i in ids:
            raw = tok.token_bytes(i)
            try:
                pieces.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                pieces.append(raw)  # part of a character: show its bytes
        print(f"{len(ids)} tokens: {ids}\n{pieces}")


if __name__ == "__main__":
    cli.run(main)
