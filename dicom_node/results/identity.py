"""How our own objects are signed (a PACS that routes them back to us must not have them
analysed: the loop guard in intake reads these), and where they go."""

from pydicom.uid import generate_uid

MANUFACTURER = "spinenode"
MODEL_NAME = "spinenode DERNet + YOLO11"


def result_series_uid(study_uid: str, kind: str) -> str:
    """The series of one kind of result for a study: the same UID every time it is asked, on
    every node, so that all of a study's results of that kind land in one series."""
    return generate_uid(entropy_srcs=["spinenode result series", study_uid, kind])
