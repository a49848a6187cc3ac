"""Scheduling: which sequences run each step, and which KV blocks each one holds.

    scheduler = Scheduler(BlockManager(cache), max_batch_size=8, max_prefill_tokens=512)
    scheduler.add(sequences)              # what submit() handed over through the engine's inbox
    plan = scheduler.schedule()           # Plan(aborted, decode, prefill): the engine runs it
    scheduler.advance(seq, n)             # n more tokens of seq are in the cache
    scheduler.sweep()                     # finished sequences leave the batch

The KV cache is a pool of fixed-size blocks (vLLM's PagedAttention, Kwon et al. 2023). Each Sequence
holds a block table; a full block is named by a hash of (the previous block's name, its token ids),
so sequences whose contexts begin alike share blocks, counting references, and a prompt seen again
(a system prompt, the n choices of a request, a GRPO group) is prefilled once. Each step: drop what
was aborted; admit waiting sequences, oldest first, while the batch has room and blocks remain; give
every decoding sequence whose reader keeps up room for one token, preempting the newest when blocks run out (vLLM's
"recompute" policy); plan prefill chunks of at most max_prefill_tokens padded tokens (chunked prefill,
Sarathi-Serve, Agrawal et al. 2024). Only the engine thread calls into this file: it has no locks.

Left out: swapping preempted blocks to host memory, priorities, freeing blocks outside a window.
"""

import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass


# -----------------------------------------------------------------------------
# A sequence: one choice of one request

class Sequence:
    """One choice of one request as the scheduler tracks it: its tokens, its block table, and how
    many of its tokens the cache holds. `out` is the engine's record of its text (opaque here)."""

    def __init__(self, request, index, out, leader=None):
        p = request.params
        self.request, self.index, self.params, self.out, self.leader = request, index, p, out, leader
        self.prompt, self.max_tokens = request.prompt_ids, request.max_tokens
        self.seed = (p.seed if p.seed is not None else secrets.randbits(63)) + index  # choice i: seed + i
        self.tokens, self.logprobs = [], ([] if p.logprobs else None)
        self.blocks, self.hashes = [], []  # block table; names of its full blocks
        self.cached = 0  # tokens of prompt + tokens whose keys and values are in the cache
        self.last_token_at = None  # perf_counter() when its last token was drawn (the engine's latency histogram)
        self.grammar = None  # constrained decoding: a grammar.Matcher the sampler asks what may come next

    def context(self, start=0, end=None) -> list:
        """Tokens start..end of prompt + generated tokens."""
        n = len(self.prompt)
        end = n + len(self.tokens) if end is None else end
        return (self.prompt[start:end] if start < n else []) + self.tokens[max(start - n, 0):max(end - n, 0)]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    @property
    def target(self) -> int:
        """Tokens to have in the cache before the next decode step: the prompt (the first token is
        sampled at its end), or, after a preemption, everything but the last generated token."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)

    @property
    def decoding(self) -> bool:
        return bool(self.tokens) and self.cached == self.target

    @property
    def ready(self) -> bool:
        """A request's other choices wait until its first has prefilled the prompt, then find the
        prompt's blocks in the prefix cache instead of computing them again."""
        lead = self.leader
        return lead is None or lead.cached >= len(lead.prompt) or lead.request.gone


# -----------------------------------------------------------------------------
# Blocks: allocation, prefix sharing, eviction

