"""spinenode's DICOM node: configuration, SCP, spool, database, result objects, sender."""

__version__ = "0.1.0"
