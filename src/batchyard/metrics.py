"""Prometheus metrics of every batchyard process: the metric objects and the helpers that update them, in one place.

Names and labels follow Prometheus' own guidelines (units in the name, `_total` counters, bounded label sets: an
upstream's configured name, a route template, a status code, an error code of a fixed list, never a batch id, a file
id, a custom_id or a key). docs/operations.md lists every metric with its meaning and example PromQL.

Across processes. `batchyard serve` runs its worker(s) as child processes; before it starts them, the parent makes a
private directory for prometheus-client's multiprocess mode (`shared_across_processes`: PROMETHEUS_MULTIPROC_DIR,
inherited by every child), so each process writes its values to memory-mapped files there and a scrape of the API
(`exposition`) adds them up. Gauges say how: in flight and the concurrency limit are summed over the live
processes (each holds its share), an upstream's health is the minimum. A child that exits is marked dead
(`process_ended`): its gauges vanish, its counters stay. A single process (`serve --worker-in-process` or
`--no-worker`, `batchyard worker` with one process) keeps its values in memory.

The metric objects are built on first use, not at import: the multiprocess directory must be set before a value
exists, whatever imported this module first.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import prometheus_client
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchyard.domain.models import Usage
from batchyard.domain.states import BatchStatus
from batchyard.store.base import BatchStats

log = logging.getLogger("batchyard.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads

# An upstream call lasts from a few milliseconds (an embedding on a GPU next door) to minutes (a long generation).
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ONLINE_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The error codes batchyard writes into error lines; `http_<status>` for an upstream's HTTP error answer. Any other
# code (none is expected) is counted as "other", so the label set stays bounded.
LINE_ERROR_CODES = frozenset(
    {
        "batch_cancelled",
        "batch_expired",
        "internal_error",
        "invalid_request",
        "invalid_upstream_response",
        "model_not_found",
        "shard_quarantined",
        "upstream_connect",
        "request_timeout",
        "upstream_too_large",
    }
)
OUTCOME_OF_CODE = {"batch_expired": "expired", "batch_cancelled": "cancelled"}  # any other code: failed
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The code of an error line, read from its bytes. A custom_id is a JSON string whose quotes are escaped, so neither
# pattern can match inside one: the match is the line's own `response`/`error` member.
_LINE_CODE = re.compile(
    rb'"response":(?:null,"error":\{"code":"([A-Za-z0-9_]{1,64})"|\{"status_code":(\d{3}))'
)


class _Metrics:
    """Every metric object (one set per process, built by `_metrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.lines = Counter(
            "batchyard_lines",
            "Request lines answered (committed), by batch endpoint and outcome: completed, failed (an error "
            "line of any other code), expired, cancelled.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.line_errors = Counter(
            "batchyard_line_errors",
            "Error lines (committed) by code: batchyard's codes, http_<status> for an upstream's error answer.",
            ["code"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "batchyard_upstream_requests",
            "Requests sent to an upstream, by upstream and HTTP status (or timeout, connect, error).",
            ["upstream", "status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "batchyard_upstream_request_duration_seconds",
            "Duration of one upstream request (one attempt), answer body included.",
            ["upstream"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "batchyard_upstream_in_flight",
            "Requests in flight to an upstream (summed over processes).",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.concurrency_limit = Gauge(
            "batchyard_upstream_concurrency_limit",
            "Current concurrency limit of an upstream (fixed or adaptive; the largest of the processes': the "
            "processes of a machine share one limit, docs/priority.md).",
            ["upstream"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.healthy = Gauge(
            "batchyard_upstream_healthy",
            "1 when the upstream takes requests, 0 while it is ejected after failures (minimum over processes).",
            ["upstream"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.retries = Counter(
            "batchyard_retries",
            "Upstream attempts retried, by reason: 429, 5xx, 408, 409, timeout, connect.",
            ["reason"],
            registry=r,
        )
        self.tokens = Counter(
            "batchyard_tokens",
            "Tokens of committed lines, by kind: input, cached, output, reasoning.",
            ["kind"],
            registry=r,
        )
        self.shard_claims = Counter("batchyard_shard_claims", "Shards claimed by a worker.", registry=r)
        self.leases_lost = Counter(
            "batchyard_shard_leases_lost",
            "Shard attempts that lost their lease (taken over, or fenced off at commit).",
            registry=r,
        )
        self.quarantined = Counter(
            "batchyard_shards_quarantined",
            "Shards quarantined after failing repeatedly (their lines end as error lines).",
            registry=r,
        )
        self.validation_bytes = Counter(
            "batchyard_validation_bytes", "Bytes of input files read by validation.", registry=r
        )
        self.validations = Counter(
            "batchyard_validations",
            "Batches validated, by result: planned, failed.",
            ["result"],
            registry=r,
        )
        self.webhooks = Counter(
            "batchyard_webhook_deliveries",
            "Webhook events settled, by outcome: delivered, retried (will be tried again), failed (given up).",
            ["outcome"],
            registry=r,
        )
        self.http_requests = Counter(
            "batchyard_http_requests",
            "API requests, by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "batchyard_http_request_duration_seconds",
            "Duration of an API request (response body included), by route template.",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.online_requests = Counter(
            "batchyard_online_requests",
            "Online requests (the front door), by endpoint and status: the upstream's HTTP status, or "
            "batchyard's own answer (401, 400, 404, 413, 429, 502, 504; 499: the client left first).",
            ["endpoint", "status"],
            registry=r,
        )
        self.online_duration = Histogram(
            "batchyard_online_request_duration_seconds",
            "Duration of an online request, to its answer's last byte (a stream's end), by endpoint.",
            ["endpoint"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.online_first_byte = Histogram(
            "batchyard_online_first_byte_seconds",
            "Time from an online request's arrival to the first byte of its answer's body passed on (a stream's "
            "first event), by endpoint.",
            ["endpoint"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )


_built: _Metrics | None = None
_build_lock = threading.Lock()


def _metrics() -> _Metrics:
    global _built
    if _built is None:
        with _build_lock:
            if _built is None:
                if ENV in os.environ and not getattr(values.ValueClass, "_multiprocess", False):
                    # prometheus-client chose its value class at import, before the directory was set
                    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
                prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # same in both modes
                _built = _Metrics(REGISTRY)
    return _built


def multiprocess_dir() -> str | None:
    return os.environ.get(ENV)


@contextlib.contextmanager
def shared_across_processes() -> Iterator[str]:
    """Make the processes this one starts (they inherit the environment) write their metrics where this one's
    scrape reads them: PROMETHEUS_MULTIPROC_DIR, a private temporary directory removed at the end, or the
    operator's own (its old files are removed first: they belong to processes of an earlier run). Call before the
    children start and before this process counts anything."""
    given = os.environ.get(ENV)
    if _built is not None and given is None:
        log.warning("metrics were counted before the multiprocess directory was set: the scrape misses them")
    if given:
        path, owned = given, False
        for name in os.listdir(path):
            if name.endswith(".db"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))
    else:
        path, owned = tempfile.mkdtemp(prefix="batchyard-metrics-"), True
        os.environ[ENV] = path
    try:
        yield path
    finally:
        if owned:
            os.environ.pop(ENV, None)
            shutil.rmtree(path, ignore_errors=True)


def process_ended(pid: int | None) -> None:
    """A child process exited: its live gauges (in flight, concurrency limit, health) no longer count."""
    path = multiprocess_dir()
    if path is not None and pid is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# -- what a scrape shows -----------------------------------------------------------------------------------------


class _StoreCollector(Collector):
    def __init__(self, stats: BatchStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        batches = GaugeMetricFamily("batchyard_batches", "Batches by status.", labels=["status"])
        for status in BatchStatus:
            batches.add_metric([str(status)], self.stats.by_status.get(status, 0))
        yield batches
        yield GaugeMetricFamily(
            "batchyard_lines_waiting",
            "Lines of unfinished batches not answered yet (the backlog).",
            value=self.stats.lines_waiting,
        )


class _Joined(Collector):
    def __init__(self, *parts: Collector) -> None:
        self.parts = parts

    def collect(self) -> Iterable[Metric]:
        for p in self.parts:
            yield from p.collect()


def _process_collector() -> Collector:
    """This process's metrics, or with a multiprocess directory every process's (read from their files)."""
    _metrics()  # every metric exists before the first count
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    return multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]


def exposition(stats: BatchStats | None = None) -> bytes:
    """The text exposition of a scrape: every process's metrics, and the store's aggregates when given."""
    flush_upstreams()
    parts = [_process_collector()]
    if stats is not None:
        parts.append(_StoreCollector(stats))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Joined(*parts))
    return generate_latest(registry)


@contextlib.contextmanager
def serving(host: str, port: int) -> Iterator[int]:
    """An HTTP endpoint of its own at http://host:port/metrics (a process with no API: `batchyard worker`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Joined(_process_collector()))
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    log.info("metrics at http://%s:%d/metrics", host, server.server_port)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- helpers for the instrumentation points -----------------------------------------------------------------------


def upstream_label(name: str) -> str:
    """An upstream's name as a label: a URL loses its userinfo, query and fragment (a key never shows)."""
    if "://" not in name:
        return name
    try:
        parts = urlsplit(name)
    except ValueError:
        return "invalid"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class UpstreamMeter:
    """The metrics of one upstream in this process, with their label children looked up once.

    Requests are counted in plain Python and written to the metric values at most every FLUSH_SECONDS (and at
    each shard commit, and before a scrape of this process): under `serve` every value lives in a memory-mapped
    file (prometheus-client's multiprocess mode), whose writes (a lock, a pid check, a struct pack each; five a
    request) cost ~4 us of CPU a request, a tenth of the worker's whole cost per line against a fast upstream. A
    scrape sees an upstream's requests, durations and in-flight count at most that late."""

    def __init__(self, name: str) -> None:
        m = _metrics()
        self.label = label = upstream_label(name)
        self._requests = m.upstream_requests
        self._by_status: dict[str, Counter] = {}
        self._duration = m.upstream_duration.labels(label)
        self._in_flight = m.in_flight.labels(label)
        self._limit = m.concurrency_limit.labels(label)
        self._healthy = m.healthy.labels(label)
        self._last_limit: int | None = None
        self._last_healthy: bool | None = None
        # a meter may be used from two event loops' threads (--worker-in-process)
        self._lock = threading.Lock()
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a flush is scheduled
        self._flying = 0  # requests in flight now
        self._flying_written = 0
        self._counts: dict[str, int] = {}  # requests by status since the last flush
        self._observed = [0] * (len(UPSTREAM_BUCKETS) + 1)  # durations since then, by bucket (the last: +Inf)
        self._seconds = 0.0

    def state(self, limit: int, healthy: bool) -> None:
        """The upstream's current concurrency limit and health (written only when they change: this is called
        after every request)."""
        if limit != self._last_limit:
            self._last_limit = limit
            self._limit.set(limit)
        if healthy is not self._last_healthy:
            self._last_healthy = healthy
            self._healthy.set(1 if healthy else 0)

    def sent(self) -> float:
        """A request leaves now; returns its start for `answered`."""
        with self._lock:
            self._flying += 1
        self._dirty()
        return time.perf_counter()

    def answered(self, sent_at: float, status: str | None) -> None:
        """The request ended: `status` is the HTTP status, timeout, connect or error; None when it was cut short
        (a cancelled batch's grace ran out), which counts no request."""
        elapsed = time.perf_counter() - sent_at
        with self._lock:
            self._flying -= 1
            if status is not None:
                self._counts[status] = self._counts.get(status, 0) + 1
                self._observed[bisect.bisect_left(UPSTREAM_BUCKETS, elapsed)] += 1  # as Histogram.observe
                self._seconds += elapsed
        self._dirty()

    def _dirty(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): write now
            self.flush()
            return
        # A flush already waits on this loop. (One scheduled on a loop that has ended since never runs: the next
        # request, on another loop, schedules its own.)
        if self._flush_loop is loop:
            return
        self._flush_loop = loop
        loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write what was counted since the last flush to the metric values."""
        with self._lock:
            self._flush_loop = None
            if self._flying != self._flying_written:
                self._flying_written = self._flying
                self._in_flight.set(self._flying)
            counts, self._counts = self._counts, {}
            for status, n in counts.items():
                child = self._by_status.get(status)
                if child is None:
                    child = self._by_status[status] = self._requests.labels(self.label, status)
                child.inc(n)
            if counts:
                observed, self._observed = self._observed, [0] * len(self._observed)
                # Histogram.observe adds the value to `_sum` and 1 to the bucket it falls in: the same, n at once
                # (tests/unit/test_metrics.py checks it against observe).
                buckets = self._duration._buckets
                for i, n in enumerate(observed):
                    if n:
                        buckets[i].inc(n)
                self._duration._sum.inc(self._seconds)
                self._seconds = 0.0


FLUSH_SECONDS = 0.1  # an upstream's request counts reach the metric values at most this late
_meters: dict[str, UpstreamMeter] = {}


def upstream(name: str) -> UpstreamMeter:
    meter = _meters.get(name)
    if meter is None:
        meter = _meters[name] = UpstreamMeter(name)
    return meter


def flush_upstreams() -> None:
    """Write every upstream meter's pending counts now (a shard commits; a scrape of this process)."""
    for meter in list(_meters.values()):
        meter.flush()


def upstream_error_status(kind: str) -> str:
    """The status label of a request that got no HTTP answer."""
    return kind if kind in ("timeout", "connect") else "error"


def retried(reason: int | str) -> None:
    """One more attempt, because of `reason`: an HTTP status (5xx counted together) or an error kind."""
    if isinstance(reason, int):
        reason = "5xx" if reason >= 500 else str(reason)
    _metrics().retries.labels(reason).inc()


def line_error_code(line: bytes, stopped: str | None = None) -> str:
    """The (bounded) code of an error line: its `error.code`, or `http_<status>` for an upstream's error answer."""
    if stopped is not None:
        return stopped if stopped in LINE_ERROR_CODES else "other"
    m = _LINE_CODE.search(line)
    if m is None:
        return "other"
    if m.group(2) is not None:
        return "http_" + m.group(2).decode()
    code = m.group(1).decode()
    return code if code in LINE_ERROR_CODES else "other"


def lines_committed(endpoint: str, completed: int, errors: Mapping[str, int], usage: Usage) -> None:
    """A shard attempt committed: count its lines (by outcome and error code) and its tokens once."""
    flush_upstreams()
    m = _metrics()
    if completed:
        m.lines.labels(endpoint, "completed").inc(completed)
    for code, n in errors.items():
        m.lines.labels(endpoint, OUTCOME_OF_CODE.get(code, "failed")).inc(n)
        m.line_errors.labels(code).inc(n)
    for kind, n in (
        ("input", usage.input_tokens),
        ("cached", usage.cached_tokens),
        ("output", usage.output_tokens),
        ("reasoning", usage.reasoning_tokens),
    ):
        if n:
            m.tokens.labels(kind).inc(n)


def shard_claimed() -> None:
    _metrics().shard_claims.inc()


def lease_lost() -> None:
    _metrics().leases_lost.inc()


def shard_quarantined() -> None:
    _metrics().quarantined.inc()


def validation_read(n: int) -> None:
    _metrics().validation_bytes.inc(n)


def validation_done(result: str) -> None:
    """`result`: planned or failed."""
    _metrics().validations.labels(result).inc()


def webhook_settled(outcome: str) -> None:
    """`outcome`: delivered, retried or failed."""
    _metrics().webhooks.labels(outcome).inc()


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    m = _metrics()
    m.http_requests.labels(method if method in HTTP_METHODS else "other", route, str(status)).inc()
    m.http_duration.labels(route).observe(seconds)


def online_request(endpoint: str, status: int, seconds: float) -> None:
    """An online request ended: its answer's status and how long it took, to the last byte."""
    m = _metrics()
    label = endpoint if endpoint in ONLINE_ENDPOINTS else "other"
    m.online_requests.labels(label, str(status)).inc()
    m.online_duration.labels(label).observe(seconds)


def online_first_byte(endpoint: str, seconds: float) -> None:
    label = endpoint if endpoint in ONLINE_ENDPOINTS else "other"
    _metrics().online_first_byte.labels(label).observe(seconds)
