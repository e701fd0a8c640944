"""``python -m dicom_node.cli``: how serve starts its embedded worker."""

import sys

from dicom_node.cli import main

sys.exit(main())
