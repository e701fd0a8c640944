"""The result database: patients, studies, series, instances and each instance's event log.

The Alembic migrations in ``migrations/`` create exactly this schema (a test compares them).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """A time read back as UTC-aware: SQLite hands back naive UTC, PostgreSQL aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class InstanceStatus(enum.StrEnum):
    RECEIVED = "received"  # spooled and committed; not yet handed to the queue
    QUEUED = "queued"  # a task for it is in the broker
    PROCESSING = "processing"  # a worker holds it (until lease_until)
    DONE = "done"
    SKIPPED = "skipped"  # acknowledged but not for us (routing rules); never analysed
    FAILED = "failed"  # gave up: last_error says why
    WAITING_FOR_MODEL = "waiting-for-model"  # decoded; no bundle configured yet


# Statuses a worker may claim from (a lease that ran out is checked separately).
CLAIMABLE = (InstanceStatus.RECEIVED, InstanceStatus.QUEUED)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    # When its first image arrived: studies are listed and paged by it.
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_status_updated", "status", "updated_at"),
                      # The study reporter looks for images changed since its last round.
                      Index("ix_instances_updated_at", "updated_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(Text)
    # How many times different bytes arrived under this SOP Instance UID.
    revision: Mapped[int] = mapped_column(Integer, default=1)

    status: Mapped[str] = mapped_column(String(24), default=InstanceStatus.RECEIVED)
    reason: Mapped[str] = mapped_column(Text, default="")  # why skipped
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column()
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claimed_by: Mapped[str] = mapped_column(String(255), default="")
    lease_until: Mapped[datetime | None] = mapped_column()

    # Filled by the worker's decode step.
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str] = mapped_column(String(16), default="")
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    decode_seconds: Mapped[float | None] = mapped_column(Float)
    decoded_at: Mapped[datetime | None] = mapped_column()
    # When retention took the pixel data out of the spool file (its header stays).
    purged_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[Series] = relationship(back_populates="instances")
    analyses: Mapped[list[Analysis]] = relationship(back_populates="instance",
                                                    order_by="Analysis.id")
    events: Mapped[list[InstanceEvent]] = relationship(
        back_populates="instance", order_by="InstanceEvent.id"
    )


class InstanceEvent(Base):
    """What happened to an instance, in order: the audit trail an admin reads."""

    __tablename__ = "instance_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")

    instance: Mapped[Instance] = relationship(back_populates="events")


class Analysis(Base):
    """One bundle's result for one version (SHA-256) of an instance; never written twice."""

    __tablename__ = "analyses"
    __table_args__ = (
        # "An instance's latest analysis" is a NOT EXISTS on a later one: one index probe.
        Index("ix_analyses_instance_latest", "instance_pk", "id"),
        UniqueConstraint("instance_pk", "source_sha256", "bundle_name", "bundle_version",
                         name="uq_analyses_instance_source_bundle"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    source_sha256: Mapped[str] = mapped_column(String(64))
    bundle_name: Mapped[str] = mapped_column(String(64))
    bundle_version: Mapped[str] = mapped_column(String(64))
    clinical_use: Mapped[bool] = mapped_column(Boolean)
    member_probabilities: Mapped[dict] = mapped_column(JSON)
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))  # normal | abnormal
    decode_seconds: Mapped[float] = mapped_column(Float)
    classify_seconds: Mapped[float] = mapped_column(Float)
    detect_seconds: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="analyses")
    outputs: Mapped[list[Output]] = relationship(back_populates="analysis",
                                                 order_by="Output.id")
    findings: Mapped[list[Finding]] = relationship(back_populates="analysis",
                                                   order_by="Finding.id")


class Finding(Base):
    """A detected lesion: class, score and box in the source image's pixel coordinates."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_pk: Mapped[int] = mapped_column(ForeignKey("analyses.id"), index=True)
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float] = mapped_column(Float)
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)

    analysis: Mapped[Analysis] = relationship(back_populates="findings")


class StudyReport(Base):
    """One version of a study's result: what its analysed images say together. An image that
    arrives after a report makes a new version, which supersedes the older; both are kept."""

    __tablename__ = "study_reports"
    __table_args__ = (
        UniqueConstraint("study_pk", "version", name="uq_study_reports_study_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(16))  # abnormal if any image is
    probability: Mapped[float] = mapped_column(Float)  # the highest of its images
    top_instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"))  # which gave it
    image_count: Mapped[int] = mapped_column(Integer)
    finding_count: Mapped[int] = mapped_column(Integer)
    analysis_ids: Mapped[list] = mapped_column(JSON)  # the analyses it reports, sorted
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship()
    outputs: Mapped[list[Output]] = relationship(back_populates="study_report",
                                                 order_by="Output.id")


class Output(Base):
    """A DICOM object we made (SR, SC overlay, GSPS), kept in the data dir: from one analysis,
    or (a study's SR) from a study report."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_pk: Mapped[int | None] = mapped_column(ForeignKey("analyses.id"), index=True)
    study_report_pk: Mapped[int | None] = mapped_column(ForeignKey("study_reports.id"),
                                                        index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr, sc, sc-jpeg, gsps
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column()  # file removed by retention

    analysis: Mapped[Analysis | None] = relationship(back_populates="outputs")
    study_report: Mapped[StudyReport | None] = relationship(back_populates="outputs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output",
                                                      order_by="Delivery.id")


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    SENDING = "sending"  # a worker holds it until lease_until
    DELIVERED = "delivered"
    FAILED = "failed"  # dead letter: last_error says why; `spinenode deliveries retry`


class Delivery(Base):
    """The outbox: one object to one destination, until the peer has it."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    output_pk: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    output: Mapped[Output] = relationship(back_populates="deliveries")


class TokenRole(enum.StrEnum):
    VIEWER = "viewer"  # reads results
    OPERATOR = "operator"  # also retries deliveries and re-queues failed instances


class ApiToken(Base):
    """A bearer token for the HTTP side. Only the SHA-256 of the secret is kept: a copy of the
    database does not let anyone in."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class AuditEntry(Base):
    """One HTTP access to patient data (or an attempt at it): who, when, what, and the answer."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    token_name: Mapped[str] = mapped_column(String(64), default="")  # "" = no valid token
    role: Mapped[str] = mapped_column(String(16), default="")
    client: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)  # with its query string
    status_code: Mapped[int] = mapped_column(Integer)


class WorkerHeartbeat(Base):
    """A worker process says it is alive (and which bundle it verified) every few seconds."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    bundle: Mapped[str] = mapped_column(String(130), default="")  # "name version"; "" = none
