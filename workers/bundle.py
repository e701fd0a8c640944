"""The model bundle: the contract between ``training`` (writes it) and the workers (serve it).

A folder with ``manifest.json`` and the weight files it names. Loading checks the schema, that
every file is there and that its SHA-256 matches; anything else is refused with one line.
No torch here: ``spinenode bundle verify`` runs on a machine without it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dicom_node.files import sha256_of

MANIFEST = "manifest.json"
# 3: the detector is a state dict of plain tensors, read with torch.load(weights_only=True);
# schemas 1 and 2 held it as an ultralytics checkpoint, a pickle that can run code when loaded.
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (3,)
# The test-time augmentations the runtime knows, by the names a manifest uses.
TTA_NAMES = ("identity", "hflip", "rotate+10", "rotate-10", "zoom1.1")
# VinDr-SpineXR's 7 lesion classes, spelled as in its CSV; a detector's class order is its own.
VINDR_CLASSES = (
    "Osteophytes",
    "Surgical implant",
    "Spondylolysthesis",
    "Foraminal stenosis",
    "Disc space narrowing",
    "Vertebral collapse",
    "Other lesions",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The libraries whose versions a bundle's provenance records: those that shape what the weights
# compute (a different major version may load them and compute something else).
RECORDED_LIBRARIES = ("torch", "torchvision", "timm", "ultralytics", "numpy", "pydicom")
CHECKED_MAJOR_VERSIONS = ("torch", "timm", "ultralytics")


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class BundleError(ValueError):
    """A bundle that cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}


# The paper's model sizes: the defaults of the bundle manifest, the training config and the bundle
# writer alike (DERNet input in pixels, YOLO11 scale and input in pixels).
CLASSIFIER_INPUT_SIZE = 384
DETECTOR_SCALE = "l"
DETECTOR_IMAGE_SIZE = 640


class MemberSpec(_Strict):
    architecture: Literal["densenet121", "tf_efficientnetv2_s", "resnet50"]
    weights: str  # file name inside the bundle
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ensemble_weight: float = Field(ge=0)


class ClassifierSpec(_Strict):
    members: list[MemberSpec] = Field(min_length=1)
    input_size: int = Field(CLASSIFIER_INPUT_SIZE, ge=32)
    # The long side of the training cache the members learnt from: serving brings an image
    # there first, as the cache did, so that both see the same pixels. None (bundles made
    # before it was recorded): straight to input_size.
    source_size: int | None = Field(None, ge=32)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tta: list[str] = Field(default_factory=lambda: list(TTA_NAMES), min_length=1)
    threshold: float = Field(ge=0, le=1)
    # The members' int8 calibration (workers/int8.py: what their activation observers saw on
    # training images, per architecture), written by export's int8 check where it passed.
    int8_calibration: str | None = None
    int8_calibration_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("tta")
    @classmethod
    def _known_tta(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in TTA_NAMES]
        if unknown:
            raise ValueError(f"unknown TTA {unknown}; known: {list(TTA_NAMES)}")
        return value

    @model_validator(mode="after")
    def _weights_sum(self) -> ClassifierSpec:
        if sum(member.ensemble_weight for member in self.members) <= 0:
            raise ValueError("ensemble weights sum to zero")
        return self


class DetectorSpec(_Strict):
    architecture: Literal["yolo11"] = "yolo11"
    scale: Literal["n", "s", "m", "l", "x"] = DETECTOR_SCALE
    weights: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    image_size: int = Field(DETECTOR_IMAGE_SIZE, ge=32)
    class_names: list[str] = Field(min_length=1)
    # The head's class branch width when training kept that of a start with more classes
    # (None: as YOLO11 builds it for class_names).
    class_branch_width: int | None = Field(None, ge=1)
    confidence: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.65, ge=0, le=1)

    @field_validator("image_size")
    @classmethod
    def _stride_multiple(cls, value: int) -> int:
        if value % 32:
            raise ValueError("image_size must be a multiple of 32 (the detector's stride)")
        return value


# int8: the classifier only, on a CPU (workers/int8.py).
Precision = Literal["float32", "bfloat16", "float16", "int8"]
# How far a reduced precision may move a result from float32 (export's check), and a compiled
# model from the same model eager (workers/compiled.py).
PRECISION_TOLERANCE = {"probability": 0.01, "box_px": 0.5, "score": 0.01}


class ValidatedPrecisions(_Strict):
    """Per component, the precisions whose outputs training checked against float32 on
    held-out data (within the tolerance in metrics["precision_check"]); the runtime uses no
    other. Checked apart: one component may pass where the other does not."""

    classifier: list[Precision] = Field(default_factory=lambda: ["float32"])
    detector: list[Precision] = Field(default_factory=lambda: ["float32"])


