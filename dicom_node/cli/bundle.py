"""``spinenode bundle verify|info``: check or describe a model bundle (no node settings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import Fatal


def cmd_bundle(args: argparse.Namespace) -> int:
    from workers.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.path)
    except BundleError as error:
        raise Fatal(str(error)) from None
    manifest = bundle.manifest
    if args.bundle_command == "verify":
        print(f"bundle {args.path}: {bundle.label} OK ({len(manifest.weight_files())} weight "
              "files, checksums match)")
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
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """bundle verify, bundle info"""
    bundle = commands.add_parser("bundle", help="check or describe a model bundle")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    verify = bundle_commands.add_parser("verify", help="schema, files and SHA-256 checksums")
    verify.add_argument("path", type=Path)
    info = bundle_commands.add_parser("info", help="what the bundle holds")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true")
    bundle.set_defaults(handler=cmd_bundle)
