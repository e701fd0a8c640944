"""The embedded queue's broker: kombu's filesystem transport, with each message written whole
before a consumer can take it.

kombu (5.x) writes a message straight into its final file. A consumer that lists the folder in
between moves the file away and reads it empty: ``JSONDecodeError`` stops the Celery worker
(``serve`` starts it again) and the message is gone, until the reconciler sends it again.
``benchmarks/stream.py`` met it once in every 8 to 10 minutes of a steady stream. Here the
message is written under a name no consumer takes, then renamed into place, which is atomic on
one file system.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

# kombu takes files named <time>_<uuid>.<queue>.msg; this suffix keeps a partial one out.
_PARTIAL = ".partial"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict, **kwargs: object) -> None:
        """Put ``payload`` onto ``queue``, named as kombu names it (its order is by name)."""
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        try:
            with open(final + _PARTIAL, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(final + _PARTIAL, final)
        except OSError as error:
            raise ChannelError(f"Cannot add file {final!r} to directory") from error


class Transport(filesystem.Transport):
    Channel = Channel
