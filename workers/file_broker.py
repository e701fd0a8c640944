"""The embedded queue's broker: kombu's filesystem transport, with each message written whole
before a consumer can take it.

kombu (5.x) writes a message straight into its final file. A consumer that lists the folder in
between moves the file away and reads it empty: ``JSONDecodeError`` stops the Celery worker
(``serve`` starts it again) and the message is gone, until the reconciler sends it again.
``benchmarks/stream.py`` met it once in every 8 to 10 minutes of a steady stream. Here the
message is written under a name no consumer takes, then renamed into place, which is atomic on
one file system.

kombu's consumer also looks for a message only every ``polling_interval``, and with one message
in flight (``worker_prefetch_multiplier=1``) it cannot take the next before that one is
acknowledged: a worker done with a task waited up to a whole interval for the next, however many
were queued. Each image is three tasks (analysis, two deliveries), so on the embedded default a
burst of images went at 0.66 s an image where the work took 0.2 (``benchmarks/stream.py``, the
demo bundle, 0.2 s interval). Here an acknowledgement wakes the consumer at once; an idle one
still looks every interval.

An idle worker asked to stop (SIGTERM) stops within one interval: kombu's loop kept looking for
the rest of Celery's 2-s wait before Celery could see the request.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

# kombu takes files named <time>_<uuid>.<queue>.msg; this suffix keeps a partial one out.
_PARTIAL = ".partial"


class QoS(virtual.QoS):
    """Tells the transport when a message is settled (the worker's result thread acks)."""

    def ack(self, delivery_tag: object) -> None:
        super().ack(delivery_tag)
        self._wake()

    def reject(self, delivery_tag: object, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue)
        self._wake()

    def _wake(self) -> None:
        transport = self.channel.connection  # None once the channel is closed: a late ack
        if transport is not None:
            transport.wake()


class Channel(filesystem.Channel):
    QoS = QoS

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

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._settled = threading.Event()

    def wake(self) -> None:
        self._settled.set()

    def drain_events(self, connection: object, timeout: float | None = None) -> None:
        """kombu's loop (virtual.Transport.drain_events), with its sleep between looks cut
        short by an acknowledgement."""
        start = monotonic()
        interval = self.polling_interval
        if timeout and interval and interval > timeout:
            interval = timeout
        while True:
            self._settled.clear()  # before looking: an ack during the look ends the wait
            try:
                self.cycle.get(self._deliver, timeout=timeout)
            except virtual.Empty:
                if (timeout is not None and monotonic() - start >= timeout) or _stopping():
                    raise TimeoutError from None  # socket.timeout, what Celery waits for
                if interval is not None:
                    self._settled.wait(interval)
            else:
                return


def _stopping() -> bool:
    """Celery's worker was asked to stop: its signal handlers set these, and its loop acts on
    them once drain_events returns. As Celery tests them: a warm stop sets 0 (== False). A
    process without Celery's worker (the node, which only sends) never is; nor is the worker
    imported into it for this."""
    state = sys.modules.get("celery.worker.state")
    return state is not None and any(flag is not None and flag is not False
                                     for flag in (state.should_stop, state.should_terminate))
