"""DICOM objects that carry our results back to the PACS: TID 1500 SR, SC overlay, GSPS."""