class BlockManager:
    """Which KV blocks of a PagedKVCache are free, which sequence holds which, and what the full ones hold.

    Two blocks with the same name hold the same keys and values, so sequences share them. A block
    nobody holds keeps its contents and name, on an LRU list, until its memory is needed. Block 0 of
    the pool is scratch, never handed out: padding positions write there.

        seq A: [ 1 | 2 | 5 ]        blocks 1, 2 hold A's prompt; 5 its own continuation
        seq B: [ 1 | 2 | 7 ]        B has the same first 32 prompt tokens: it shares 1 and 2
    """

    def __init__(self, cache):
        self.cache, self.size = cache, cache.block_size
        self.refs = [0] * cache.num_blocks
        self.name = [None] * cache.num_blocks
        self.by_name = {}
        self.free = deque(range(1, cache.num_blocks))  # empty blocks
        self.cached = OrderedDict()  # unheld blocks that keep their contents, least recently used first
        self.hits = self.saved_tokens = 0  # prefix-cache hits in blocks; prefill tokens not computed

    @property
    def total(self) -> int:
        return len(self.refs) - 1

    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def used(self) -> int:
        return self.total - self.available()

    def match_prefix(self, seq):
        """Give seq the cached blocks that hold the start of its context (up to seq.target tokens)."""
        bs, name = self.size, None
        for i in range(seq.target // bs):
            name = hash((name, tuple(seq.context(i * bs, (i + 1) * bs))))
            block = self.by_name.get(name)
            if block is None:
                break
            self._share(block)
            seq.blocks.append(block)
            seq.hashes.append(name)
        seq.cached = len(seq.blocks) * bs
        self._saved(len(seq.blocks), seq.cached)

    def fork(self, seq, lead):
        """Start another choice from its first choice's prefilled prompt: share the full blocks,
        copy the keys and values of the partial last one, and leave only the prompt's last token
        to compute (its logits draw this choice's first token)."""
        bs, keep = self.size, len(seq.prompt) - 1
        full = keep // bs
        for block in lead.blocks[:full]:
            self._share(block)
        seq.blocks, seq.hashes = lead.blocks[:full], lead.hashes[:full]
        if keep % bs and self.grow(seq, keep):  # a block of our own for the partial tail
            self.cache.copy_slots(lead.blocks[full] * bs, seq.blocks[full] * bs, keep % bs)
        seq.cached = min(keep, len(seq.blocks) * bs)
        self._saved(full, seq.cached)

    def recompute_last(self, seq) -> bool:
        """The whole prompt was found in the cache, but its last token's logits draw the first new
        token: copy the last (shared) block to one of our own and compute that token again (copy on
        write: a shared block is never written). False if no block is free."""
        if not self.available():
            return False
        shared, copy = seq.blocks[-1], self._take()
        self.cache.copy_slots(shared * self.size, copy * self.size, (seq.cached - 1) % self.size + 1)
        seq.blocks[-1] = copy
        self._unshare(shared)
        seq.hashes.pop()
        seq.cached -= 1
        self._saved(0, -1)
        return True

    def grow(self, seq, tokens) -> bool:
        """Blocks for seq's first `tokens` tokens; False, taking none, if there are not enough."""
        need = -(-tokens // self.size) - len(seq.blocks)
        if need > self.available():
            return False
        seq.blocks += [self._take() for _ in range(need)]
        return True

    def commit(self, seq):
        """Name each block of seq that its cached tokens have filled."""
        bs = self.size
        while (len(seq.hashes) + 1) * bs <= seq.cached:
            i = len(seq.hashes)
            name = hash((seq.hashes[-1] if i else None, tuple(seq.context(i * bs, (i + 1) * bs))))
            seq.hashes.append(name)
            block = seq.blocks[i]
            if name not in self.by_name and self.name[block] is None:
                self.by_name[name], self.name[block] = block, name

    def release(self, seq):
        for block in seq.blocks:
            self._unshare(block)
        seq.blocks, seq.hashes = [], []

    def forget(self):
        """Drop every name, so nothing cached is matched again: after the weights change, the keys
        and values cached blocks hold are stale. Unheld cached blocks become free; held ones are
        freed when released."""
        self.free.extend(self.cached)
        self.cached.clear()
        self.by_name.clear()
        self.name = [None] * len(self.name)

    def _saved(self, blocks, tokens):
        self.hits += blocks
        self.saved_tokens += tokens

    def _share(self, block):
        if self.refs[block] == 0:
            del self.cached[block]
        self.refs[block] += 1

    def _unshare(self, block):
        """One holder fewer; an unheld block stays cached if it has a name, else it is free."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.name[block] is None:
                self.free.append(block)
            else:
                self.cached[block] = None

    def _take(self) -> int:
        """A block for new contents: a free one, else the least recently used cached one."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.cached.popitem(last=False)
            del self.by_name[self.name[block]]
            self.name[block] = None
        self.refs[block] = 1
        return block


# -----------------------------------------------------------------------------
# The scheduler

@dataclass
class Plan:
    """One step's work. Rows are (sequence, tokens to compute): the context from seq.cached on."""
    aborted: list  # sequences to end with "abort" (their blocks are already back)
    decode: list  # [(seq, 1)]: every sequence past its prompt (and not backlogged), its last token
    prefill: list  # [(seq, chunk length)], padded size rows * longest chunk <= max_prefill_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.blocks, self.max_batch_size, self.max_prefill_tokens = blocks, max_batch_size, max_prefill_tokens
        self.waiting, self.running = deque(), []
        self.preemptions = 0

    def add(self, seqs):
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        aborted = self._drop_aborted()
        self._admit()
        decode = self._reserve([s for s in self.running if s.decoding and not s.request.backlogged])
        return Plan(aborted, [(s, 1) for s in decode], self._plan_prefill())

    def advance(self, seq, n):
        """n more of seq's tokens now have their keys and values in its blocks."""
        seq.cached += n
        self.blocks.commit(seq)

    def free(self, request):
        """Give back the blocks of every running choice of request."""
        for seq in self.running:
            if seq.request is request:
                self.blocks.release(seq)

    def sweep(self):
        """Sequences that gave their blocks back (finished, aborted, failed) leave the batch."""
        self.running = [s for s in self.running if s.blocks]

    def _drop_aborted(self) -> list:
        dropped = [s for s in self.waiting if s.request.gone]
        if dropped:
            self.waiting = deque(s for s in self.waiting if not s.request.gone)
        dropped += [s for s in self.running if s.request.aborted]
        for seq in dropped:
            self.blocks.release(seq)
        self.sweep()
        return dropped

    def _admit(self):
        """Waiting sequences, oldest first, while there is a place in the batch and blocks for the
        whole prompt (less what the prefix cache already holds) plus the first new token."""
        for seq in [s for s in self.waiting if s.ready]:
            if len(self.running) >= self.max_batch_size:
                break
            lead = seq.leader
            if lead is not None and lead.blocks and lead.cached >= len(seq.prompt) and not seq.tokens:
                self.blocks.fork(seq, lead)
            else:
                self.blocks.match_prefix(seq)
            if seq.cached == len(seq.prompt) and not seq.tokens and not self.blocks.recompute_last(seq):
                self.blocks.release(seq)
                break
            if not self.blocks.grow(seq, seq.target + 1):
                self.blocks.release(seq)
                break
            self.waiting.remove(seq)
            self.running.append(seq)

    def _reserve(self, seqs) -> list:
        """Room for one more token for each sequence, oldest first. When blocks run out, the
        newest running sequence is preempted: its blocks are freed and it goes back to the front
        of the queue, to recompute its prompt and output later."""
        ready = []
        for seq in seqs:
            while seq.blocks and not self.blocks.grow(seq, seq.cached + 1):
                self._preempt(next(s for s in reversed(self.running) if s.blocks))  # the newest admitted
            if seq.blocks:
                ready.append(seq)
        return ready

    def _preempt(self, seq):
        self.blocks.release(seq)
        seq.cached = 0
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _plan_prefill(self) -> list:
        """[(sequence, chunk length)], FIFO, with padded size rows * T <= max_prefill_tokens.

        Rows are right-padded to the longest chunk T. Padding tokens are written past a row's
        real tokens (into its own unused slots or the scratch block) and overwritten before
        anything attends to them."""
        rows, T, budget = [], 0, self.max_prefill_tokens
        for s in self.running:
            todo = s.target - s.cached
            if todo <= 0 or not s.blocks:
                continue
            for c in (min(todo, budget), min(todo, T)):  # as much as fits, else no longer than the others
                if c > 0 and (len(rows) + 1) * max(T, c) <= budget:
                    rows.append((s, c))
                    T = max(T, c)
                    break
        return rows