class Manifest(_Strict):
    schema_version: Literal[3] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    created: datetime
    # False for bundles made by tests or from synthetic data: never a clinical result.
    clinical_use: bool = False
    classifier: ClassifierSpec
    detector: DetectorSpec
    validated_precisions: ValidatedPrecisions = Field(default_factory=ValidatedPrecisions)
    provenance: dict = Field(default_factory=dict)  # data fingerprint, config, code version
    metrics: dict = Field(default_factory=dict)  # measured on held-out data

    def weight_files(self) -> dict[str, str]:
        """File name -> expected SHA-256, for every weight file."""
        files = {member.weights: member.sha256 for member in self.classifier.members}
        files[self.detector.weights] = self.detector.sha256
        if self.classifier.int8_calibration:
            files[self.classifier.int8_calibration] = self.classifier.int8_calibration_sha256
        return files

    def version_mismatches(self) -> list[str]:
        """The libraries this bundle was made with in another major version than this machine
        runs ('torch 1.13.1 made it, 2.14.1 serves it'); empty when the manifest does not
        say (bundles from before provenance was recorded)."""
        made_with = self.provenance.get("libraries", {})
        found = []
        for name in CHECKED_MAJOR_VERSIONS:
            made, running = made_with.get(name), installed_version(name)
            if made and running and made.split(".")[0] != running.split(".")[0]:
                found.append(f"{name} {made} made it, {running} serves it")
        return found


class Bundle(BaseModel):
    path: Path
    manifest: Manifest

    @property
    def label(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def file(self, name: str) -> Path:
        return self.path / name

    def verified_bytes(self, name: str) -> io.BytesIO:
        """A weight file's bytes, checked against the manifest's SHA-256 as they are handed
        over: what torch.load reads is what was verified (the file cannot be swapped between
        the check and the load). Raises BundleError before anything is unpickled."""
        data = self.file(name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest.weight_files()[name]:
            raise BundleError(f"bundle {self.path}: weight file {name} does not match its "
                              "SHA-256 (damaged or tampered); not loaded")
        return io.BytesIO(data)


SIGNATURE = MANIFEST + ".sig"


def sign_manifest(path: Path, private_key: Path) -> Path:
    """Write the bundle's detached Ed25519 signature of its manifest (which holds every weight
    file's SHA-256, so it signs them all). Keys: ``openssl genpkey -algorithm ed25519``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(private_key).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{private_key} is not an Ed25519 private key")
    signature = Path(path) / SIGNATURE
    signature.write_bytes(key.sign((Path(path) / MANIFEST).read_bytes()))
    return signature


def _check_signature(path: Path, public_key: Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(Path(public_key).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{public_key} is not an Ed25519 public key")
    signature = path / SIGNATURE
    if not signature.is_file():
        raise BundleError(f"bundle {path}: not signed ({SIGNATURE} missing), and a signature "
                          "is required")
    try:
        key.verify(signature.read_bytes(), (path / MANIFEST).read_bytes())
    except InvalidSignature:
        raise BundleError(f"bundle {path}: its signature does not match {public_key} "
                          "(manifest changed or signed by another key)") from None


def load_bundle(path: Path, verify_checksums: bool = True,
                public_key: Path | None = None) -> Bundle:
    """Read and check a bundle; raise BundleError (one line) if it cannot be used. With
    ``public_key``, the manifest must carry a valid Ed25519 signature by it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path}: no {MANIFEST}")
    if public_key is not None:
        _check_signature(path, public_key)
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise BundleError(f"bundle {path}: {MANIFEST} is not readable JSON: {error}") from None
    schema = raw.get("schema_version") if isinstance(raw, dict) else None
    if schema in (1, 2):
        raise BundleError(f"bundle {path}: schema version {schema} holds the detector as a "
                          "pickle, which can run code when loaded; export it again with this "
                          "version (spinenode train export)")
    if schema not in (None, *READABLE_SCHEMAS):
        raise BundleError(f"bundle {path}: schema version {schema} is not one of "
                          f"{', '.join(map(str, READABLE_SCHEMAS))}; this node cannot serve it")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BundleError(f"bundle {path}: {MANIFEST} {where}: {first['msg']}") from None
    for name, expected in manifest.weight_files().items():
        file = (path / name).resolve()
        if not file.is_relative_to(path.resolve()) or "/" in name:
            raise BundleError(f"bundle {path}: weight file {name!r} is outside the bundle")
        if not file.is_file():
            raise BundleError(f"bundle {path}: weight file {name} is missing")
        if verify_checksums and sha256_of(file) != expected:
            raise BundleError(f"bundle {path}: weight file {name} does not match its SHA-256 "
                              "(damaged or tampered)")
    return Bundle(path=path, manifest=manifest)


def write_manifest(path: Path, manifest: Manifest) -> None:
    (path / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
