"""How our own objects are signed: a PACS that routes them back to us must not have them
analysed (the loop guard in intake reads these)."""

MANUFACTURER = "spinenode"
MODEL_NAME = "spinenode DERNet + YOLO11"
