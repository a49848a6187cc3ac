"""Serving metrics in the Prometheus text format (exposition format 0.0.4), written by hand.

The engine keeps counters and two histograms (time to first token, time between a sequence's
tokens); the server counts requests by route and status. `exposition` renders them as one
text page for GET /metrics, in the families Prometheus scrapes:

    # HELP astrai_generation_tokens_total Tokens generated.
    # TYPE astrai_generation_tokens_total counter
    astrai_generation_tokens_total 1234
"""

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Histogram:
    """Cumulative counts of observations at or under each bucket's upper bound, their sum and count."""

    def __init__(self, buckets):
        self.buckets, self.counts = tuple(buckets), [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, x):
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1

    def lines(self, name):
        """The histogram's _bucket (cumulative, le="+Inf" last), _sum and _count samples."""
        out, total = [], 0
        for bound, n in zip([*map(repr, map(float, self.buckets)), "+Inf"], self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class RequestCounter:
    """Requests answered, by route and HTTP status; any thread may add."""

    def __init__(self):
        self.counts, self._lock = {}, threading.Lock()

    def add(self, route, status):
        with self._lock:
            self.counts[route, status] = self.counts.get((route, status), 0) + 1

    def lines(self, name):
        with self._lock:
            items = sorted(self.counts.items())
        return [f'{name}{{route="{route}",status="{status}"}} {n}' for (route, status), n in items]


# (stats key, metric name, type, help); every value comes from engine.stats()
FAMILIES = [
    ("prompt_tokens", "prompt_tokens_total", "counter", "Prompt tokens of submitted requests."),
    ("prefill_tokens", "prefill_tokens_total", "counter", "Prompt tokens computed (not found in the prefix cache)."),
    ("tokens_generated", "generation_tokens_total", "counter", "Tokens generated."),
    ("requests_finished", "engine_requests_finished_total", "counter", "Requests that ran to the end."),
    ("requests_aborted", "engine_requests_aborted_total", "counter", "Requests aborted (client gone, shutdown)."),
    ("requests_failed", "engine_requests_failed_total", "counter", "Requests the engine failed."),
    ("prefix_cache_hits", "prefix_cache_hits_total", "counter", "KV blocks found in the prefix cache."),
    ("preemptions", "preemptions_total", "counter", "Sequences preempted (recomputed later) for lack of blocks."),
    ("running", "requests_running", "gauge", "Sequences in the running batch."),
    ("waiting", "requests_waiting", "gauge", "Sequences waiting to be admitted."),
    ("blocks_used", "kv_blocks_used", "gauge", "KV blocks held by running sequences."),
    ("blocks_cached", "kv_blocks_cached", "gauge", "Full KV blocks kept for prefix reuse."),
    ("blocks_total", "kv_blocks_total", "gauge", "KV blocks in the pool."),
]


def exposition(stats, histograms, requests, prefix="astrai_"):
    """The /metrics page: stats (engine.stats()), histograms {name: (Histogram, help)}, requests (RequestCounter)."""
    out = []

    def family(name, kind, help, samples):
        out.extend([f"# HELP {prefix}{name} {help}", f"# TYPE {prefix}{name} {kind}"] +
                   [prefix + s for s in samples])
    family("http_requests_total", "counter", "HTTP requests answered, by route and status.",
           requests.lines("http_requests_total"))
    for key, name, kind, help in FAMILIES:
        family(name, kind, help, [f"{name} {stats[key]}"])
    for name, (histogram, help) in histograms.items():
        family(name, "histogram", help, histogram.lines(name))
    return "\n".join(out) + "\n"
