"""``spinenode bundle verify|info|sign``: check, describe or sign a model bundle (no node
settings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import Fatal


def cmd_bundle(args: argparse.Namespace) -> int:
    from workers.bundle import BundleError, load_bundle, sign_manifest

    try:
        bundle = load_bundle(args.path, public_key=getattr(args, "public_key", None))
        if args.bundle_command == "sign":
            print(f"bundle {args.path}: signed, {sign_manifest(args.path, args.key)}")
            return 0
    except BundleError as error:
        raise Fatal(str(error)) from None
    manifest = bundle.manifest
    if args.bundle_command == "verify":
        signed = ", signature valid" if args.public_key else ""
        print(f"bundle {args.path}: {bundle.label} OK ({len(manifest.weight_files())} weight "
              f"files, checksums match{signed})")
        return 0
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    classifier, detector = manifest.classifier, manifest.detector
    print(f"name        {manifest.name}\nversion     {manifest.version}\n"
          f"created     {manifest.created.isoformat(timespec='seconds')}\n"
          f"clinical    {'yes' if manifest.clinical_use else 'NO (not for clinical use)'}")
    print(f"classifier  {classifier.input_size} px, TTA {', '.join(classifier.tta)}, "
          f"threshold {classifier.threshold:.3f}")
    for member in classifier.members:
        print(f"  {member.architecture:20s} weight {member.ensemble_weight:.2f}  {member.weights}")
    print(f"detector    YOLO11-{detector.scale} {detector.image_size} px, confidence "
          f"{detector.confidence}, NMS IoU {detector.nms_iou}, {detector.weights}")
    print(f"  classes   {', '.join(detector.class_names)}")
    for key, value in manifest.metrics.items():
        print(f"metric      {key}: {value}")
    provenance = manifest.provenance
    for key in ("spinenode", "git_commit", "data_source", "data_fingerprint"):
        if provenance.get(key):
            print(f"made by     {key}: {provenance[key]}")
    if provenance.get("libraries"):
        print("made with   " + ", ".join(f"{name} {version}" for name, version
                                         in provenance["libraries"].items()))
    for key, value in provenance.get("init_weights", {}).items():
        print(f"started at  {key}: {value}")
    for mismatch in manifest.version_mismatches():
        print(f"WARNING     {mismatch}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """bundle verify, bundle info, bundle sign"""
    bundle = commands.add_parser("bundle", help="check or describe a model bundle")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    verify = bundle_commands.add_parser("verify", help="schema, files and SHA-256 checksums")
    verify.add_argument("path", type=Path)
    verify.add_argument("--key", dest="public_key", type=Path,
                        help="also require a valid signature by this Ed25519 public key (PEM)")
    sign = bundle_commands.add_parser("sign", help="sign the manifest (and so every weight "
                                                   "file's SHA-256) with an Ed25519 key")
    sign.add_argument("path", type=Path)
    sign.add_argument("--key", required=True, type=Path,
                      help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519)")
    info = bundle_commands.add_parser("info", help="what the bundle holds")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true")
    bundle.set_defaults(handler=cmd_bundle)
