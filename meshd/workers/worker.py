"""One worker process: the proxy on the listening sockets its supervisor handed it.

    python -m meshd.workers.worker FD     (started by ``meshd.workers.supervisor`` only)

It reads ``Start`` from the channel on ``FD``, loads the host's TLS identities from the state
directory (read-only: the supervisor renews them and says when they changed), serves until
told to ``Drain``, and follows what the supervisor sends meanwhile: routes and endpoints,
configuration, identities and deny list, listeners added and removed, ejections decided by the
other workers. It ignores SIGTERM, SIGINT and SIGHUP (a terminal's Ctrl-C or systemd reach
every process: the supervisor decides when its workers stop, after deregistering), and when
the supervisor is gone (the channel closes) it drains and ends by itself."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

import trio

from meshd.errors import IdentityError
from meshd.identity.tls import TLSState, UncheckedCertificate
from meshd.logformat import LogFormat, configure
from meshd.metrics import Metrics
from meshd.proxy.access import ACCESS_LOGGER
from meshd.proxy.core.outlier import Ejection
from meshd.proxy.core.view import ViewCell
from meshd.proxy.server import Proxy, WorkerRole
from meshd.tracing.tracer import Tracer
from meshd.workers import messages as m
from meshd.workers.channel import Channel, ChannelClosed

log = logging.getLogger(__name__)

ORPHAN_DRAIN = 5.0  # the supervisor is gone: requests in flight get this long
TLS_RETRIES = 5  # a reload caught mid-renewal is tried again (the files were being written)


class Worker:
    def __init__(self, channel: Channel, start: m.Start, fds: list[int]) -> None:
        self.channel = channel
        self.start = start
        config = start.config
        self.metrics = Metrics()
        self.view = ViewCell(start.view.view())
        self.tls = TLSState(start.tls_dir, config.trust_domain, start.tls_services,
                            known=start.certificates)
        self.tls.set_denylist(start.denied)
        self._tls_generation = -1  # the supervisor's generation last followed
        sockets: dict[str, list[socket.socket]] = {}
        taken = iter(fds)
        for key, count in start.listeners:
            sockets[key] = [socket.socket(fileno=next(taken)) for _ in range(count)]
        self._outgoing, self._outbox = trio.open_memory_channel[Any](1024)
        self.tracer = Tracer.for_host(config, os.environ, self.metrics)
        self.proxy = Proxy(config, self.view, self.tls, self.metrics, tracer=self.tracer,
                           worker=WorkerRole(start.count, sockets, self._announce))

    def _announce(self, destination: str, ejection: Ejection) -> None:
        try:
            self._outgoing.send_nowait(m.Ejected(destination, ejection))
        except trio.WouldBlock:  # the supervisor is not reading: its workers decide alone
            log.warning("ejection of %s not announced: the supervisor is not reading",
                        ejection.endpoint)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_outbox)
            await nursery.start(self.tracer.run)
            await nursery.start(self.proxy.run)
            gc.collect()
            gc.freeze()  # start-up's objects live to the end (``daemon.lifetime.settle_heap``)
            await self.channel.send(m.Ready(os.getpid()))
            try:
                await self._follow(nursery)
            except ChannelClosed:
                log.warning("worker %d: the supervisor is gone; draining for %.0fs",
                            self.start.index, ORPHAN_DRAIN)
                with trio.CancelScope(shield=True):
                    await self.proxy.drain(trio.current_time() + ORPHAN_DRAIN)
            nursery.cancel_scope.cancel()

    async def _send_outbox(self) -> None:
        async for message in self._outbox:
            try:
                await self.channel.send(message)
            except ChannelClosed:
                return

    async def _follow(self, nursery: trio.Nursery) -> None:
        while True:
            message, fds = await self.channel.receive()
            if isinstance(message, m.SetView):
                self.view.put(message.view.view())
            elif isinstance(message, m.SetConfig):
                self.proxy.set_config(message.config)
            elif isinstance(message, m.SetTLS):
                await self._set_tls(message)
            elif isinstance(message, m.Eject):
                self.proxy.impose_ejection(message.destination, message.ejection)
            elif isinstance(message, m.Collect):
                await self.channel.send(m.Reply(message.seq, m.Collected(
                    list(self.metrics.registry.collect()), self.proxy.endpoint_states(),
                    self.proxy.open_connections())))
            elif isinstance(message, m.AddListener):
                await self._add_listener(message, fds)
            elif isinstance(message, m.CloseListener):
                closed = await nursery.start(
                    self.proxy.remove_outbound, message.service, message.upstream,
                    trio.current_time() + message.seconds)
                await self.channel.send(m.Reply(message.seq, closed))
            elif isinstance(message, m.Drain):
                with trio.CancelScope(shield=True):
                    await self.proxy.drain(trio.current_time() + message.seconds)
                return
            else:
                log.error("worker %d: unknown message %r ignored", self.start.index, message)

    async def _set_tls(self, message: m.SetTLS) -> None:
        self.tls.services = message.services
        self.tls.known = message.certificates
        if message.generation != self._tls_generation:
            for attempt in range(TLS_RETRIES):
                try:
                    self.tls.reload()
                    break
                except UncheckedCertificate as exc:  # the supervisor's next SetTLS covers it
                    log.info("worker %d: identities not reloaded yet (%s); keeping those in "
                             "force", self.start.index, exc)
                    break
                except IdentityError as exc:
                    log.warning("worker %d: identities not reloaded yet (%s)%s",
                                self.start.index, exc,
                                "" if attempt + 1 < TLS_RETRIES else "; keeping those in force")
                    await trio.sleep(0.2 * (attempt + 1))
            self._tls_generation = message.generation
        self.tls.set_denylist(message.denied)

    async def _add_listener(self, message: m.AddListener, fds: list[int]) -> None:
        self.proxy.give_sockets(message.service, message.upstream,
                                [socket.socket(fileno=fd) for fd in fds])
        try:
            await self.proxy.add_outbound(message.service, message.upstream)
        except Exception as exc:  # (a ProxyError: reported to the supervisor, which logs it)
            await self.channel.send(m.Reply(message.seq, None, str(exc)))
            return
        await self.channel.send(m.Reply(message.seq, True))


def _ignore_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


async def _main(fd: int) -> None:
    channel = Channel.from_fd(fd)
    try:
        start, fds = await channel.receive()
    except ChannelClosed:
        return  # a spare the supervisor never needed (it ended, or did not start a proxy)
    if not isinstance(start, m.Start):
        raise SystemExit(f"meshd worker: expected Start, got {type(start).__name__}")
    _configure_logging(start)
    await Worker(channel, start, fds).run()


class _WorkerTag(logging.Filter):
    """Marks this worker's log records: ``"worker": N`` in JSON lines, ``name[worker N]`` in
    text ones (access-log lines go out as they are)."""

    def __init__(self, index: int, json: bool) -> None:
        super().__init__()
        self.index = index
        self.json = json

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == ACCESS_LOGGER:
            return True  # its readers (``meshd up``'s split, log shippers) know it by name
        if self.json:
            record.worker = self.index
        elif not record.name.endswith("]"):
            record.name = f"{record.name}[worker {self.index}]"
        return True


def _configure_logging(start: m.Start) -> None:
    configure(start.log_level, LogFormat.JSON if start.log_json else LogFormat.TEXT, sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(start.index, start.log_json))


def main(argv: list[str]) -> int:
    _ignore_signals()
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m meshd.workers.worker FD (started by a meshd supervisor)",
              file=sys.stderr)
        return 2
    trio.run(_main, int(argv[0]))
    return 0


__all__ = ["Worker", "main"]

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
