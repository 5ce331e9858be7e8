"""Every Prometheus metric the gateway exports, created in this one module.

Label values come only from the configuration (listener, zone, rule names) or from small fixed sets
(actions, directions, error kinds): never a URL, a client address or a transfer id, so the number of
series stays bounded however much traffic crosses.

Several worker processes on one machine can later show one total with prometheus-client's
multiprocess mode: set PROMETHEUS_MULTIPROC_DIR before the first import of prometheus_client and
`exposition_registry` collects every process's files. Each gauge therefore says how its values from
several processes combine (`multiprocess_mode`).
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__
from gateway.trace.witness import cosignature_times

# No `*_created` companion series: they double the series count and no dashboard or alert uses them.
disable_created_metrics()

# The `action` label of gateway_transfers_total. A redacted transfer is counted as "block": the
# sensitive part was stopped at the boundary (gateway_dlp_findings_total{action="redact"} tells it apart).
TRANSFER_ACTIONS = ("allow", "audit", "warn", "block", "deny", "error")
ACTION_OF_DECISION = {"allow": "allow", "audit": "audit", "warn": "warn", "redact": "block", "block": "block",
                      "deny": "deny", "error": "error"}
DIRECTIONS = ("request", "response")  # request: from the client's zone to the upstream's; response: back
RELOAD_RESULTS = ("success", "failure")
UPSTREAM_ERROR_KINDS = ("refused", "timeout", "dns", "unreachable", "tls", "connect", "protocol")

# Seconds. Transfers include the upstream's own time; inspection and trace appends are local work.
TRANSFER_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOCAL_WORK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class GatewayMetrics:
    """The gateway's metrics in their own registry (one instance per process). A worker process of
    several (`worker`: its index) also shows its own open connections, with a `worker` label."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = __version__,
                 worker: int | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.worker = worker
        r = self.registry
        self.transfers = Counter(
            "gateway_transfers", "Transfers through the gateway, by the action taken on them.",
            ["listener", "src_zone", "dst_zone", "action"], registry=r)
        self.transfer_bytes = Counter(
            "gateway_transfer_bytes", "Body bytes that crossed between zones (request: src to dst).",
            ["src_zone", "dst_zone", "direction"], registry=r)
        self.dlp_findings = Counter(
            "gateway_dlp_findings", "DLP rule findings, by rule, data type and the rule's action.",
            ["rule", "type", "action"], registry=r)
        self.transfer_duration = Histogram(
            "gateway_transfer_duration_seconds", "From a transfer's first byte to its decision and answer.",
            ["src_zone", "dst_zone"], buckets=TRANSFER_BUCKETS, registry=r)
        self.inspection_duration = Histogram(
            "gateway_inspection_duration_seconds", "DLP inspection time per transfer and direction.",
            ["direction"], buckets=LOCAL_WORK_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Failures talking to upstream servers, by kind.",
            ["listener", "kind"], registry=r)
        self.active_connections = Gauge(
            "gateway_active_connections", "Client connections open now.",
            ["listener"], multiprocess_mode="livesum", registry=r)
        self.connections_timed_out = Counter(
            "gateway_connections_timed_out", "Client connections closed for sending no request head within "
            "request_head_timeout of connecting or of their CONNECT (a silent client, a stalled TLS handshake).",
            ["listener"], registry=r)
        self.connections_refused = Counter(
            "gateway_connections_refused", "Client connections closed as soon as they opened: their client held "
            "its share of max_client_connections (client_limit), the worker had no file descriptors to "
            "spare (capacity), or a PROXY protocol listener's connection came from an untrusted address "
            "(proxy_untrusted), sent no or a malformed header (proxy_missing, proxy_malformed).", ["listener", "reason"], registry=r)
        if worker is not None:
            per_worker = Gauge(
                "gateway_worker_active_connections", "Client connections open now in each worker process.",
                ["worker", "listener"], multiprocess_mode="livesum", registry=r)
            self.active_connections = _AlsoPerWorker(self.active_connections, per_worker, str(worker))
        self.trace_records = Counter(
            "gateway_trace_records", "Records appended to the trace log.", registry=r)
        self.trace_append_timeouts = Counter(
            "gateway_trace_append_timeouts", "Transfers refused 503 because the trace writer did not make one of "
            "their records durable within trace.append_timeout: the open record (nothing forwarded), the "
            "completion (the answer withheld) or a refused transfer's only record.", ["record"], registry=r)
        for record in ("open", "done", "only"):
            self.trace_append_timeouts.labels(record=record)
        self.trace_append_duration = Histogram(
            "gateway_trace_append_duration_seconds", "Time to append one record durably to the trace log.",
            buckets=LOCAL_WORK_BUCKETS, registry=r)
        self.trace_tree_size = Gauge(
            "gateway_trace_tree_size", "Records in the trace log's Merkle tree.",
            multiprocess_mode="max", registry=r)
        self.trace_last_checkpoint = Gauge(
            "gateway_trace_last_checkpoint_timestamp_seconds", "Unix time of the trace log's latest signed checkpoint.",
            multiprocess_mode="max", registry=r)
        self.grant_decisions = Counter(
            "gateway_grant_decisions", "Decisions on requests to catalogued datasets, by the dataset's class and "
            "the result (allow, or the refusal's reason).", ["class", "result"], registry=r)
        self.consent_records = Counter(
            "gateway_consent_records", "Records of legal_basis: consent datasets by dataset and outcome (passed "
            "with consent, masked, dropped; refused: without consent, in a response refused for them).",
            ["dataset", "outcome"], registry=r)
        self.revocation_list_issued = Gauge(
            "gateway_revocation_list_issued_timestamp_seconds", "Unix time the bureau issued the revocation list "
            "the gateway holds (its age is time() minus this; the oldest view of any worker).",
            multiprocess_mode="min", registry=r)
        self.config_reloads = Counter(
            "gateway_config_reloads", "Configuration reloads (SIGHUP), by result.", ["result"], registry=r)
        self.config_last_reload_success = Gauge(
            "gateway_config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in use was loaded (at start or by the last successful reload).",
            multiprocess_mode="max", registry=r)
        self.build_info = Gauge(
            "gateway_build_info", "Always 1; the gateway's version as a label.", ["version"],
            multiprocess_mode="max", registry=r)
        self.config_info = Gauge(
            "gateway_config_info", "1 for the configuration in use (0 for one a reload replaced): the digest of "
            "what must be the same on every machine of a boundary, and the data catalogue's version "
            "(gateway.ops.sameconfig; `gateway doctor --peers` compares them).", ["digest", "catalog_version"],
            multiprocess_mode="max", registry=r)
        self._config_labels: tuple[str, str] | None = None
        self.witnessed = TraceWitnessCollector(registry=r)

        self.build_info.labels(version=version).set(1)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result=result)  # both series exist from the start, at 0
        for direction in DIRECTIONS:
            self.inspection_duration.labels(direction=direction)
        # Standard process_* and python_* metrics (in multiprocess mode MultiProcessCollector has none).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def config_loaded(self, success: bool, *, initial: bool = False) -> None:
        """A configuration load: the first one at start, then one per reload. Of several workers,
        which all load the same file on the same SIGHUP, worker 0 counts the machine's reloads."""
        if not initial and self.worker in (None, 0):
            self.config_reloads.labels(result="success" if success else "failure").inc()
        if success:
            self.config_last_reload_success.set(time.time())

    def config_in_use(self, digest: str, catalog_version: str) -> None:
        if self._config_labels not in (None, (digest, catalog_version)):
            self.config_info.labels(*self._config_labels).set(0)
        self._config_labels = (digest, catalog_version)
        self.config_info.labels(digest, catalog_version).set(1)

    def listeners_known(self, listeners: list[str]) -> None:
        """Give every configured listener its series at 0, so dashboards show idle listeners too (as the
        Prometheus instrumentation guidelines advise for label values known in advance)."""
        for listener in listeners:
            self.active_connections.labels(listener=listener)
            self.connections_timed_out.labels(listener=listener)
            for reason in ("client_limit", "capacity"):
                self.connections_refused.labels(listener=listener, reason=reason)
            for kind in UPSTREAM_ERROR_KINDS:  # an alert on a rate needs the series before its first error
                self.upstream_errors.labels(listener=listener, kind=kind)


