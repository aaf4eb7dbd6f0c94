"""A request body kept while it streams up, so a retry (or a mirror) can send it again.

Nothing is read ahead: the first try streams the body from the client as usual, and each event
it takes is also appended to a buffer while the body stays under ``limit`` bytes. A retry
replays the buffer, then goes on reading from the client (still buffering) if the body was not
over yet. Past the limit the buffer is dropped and the body is ``Body.LOST`` for further
retries; the try in progress is not affected. A body announced longer than the limit is never
buffered at all, so a large upload never sits in memory.
"""

from __future__ import annotations

from typing import Protocol

from meshd.proxy.core.h2 import RequestTrailers
from meshd.proxy.core.http1 import END, Data, Event, Framing, RequestHead
from meshd.proxy.core.retry import Body

Message = Event | RequestTrailers


class Source(Protocol):
    """A request's body events: an HTTP/1.1 ``RequestSource`` or an HTTP/2 ``H2Request``."""

    async def next_event(self) -> Message | None: ...


class ReplayBody:
    def __init__(self, source: Source, request: RequestHead, limit: int) -> None:
        self.source = source
        self.limit = limit
        self._events: list[Message] = []
        self._size = 0
        self._ended = False  # the END is in the buffer
        self._has_body = request.framing is not Framing.NONE and request.content_length != 0
        too_long = request.content_length is not None and request.content_length > limit
        self._keeping = not too_long
        self._lost = False

    @property
    def state(self) -> Body:
        if self._lost:
            return Body.LOST
        return Body.HELD if self._has_body else Body.NONE

    def complete(self) -> bytes | None:
        """The whole body when all of it is held (``b""`` for none), else None."""
        if self._lost or not self._ended:
            return None
        return b"".join(e.data for e in self._events if isinstance(e, Data))

    def for_try(self) -> TryBody:
        """The body for one more try. Only the latest try may read (tries are sequential)."""
        if self._lost:
            raise AssertionError("a body that was not kept cannot be sent again")
        return TryBody(self)

    async def _pull(self) -> Message | None:
        event = await self.source.next_event()
        if event is None:
            return None
        if self._keeping:
            if isinstance(event, Data):
                self._size += len(event.data)
                if self._size > self.limit:
                    self._keeping = False
                    self._events.clear()
            if self._keeping:
                self._events.append(event)
                self._ended = event is END
        if not self._keeping:
            self._lost = True
        return event


class TryBody:
    """One try's view of a ``ReplayBody`` (an ``exchange.BodySource``)."""

    def __init__(self, body: ReplayBody) -> None:
        self._body = body
        self._position = 0
        self.message_done = False

    async def next_event(self) -> Message | None:
        body = self._body
        event: Message | None
        if self._position < len(body._events):
            event = body._events[self._position]
            self._position += 1
        else:
            event = await body._pull()
            if body._keeping:
                self._position = len(body._events)
        if event is END:
            self.message_done = True
        return event
