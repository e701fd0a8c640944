"""The work for one image, exactly once however often its task is delivered, as named steps:

    claim -> decode -> analyse -> build outputs -> record -> enqueue deliveries

``Pipeline`` binds the steps once per worker process to what they use: the settings, the
database sessions, the models (loaded on first use) and the way to queue a delivery. With
batching on, the claim step takes other queued instances too and the later steps run for all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analysis import AnalysisResult
from dicom_node.config import Settings
from dicom_node.db.leases import is_unavailable
from dicom_node.db.models import (
    Analysis,
    Delivery,
    Finding,
    Instance,
    InstanceEvent,
    InstanceStatus,
    Output,
    utcnow,
)
from dicom_node.outbox import destinations_for
from workers.claims import Claim, Claims, Outcome
from workers.imaging import DecodedImage, DecodeError, decode_all
from workers.results import BuiltOutput, build_outputs

if TYPE_CHECKING:
    from workers.runtime import ModelRuntime

log = logging.getLogger(__name__)

# A transient failure (database or file system hiccup) is retried after this many seconds.
RETRY_DELAY_SECONDS = 10

EnqueueDelivery = Callable[[int], None]


class Pipeline:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 enqueue_delivery: EnqueueDelivery):
        self.settings = settings
        self.sessions = sessions
        self.claims = Claims(settings, sessions)
        self.enqueue_delivery = enqueue_delivery

    def process(self, instance_id: int, note: str = "") -> Outcome:
        """The task for one instance. A database that cannot be reached at the claim raises
        (the task retries with backoff); after the claim, nothing raises: each claimed instance
        is finished, failed or given back."""
        held = self.claims.claim(instance_id, note)
        if held is None:
            return Outcome("skipped", "not claimable (done, skipped, failed or held elsewhere)")
        batch = [held]
        with self.claims.held(batch):  # from the claim on: loading the models included
            try:
                runtime = self.runtime()
            except Exception as error:  # a bundle that will not load: retried, then failed
                return self.claims.give_back(held, f"cannot load bundle: {error}")
            try:
                if runtime is not None and self.settings.batch_size > 1:
                    self.claims.claim_more(batch, self.settings.batch_size,
                                           self.settings.batch_wait_ms / 1000)
                return self._run_steps(batch, runtime)[0]
            except Exception as error:  # whatever went wrong, nothing stays held
                return self._give_back_all(batch, error)[0]

    def runtime(self) -> ModelRuntime | None:
        """The models of the configured bundle (loaded once per process), or None."""
        if self.settings.bundle is None:
            return None
        from workers.runtime import runtime_for  # torch only where a bundle is configured

        return runtime_for(self.settings)

    def _run_steps(self, batch: list[Claim], runtime: ModelRuntime | None) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        decoded = self.decode(batch, outcomes)
        results = self.analyse(decoded, runtime) if runtime is not None else {}
        for held, image in decoded:
            result = results.get(held.instance_id)
            outputs = self.build_outputs(held, image, result) if result is not None else []
            outcome, delivery_ids = self.record(held, image, runtime, result, outputs)
            if outcome.status != "lost":
                self.enqueue_deliveries(delivery_ids)
            outcomes[held.instance_id] = outcome
        return [outcomes[held.instance_id] for held in batch]

    def decode(self, batch: list[Claim],
               outcomes: dict[int, Outcome]) -> list[tuple[Claim, DecodedImage]]:
        """The images that decoded; each one that did not is failed or given back (its outcome
        goes into ``outcomes``)."""
        images = decode_all([held.spool_path for held in batch], self.settings.max_pixels,
                            self.settings.decode_workers, cores=self.settings.torch_threads)
        decoded = []
        for held, image in zip(batch, images, strict=True):
            if isinstance(image, DecodeError):
                outcomes[held.instance_id] = self.claims.fail(held, str(image))
            elif isinstance(image, OSError) and not held.spool_path.exists():
                outcomes[held.instance_id] = self.claims.fail(
                    held, f"spool file missing: {held.spool_path}")
            elif isinstance(image, OSError):
                outcomes[held.instance_id] = self.claims.give_back(
                    held, f"cannot read spool file: {image}")
            else:
                decoded.append((held, image))
        return decoded

    def analyse(self, decoded: list[tuple[Claim, DecodedImage]],
                runtime: ModelRuntime) -> dict[int, AnalysisResult]:
        """One model call for the images not analysed yet by this bundle (a task delivered
        again after a crash that followed the commit adds no second analysis)."""
        todo = [(held, image) for held, image in decoded
                if not self._already_analysed(held, runtime)]
        if not todo:
            return {}
        results = runtime.analyse([image.pixels for _, image in todo])
        return {held.instance_id: result
                for (held, _), result in zip(todo, results, strict=True)}

    def build_outputs(self, held: Claim, image: DecodedImage,
                      result: AnalysisResult) -> list[BuiltOutput]:
        return build_outputs(self.settings, held.spool_path, image, result, held.calling_ae,
                             number=held.instance_id)

    def record(self, held: Claim, image: DecodedImage, runtime: ModelRuntime | None,
               result: AnalysisResult | None,
               outputs: list[BuiltOutput]) -> tuple[Outcome, list[int]]:
        """Write what was found and what is to be sent, in one transaction that ends our
        claim; the work is kept through a database outage rather than done again. Returns the
        outcome and the deliveries to queue."""
        delivery_ids: list[int] = []

        def write(session: Session, instance: Instance) -> Outcome:
            _record_decode(session, instance, image)
            if runtime is None:
                instance.status = InstanceStatus.WAITING_FOR_MODEL
                session.add(InstanceEvent(instance=instance, event="waiting-for-model",
                                          detail="no model bundle configured"))
                return Outcome(instance.status)
            instance.status = InstanceStatus.DONE
            if result is not None:
                analysis = _record_analysis(session, instance, runtime, image, result)
                deliveries = _record_outbox(session, self.settings, analysis, outputs,
                                            held.calling_ae)
                delivery_ids[:] = [delivery.id for delivery in deliveries]
            return Outcome(instance.status)

        return self.claims.end(held, "recording", write), delivery_ids

    def enqueue_deliveries(self, delivery_ids: list[int]) -> None:
        """After the commit; the reconciler sends any that this misses (broker down)."""
        for delivery_id in delivery_ids:
            try:
                self.enqueue_delivery(delivery_id)
            except Exception as error:
                log.warning("could not queue delivery %d: %s", delivery_id, error)

    def _already_analysed(self, held: Claim, runtime: ModelRuntime) -> bool:
        manifest = runtime.bundle.manifest
        with self.sessions() as session:
            return session.scalar(
                select(Analysis.id).filter_by(instance_pk=held.instance_id,
                                              source_sha256=held.sha256,
                                              bundle_name=manifest.name,
                                              bundle_version=manifest.version)
            ) is not None

    def _give_back_all(self, batch: list[Claim], error: Exception) -> list[Outcome]:
        ids = [held.instance_id for held in batch]
        if is_unavailable(error):  # an outage, not a bug: one line, no traceback
            message = f"database unavailable ({error.__class__.__name__})"
            log.warning("analysis of instances %s interrupted: %s", ids, message)
        else:
            log.exception("analysis of instances %s failed", ids)
            message = f"{error.__class__.__name__}: {error}"
        return [self.claims.give_back(held, message) for held in batch]


def _record_decode(session: Session, instance: Instance, image: DecodedImage) -> None:
    instance.rows = image.rows
    instance.columns = image.columns
    instance.photometric_interpretation = image.photometric_interpretation
    instance.bits_stored = image.bits_stored
    instance.decode_seconds = image.decode_seconds
    instance.decoded_at = utcnow()
    instance.updated_at = utcnow()
    instance.claim_token = None
    instance.lease_until = None
    instance.last_error = ""
    session.add(InstanceEvent(
        instance=instance, event="decoded",
        detail=f"{image.columns}x{image.rows} {image.photometric_interpretation} "
               f"in {image.decode_seconds:.3f} s",
    ))


def _record_analysis(session: Session, instance: Instance, runtime: ModelRuntime,
                     image: DecodedImage, result: AnalysisResult) -> Analysis:
    manifest = runtime.bundle.manifest
    classification = result.classification
    analysis = Analysis(
        instance=instance, source_sha256=instance.sha256, bundle_name=manifest.name,
        bundle_version=manifest.version, clinical_use=manifest.clinical_use,
        member_probabilities=classification.member_probabilities,
        probability=classification.probability, threshold=classification.threshold,
        label="abnormal" if classification.abnormal else "normal",
        decode_seconds=image.decode_seconds, classify_seconds=result.classify_seconds,
        detect_seconds=result.detect_seconds,
        device=f"{runtime.device} {runtime.precision}",
    )
    session.add(analysis)
    session.add_all(
        Finding(analysis=analysis, class_index=box.class_index, class_name=box.class_name,
                score=box.score, x0=box.x0, y0=box.y0, x1=box.x1, y1=box.y1)
        for box in result.findings
    )
    session.add(InstanceEvent(
        instance=instance, event="analysed",
        detail=f"{runtime.bundle.label}: {analysis.label} p={classification.probability:.3f}, "
               f"{len(result.findings)} findings",
    ))
    log.info("instance %d analysed with %s: %s p=%.3f, %d findings", instance.id,
             runtime.bundle.label, analysis.label, classification.probability,
             len(result.findings), extra={"instance_id": instance.id,
                                          "sop_instance_uid": instance.sop_instance_uid})
    return analysis


def _record_outbox(session: Session, settings: Settings, analysis: Analysis,
                   outputs: list[BuiltOutput], calling_ae: str) -> list[Delivery]:
    """An Output row per object and a Delivery per (object, destination that wants it)."""
    destinations = destinations_for(settings, calling_ae)
    deliveries = []
    for built in outputs:
        output = Output(analysis=analysis, kind=built.kind, sop_class_uid=built.sop_class_uid,
                        sop_instance_uid=built.sop_instance_uid,
                        transfer_syntax_uid=built.transfer_syntax_uid, path=str(built.path))
        session.add(output)
        for destination in destinations:
            if built.kind in destination.kinds:
                deliveries.append(Delivery(output=output, destination=str(destination)))
    session.add_all(deliveries)
    session.flush()
    return deliveries