class _AlsoPerWorker:
    """The machine-wide gauge, each change also made to this worker's own series."""

    def __init__(self, total: Gauge, per_worker: Gauge, worker: str):
        self.total, self.per_worker, self.worker = total, per_worker, worker

    def labels(self, **labels: str) -> "_GaugePair":
        return _GaugePair(self.total.labels(**labels), self.per_worker.labels(worker=self.worker, **labels))


class _GaugePair:
    def __init__(self, *gauges: Gauge):
        self.gauges = gauges

    def inc(self, amount: float = 1) -> None:
        for gauge in self.gauges:
            gauge.inc(amount)

    def dec(self, amount: float = 1) -> None:
        for gauge in self.gauges:
            gauge.dec(amount)


class TraceWitnessCollector:
    """gateway_trace_witnessed_timestamp_seconds{witness}: when each witness last cosigned this machine's
    trace log (read at each scrape from the log's checkpoint.witnessed, which `gateway cluster witness`
    keeps). Set `directory` once the configuration is known; no samples until then, or without witnesses."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.directory = None
        if registry is not None:
            registry.register(self)

    def collect(self):
        family = GaugeMetricFamily(
            "gateway_trace_witnessed_timestamp_seconds", "Unix time of each witness's newest cosignature of "
            "this machine's trace log (the other machines of a boundary cosign it; gateway cluster witness).",
            labels=["witness"])
        if self.directory is not None:
            for witness, when in sorted(cosignature_times(self.directory).items()):
                family.add_metric([witness], when)
        yield family


class SupervisorMetrics:
    """The supervisor's own metrics (gateway.proxy.supervisor), shown with the workers' in multiprocess mode."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.witnessed = TraceWitnessCollector()  # served beside the workers' files (exposition_registry)
        self.restarts = Counter(
            "gateway_process_restarts", "Worker or trace-writer processes the supervisor started again after "
            "they ended.", ["process"], registry=self.registry)
        for process in ("worker", "trace-writer"):
            self.restarts.labels(process=process)


def exposition_registry(metrics: GatewayMetrics | SupervisorMetrics) -> CollectorRegistry:
    """The registry /metrics serves: this process's own, or every worker's in multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return metrics.registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(metrics.witnessed)  # read from files at scrape, not kept per process
    return registry
