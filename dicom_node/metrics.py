"""Prometheus metrics. What only the receiving process sees (C-STORE answers, bytes) are
counters it increments; everything else is read from the result database when scraped, so a
separately run ``spinenode web`` reports the same figures as the node, and a restart loses
nothing but the counters' running totals (Prometheus handles the reset)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.admin import oldest_waiting, status_counts
from dicom_node.db.models import Analysis, Delivery, DeliveryStatus, Finding, InstanceStatus
from dicom_node.heartbeat import heartbeats

# Seconds per stage: decoding is ~0.01-1 s, a CPU model ~0.1-10 s, a stuck one more.
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
STAGES = {"decode": Analysis.decode_seconds, "classify": Analysis.classify_seconds,
          "detect": Analysis.detect_seconds}


class IntakeCounts(Protocol):
    """What the SCP counts as it answers: IntakeMetrics in the node's own process, or what
    forwards the counts to it from a further intake process."""

    def stored(self, status: int, calling_ae: str, size: int) -> None: ...

    def rejected(self, reason: str) -> None: ...


class IntakeMetrics:
    """Counters the SCP increments as it answers."""

    def __init__(self, registry: CollectorRegistry):
        self.c_store = Counter("spinenode_c_store_requests", "C-STORE requests answered",
                               ["status", "calling_ae"], registry=registry)
        self.bytes_received = Counter("spinenode_received_bytes",
                                      "Bytes of data sets stored", registry=registry)
        self.associations_rejected = Counter(
            "spinenode_associations_rejected", "Association requests rejected, by reason "
            "(called-ae: not our AE title; not-allowed: calling AE/address not in the "
            "allow-list)", ["reason"], registry=registry)
        self.processes = Gauge("spinenode_intake_processes",
                               "Processes taking associations (intake_processes)",
                               registry=registry)
        self.processes.set(1)

    def stored(self, status: int, calling_ae: str, size: int) -> None:
        self.c_store.labels(f"0x{status:04X}", calling_ae).inc()
        if status == 0:
            self.bytes_received.inc(size)

    def rejected(self, reason: str) -> None:
        self.associations_rejected.labels(reason).inc()


class DatabaseCollector:
    """Gauges of the current state, and counters/histograms of analyses and findings that it
    adds up incrementally (only rows newer than the last scrape are read)."""

    def __init__(self, sessions: sessionmaker[Session], queue_depth: Callable[[], int]):
        self._sessions = sessions
        self._queue_depth = queue_depth
        self._lock = threading.Lock()
        self._last_analysis = 0
        self._buckets = {stage: [0] * len(STAGE_BUCKETS) for stage in STAGES}
        self._sums = dict.fromkeys(STAGES, 0.0)
        self._count = 0
        self._last_finding = 0
        self._findings: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._add_new_analyses()
            self._add_new_findings()
            yield from self._state()
            yield from self._histograms()

    def _add_new_analyses(self) -> None:
        columns = [func.max(Analysis.id), func.count()]
        for column in STAGES.values():
            columns.append(func.coalesce(func.sum(column), 0.0))
            columns += [func.sum(case((column <= bound, 1), else_=0)) for bound in STAGE_BUCKETS]
        with self._sessions() as session:
            row = session.execute(select(*columns)
                                  .where(Analysis.id > self._last_analysis)).one()
        if not row[1]:
            return
        self._last_analysis, self._count = row[0], self._count + row[1]
        values = list(row[2:])
        for stage in STAGES:
            self._sums[stage] += values.pop(0)
            for index in range(len(STAGE_BUCKETS)):
                self._buckets[stage][index] += values.pop(0) or 0

    def _add_new_findings(self) -> None:
        with self._sessions() as session:
            rows = session.execute(
                select(Finding.class_name, func.count(), func.max(Finding.id))
                .where(Finding.id > self._last_finding).group_by(Finding.class_name)).all()
        for class_name, count, last in rows:
            self._findings[class_name] = self._findings.get(class_name, 0) + count
            self._last_finding = max(self._last_finding, last)

    def _histograms(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily("spinenode_analysis_stage_seconds",
                                          "Time per image and stage of analysis",
                                          labels=["stage"])
        for stage in STAGES:
            buckets = [(str(bound), count)
                       for bound, count in zip(STAGE_BUCKETS, self._buckets[stage], strict=True)]
            buckets.append(("+Inf", self._count))
            histogram.add_metric([stage], buckets, self._sums[stage])
        yield histogram
        findings = CounterMetricFamily("spinenode_findings", "Findings detected, per class",
                                       labels=["class"])
        for class_name, count in sorted(self._findings.items()):
            findings.add_metric([class_name], count)
        yield findings

    def _state(self) -> Iterator[Metric]:
        instances = GaugeMetricFamily("spinenode_instances", "Instances per status",
                                      labels=["status"])
        counts = status_counts(self._sessions)
        for status, count in counts.items():
            instances.add_metric([status], count)
        yield instances
        waiting = oldest_waiting(self._sessions)
        yield GaugeMetricFamily("spinenode_oldest_waiting_seconds",
                                "Age of the instance that has waited longest for analysis",
                                value=waiting["age_seconds"] if waiting else 0)
        try:
            depth = float(self._queue_depth())
        except Exception:  # noqa: BLE001 - the broker is down: say so by NaN, not by failing
            depth = float("nan")
        yield GaugeMetricFamily("spinenode_queue_depth", "Tasks waiting in the broker",
                                value=depth)
        deliveries = GaugeMetricFamily("spinenode_deliveries",
                                       "Deliveries per status and destination",
                                       labels=["status", "destination"])
        with self._sessions() as session:
            rows = session.execute(select(Delivery.status, Delivery.destination, func.count())
                                   .group_by(Delivery.status, Delivery.destination)).all()
        for status, destination, count in rows:
            deliveries.add_metric([status, destination], count)
        yield deliveries
        dead = GaugeMetricFamily("spinenode_dead_letters",
                                 "Work given up on: failed deliveries and failed instances",
                                 labels=["kind"])
        dead.add_metric(["delivery"], sum(count for status, _, count in rows
                                          if status == DeliveryStatus.FAILED))
        dead.add_metric(["instance"], counts[InstanceStatus.FAILED])
        yield dead
        beats = heartbeats(self._sessions)
        age = GaugeMetricFamily("spinenode_worker_heartbeat_age_seconds",
                                "Seconds since each worker's last heartbeat", labels=["worker"])
        for beat in beats:
            age.add_metric([beat["name"]], beat["age_seconds"])
        yield age
        bundle = InfoMetricFamily("spinenode_bundle", "The model bundle the workers serve",
                                  labels=["worker"])
        for beat in beats:
            name, _, version = beat["bundle"].partition(" ")
            bundle.add_metric([beat["name"]], {"name": name or "none", "version": version})
        yield bundle


def node_registry(sessions: sessionmaker[Session], queue_depth: Callable[[], int]
                  ) -> CollectorRegistry:
    """The registry /metrics serves: the database's view; the SCP's process adds its
    IntakeMetrics to it."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(sessions, queue_depth))
    return registry
