"""The ``spinenode`` command: the composition root, the one place that may import
``dicom_node``, ``workers`` and ``training`` together. One module per command group; each owns
its arguments and builds only the settings it uses."""

from __future__ import annotations

import argparse
import sys

from dicom_node.cli import admin, bundle, demo, serve, train, web
from dicom_node.cli.common import Fatal
from dicom_node.config import SettingsError

GROUPS = (serve, web, demo, admin, bundle, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinenode", description="DICOM AI node for spine radiographs")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SettingsError, Fatal) as error:
        print(f"spinenode: {error}", file=sys.stderr)
        return 2
