"""UIDs are checked whole: a trailing newline or a leading zero makes a value no UID."""

from __future__ import annotations

import pytest

from dicom_node.intake import is_valid_uid


@pytest.mark.parametrize("value, valid", [
    ("1.2.840.10008.5.1.4.1.1.1", True), ("0.1", True),
    ("1.2.3.4\n", False), ("1.2.3.4 ", False), ("1.02.3", False), ("1..2", False),
    ("1.2.3.", False), ("", False), ("1." + "2" * 63, False), ("1.2.é", False),
])
def test_uids_are_checked_whole(value: str, valid: bool) -> None:
    assert is_valid_uid(value) is valid
