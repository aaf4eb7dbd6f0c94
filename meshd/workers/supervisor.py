"""The supervisor's side of the worker processes: ``WorkerSet`` stands where a ``Proxy`` stands
in the daemon's lifetime tree when ``workers`` is more than one.

    WorkerSet.run
      ├─ external resolver     (external destinations' endpoints: looked up once per host,
      │                         sent to every worker with the view)
      ├─ view follower         (a changed view is sent to every worker, coalesced)
      └─ one runner per worker (start it, send it what changes, read what it says; a worker
                                that ends unbidden is started again, after a backoff)

``run`` binds every listener (or adopts the inherited socket for its address) in this process,
which keeps them: each worker gets the same sockets and accepts on them, a worker that dies
loses no queued connection, and a successor (``meshd.daemon.handover``) takes them from here.
Every message to a worker goes through its outbox, in the order it was posted, so a worker
never sees a configuration before the identities it needs. ``drain`` tells every worker to
drain and waits for them to end; ``gather`` asks every worker for its metrics and proxy state
(the admin API shows the whole host: ``meshd.workers.plan``)."""

from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from prometheus_client.metrics_core import Metric

from meshd.backoff import backoff_delay
from meshd.config.schema import HostConfig, LocalService, Upstream
from meshd.errors import ProxyError
from meshd.identity.tls import TLSState
from meshd.listen_fds import InheritedSockets
from meshd.metrics import Metrics
from meshd.proxy.core.view import ViewCell
from meshd.proxy.external import ExternalResolver
from meshd.proxy.server import ListenerSpec, bind_spec, listener_specs, outbound_spec
from meshd.workers import messages as m
from meshd.workers.channel import Channel, ChannelClosed
from meshd.workers.plan import merge_endpoint_states, merge_open

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # from spawning a worker to its Ready
COLLECT_TIMEOUT = 2.0  # a worker that does not answer a Collect in time is left out
REQUEST_TIMEOUT = 10.0  # other requests (a listener added or closed)
STOP_GRACE = 2.0  # past the drain deadline, before a worker is killed
OUTBOX = 4096  # messages waiting for one worker


@dataclass(eq=False)
class _Worker:
    index: int
    outbox_send: trio.MemorySendChannel[Any]
    outbox_receive: trio.MemoryReceiveChannel[Any]
    process: trio.Process | None = None
    channel: Channel | None = None
    ready: bool = False
    restarts: int = 0
    view_pending: bool = False  # a view marker sits in the outbox
    collected: m.Collected | None = None
    pending: dict[int, tuple[trio.Event, list[m.Reply]]] = field(default_factory=dict)


class _ViewMarker:
    """In an outbox: send the view in force when this comes up (coalesces view changes)."""


class WorkerSet:
    def __init__(self, config: HostConfig, view: ViewCell, tls: TLSState, metrics: Metrics,
                 count: int, *, inherited: InheritedSockets | None = None,
                 spares: Spares | None = None) -> None:
        self._spares = spares or Spares()
        self.config = config
        self.view = view
        self.tls = tls
        self.metrics = metrics
        self.count = count
        self._inherited = inherited
        self.resolver = ExternalResolver(view)  # one lookup per host, for every worker
        self._sockets: dict[str, tuple[ListenerSpec, list[trio.SocketListener]]] = {}
        self._workers: list[_Worker] = []
        for index in range(count):
            send, receive = trio.open_memory_channel[Any](OUTBOX)
            self._workers.append(_Worker(index, send, receive))
        self._seq = 0
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        self._endpoint_states: dict[str, list[dict[str, Any]]] = {}
        self._open: dict[str, int] = {"inbound": 0, "outbound": 0, "gateway": 0}
        self._tls_generation = tls.generation
        view.changed.append(self._view_changed)
        tls.watchers.append(self._tls_changed)

    # -- addresses (useful with port 0) ----------------------------------------------------------

    def _address(self, key: str) -> tuple[str, int]:
        found = self._sockets.get(key)
        if found is None or not found[1]:
            raise KeyError(f"no listener {key}")
        host, port = found[1][0].socket.getsockname()[:2]
        return host, port

    @property
    def inbound_address(self) -> tuple[str, int]:
        return self._address("inbound:mesh")

    @property
    def egress_address(self) -> tuple[str, int]:
        return self._address("outbound:egress")

    def outbound_address(self, service: str, upstream: str) -> tuple[str, int]:
        return self._address(f"outbound:{service}->{upstream}")

    def gateway_address(self, gateway: str, index: int = 0) -> tuple[str, int]:
        found = [key for key in self._sockets
                 if key.startswith(f"gateway:{gateway}:")]
        if index >= len(found):
            raise KeyError(f"no listener {index} for gateway {gateway}")
        return self._address(found[index])

    def listening_sockets(self) -> list[tuple[str, trio.socket.SocketType]]:
        """``(direction, socket)`` of every listening socket (to hand to a successor)."""
        return [(spec.direction, sock.socket)
                for spec, sockets in self._sockets.values() for sock in sockets]

    # -- the host's view, from every worker ------------------------------------------------------

    def open_connections(self) -> dict[str, int]:
        return dict(self._open)

    def endpoint_states(self) -> dict[str, list[dict[str, Any]]]:
        return self._endpoint_states

    def collected(self) -> list[m.Collected]:
        """Each worker's last answer to ``gather`` (those that answered)."""
        return [w.collected for w in self._workers if w.collected is not None]

    def worker_families(self) -> list[list[Metric]]:
        return [w.collected.families for w in self._workers if w.collected is not None]

    def processes(self) -> list[dict[str, Any]]:
        """Each worker's pid, CPU seconds, RSS and accepted connections open
        (``/v1/state``'s ``process.workers``)."""
        import psutil  # as the daemon's own state: loaded by the first /v1/state

        out = []
        for worker in self._workers:
            row: dict[str, Any] = {"index": worker.index, "ready": worker.ready,
                                   "restarts": worker.restarts}
            if worker.collected is not None:  # (as of the last gather)
                row["connections"] = dict(worker.collected.open_connections)
            if worker.process is not None and worker.process.returncode is None:
                try:
                    proc = psutil.Process(worker.process.pid)
                    with proc.oneshot():
                        row.update(pid=proc.pid, cpu_seconds=sum(proc.cpu_times()[:2]),
                                   rss_bytes=proc.memory_info().rss)
                except psutil.Error:
                    pass
            out.append(row)
        return out

    async def gather(self) -> None:
        """Ask every worker for its metrics and proxy state (at most ``COLLECT_TIMEOUT``):
        what ``/metrics`` and ``/v1/state`` show next. A worker that does not answer keeps
        its last answer."""
        async def ask(worker: _Worker) -> None:
            if not worker.ready:
                return
            reply = None
            with trio.move_on_after(COLLECT_TIMEOUT):
                reply = await self._request(worker, m.Collect)
            if reply is not None and isinstance(reply.value, m.Collected):
                worker.collected = reply.value

        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(ask, worker)
        answered = [w.collected for w in self._workers if w.collected is not None]
        self._endpoint_states = merge_endpoint_states([c.endpoint_states for c in answered])
        self._open = {"inbound": 0, "outbound": 0, "gateway": 0,
                      **merge_open([c.open_connections for c in answered])}

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            for spec in listener_specs(self.config):
                self._sockets[spec.key] = (spec, await bind_spec(spec, self._inherited))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.resolver.run)
                async with trio.open_nursery() as starting:  # all at once: a restart is
                    for worker in self._workers:              # as short as one start
                        starting.start_soon(partial(nursery.start, self._run_worker, worker))
                for spec, sockets in self._sockets.values():
                    host, port = sockets[0].socket.getsockname()[:2]
                    log.info("%s listener %s on %s:%d", spec.direction, spec.name, host, port)
                log.info("%d worker processes serving: pids %s", self.count,
                         ", ".join(str(w.process.pid) for w in self._workers if w.process))
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_sockets()
                for worker in self._workers:
                    await self._end_process(worker, 0)

    async def drain(self, deadline: float) -> None:
        """Tell every worker to drain until ``deadline`` and wait for them to end (killing any
        still running ``STOP_GRACE`` later); then the listening sockets close here."""
        self._stopping = True
        seconds = max(0.0, deadline - trio.current_time())
        for worker in self._workers:
            self._post(worker, m.Drain(seconds))
        with trio.move_on_at(deadline + STOP_GRACE):
            for worker in self._workers:
                if worker.process is not None:
                    await worker.process.wait()
        for worker in self._workers:
            await self._end_process(worker, 0)
        await self._close_sockets()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _close_sockets(self) -> None:
        for _spec, sockets in self._sockets.values():
            for sock in sockets:
                await trio.aclose_forcefully(sock)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- a reload: configuration, listeners ----------------------------------------------------

    def set_config(self, config: HostConfig) -> None:
        self.config = config
        for worker in self._workers:
            self._post(worker, m.SetConfig(config))

    async def add_outbound(self, service: LocalService, upstream: Upstream
                           ) -> list[trio.socket.SocketType]:
        """Bind ``service``'s listener for ``upstream`` here and hand it to every worker. A port
        that cannot be bound is a ``ProxyError``, and nothing changed."""
        if self._stopping:
            raise ProxyError("the proxy is not accepting connections (stopping)")
        spec = outbound_spec(self.config, service, upstream)
        sockets = await bind_spec(spec, None)
        self._sockets[spec.key] = (spec, sockets)
        fds = [s.socket.fileno() for s in sockets]
        with trio.move_on_after(REQUEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for worker in self._workers:
                    nursery.start_soon(self._request, worker, lambda seq: m.AddListener(
                        seq, service, upstream, len(fds)), fds)
        host, port = sockets[0].socket.getsockname()[:2]
        log.info("outbound listener %s on %s:%d (added by a reload)", spec.name, host, port)
        return [s.socket for s in sockets]

    async def remove_outbound(
        self, service: str, upstream: str, deadline: float,
        *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Close the listener here and in every worker (started once all have closed it: the
        port refuses from then on); each worker drains its connections until ``deadline``."""
        key = f"outbound:{service}->{upstream}"
        found = self._sockets.pop(key, None)
        if found is None:
            task_status.started([])
            return 0
        addresses = [sock.socket.getsockname()[:2] for sock in found[1]]
        seconds = max(0.0, deadline - trio.current_time())
        with trio.move_on_after(REQUEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for worker in self._workers:
                    nursery.start_soon(self._request, worker, lambda seq: m.CloseListener(
                        seq, service, upstream, seconds))
        for sock in found[1]:
            await trio.aclose_forcefully(sock)
        task_status.started([(str(host), int(port)) for host, port in addresses])
        log.info("outbound listener %s->%s removed", service, upstream)
        return 0

    # -- what changes, to every worker -----------------------------------------------------------

    def _view_changed(self) -> None:
        for worker in self._workers:
            if not worker.view_pending:
                worker.view_pending = True
                self._post(worker, _ViewMarker())

    def _tls_changed(self) -> None:
        message = m.SetTLS(self.tls.generation, self.tls.services, self.tls.denied,
                           dict(self.tls.checked))
        for worker in self._workers:
            self._post(worker, message)

    def _post(self, worker: _Worker, message: Any, fds: Sequence[int] = ()) -> None:
        try:
            worker.outbox_send.send_nowait((message, list(fds)))
        except trio.WouldBlock:
            log.error("worker %d is not reading its messages: %s dropped", worker.index,
                      type(message).__name__)
        except trio.ClosedResourceError:
            pass

    async def _request(self, worker: _Worker, make: Any,
                       fds: Sequence[int] = ()) -> m.Reply | None:
        """Send ``make(seq)`` and wait for its ``Reply`` (None: the worker is not running, or
        the caller's deadline came first); a reply with an error is logged."""
        if worker.channel is None:
            return None
        self._seq += 1
        seq = self._seq
        event, slot = trio.Event(), list[m.Reply]()
        worker.pending[seq] = (event, slot)
        self._post(worker, make(seq), fds)
        try:
            await event.wait()
        except trio.Cancelled:
            log.warning("worker %d did not answer %s in time", worker.index,
                        type(make(seq)).__name__)
            raise
        finally:
            worker.pending.pop(seq, None)
        reply = slot[0]
        if reply.error:
            log.error("worker %d: %s", worker.index, reply.error)
        return reply

    # -- one worker's life -----------------------------------------------------------------------

    async def _run_worker(self, worker: _Worker,
                          *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Start the worker, and again whenever it ends unbidden (after a backoff). Started
        once it first serves; a worker that cannot start at first is a ``ProxyError``."""
        first = True
        failures = 0
        while True:
            try:
                await self._serve_worker(worker, task_status if first else None)
                failures = 0
            except ProxyError:
                if first:
                    raise
                failures += 1
            first = False
            if self.stopping:
                return
            worker.restarts += 1
            self.metrics.worker_restarts.inc()
            delay = backoff_delay(failures, random.random())
            log.error("worker %d ended (exit %s): starting it again in %.1fs", worker.index,
                      worker.process.returncode if worker.process else "?", delay)
            await trio.sleep(delay)

    async def _serve_worker(self, worker: _Worker,
                            task_status: trio.TaskStatus[None] | None) -> None:
        spare = self._spares.take()
        try:
            process, channel = spare if spare is not None else await spawn()
        except OSError as exc:  # (out of processes or descriptors: tried again later)
            raise ProxyError(f"cannot start worker {worker.index}: {exc}") from exc
        worker.process, worker.channel = process, channel
        try:
            listeners = [(key, len(sockets)) for key, (_spec, sockets) in self._sockets.items()]
            fds = [s.socket.fileno() for _spec, sockets in self._sockets.values()
                   for s in sockets]
            root = logging.getLogger()
            start = m.Start(
                config=self.config, index=worker.index, count=self.count,
                listeners=tuple(listeners), view=m.ViewParts.of(self.view.current),
                tls_dir=str(self.tls.directory), tls_services=self.tls.services,
                denied=self.tls.denied, certificates=dict(self.tls.checked),
                log_level=root.getEffectiveLevel(),
                log_json=_json_logs(root), fds=len(fds))
            worker.view_pending = False
            try:
                await channel.send(start, fds)
                with trio.fail_after(START_TIMEOUT):
                    ready, _ = await channel.receive()
            except (ChannelClosed, trio.TooSlowError) as exc:
                raise ProxyError(f"worker {worker.index} did not start: {exc}") from exc
            if not isinstance(ready, m.Ready):
                raise ProxyError(f"worker {worker.index} did not start: sent {ready!r}")
            worker.ready = True
            if task_status is not None:
                task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_outbox, worker, channel, nursery.cancel_scope)
                await self._read(worker, channel)
                nursery.cancel_scope.cancel()
        finally:
            worker.ready = False
            worker.channel = None
            channel.close()
            with trio.CancelScope(shield=True):
                await self._end_process(worker, 0 if not self._stopping else STOP_GRACE)

    async def _send_outbox(self, worker: _Worker, channel: Channel,
                           scope: trio.CancelScope) -> None:
        try:
            async for message, fds in worker.outbox_receive:
                if isinstance(message, _ViewMarker):
                    worker.view_pending = False
                    message = m.SetView(m.ViewParts.of(self.view.current))
                await channel.send(message, fds)
                if isinstance(message, m.Drain):
                    return
        except ChannelClosed:
            scope.cancel()

    async def _read(self, worker: _Worker, channel: Channel) -> None:
        while True:
            try:
                message, _fds = await channel.receive()
            except ChannelClosed:
                return
            if isinstance(message, m.Reply):
                waiting = worker.pending.get(message.seq)
                if waiting is not None:
                    waiting[1].append(message)
                    waiting[0].set()
            elif isinstance(message, m.Ejected):
                for other in self._workers:
                    if other is not worker:
                        self._post(other, m.Eject(message.destination, message.ejection))

    async def _end_process(self, worker: _Worker, grace: float) -> None:
        process = worker.process
        if process is None or process.returncode is not None:
            return
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def spawn() -> tuple[trio.Process, Channel]:
    """A worker process, its imports under way, waiting for its ``Start`` on the channel."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshd.workers.worker", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return process, Channel(trio.socket.from_stdlib_socket(parent))


class Spares:
    """Worker processes started before they are needed: a worker's start is mostly Python
    importing its modules, which then overlaps the supervisor's own start (certificates,
    routes, endpoints) instead of following it, so a restarted meshd accepts sooner. Those
    not taken when the daemon ends are killed (``close``)."""

    def __init__(self) -> None:
        self._ready: list[tuple[trio.Process, Channel]] = []

    async def start(self, count: int) -> None:
        for _ in range(count):
            self._ready.append(await spawn())

    def take(self) -> tuple[trio.Process, Channel] | None:
        """A spare still running (one that ended meanwhile is dropped), or None."""
        while self._ready:
            process, channel = self._ready.pop(0)
            if process.returncode is None:
                return process, channel
            channel.close()
        return None

    async def close(self) -> None:
        while self._ready:
            process, channel = self._ready.pop()
            channel.close()  # (it exits when its channel closes; killed to be sure)
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def _json_logs(root: logging.Logger) -> bool:
    from meshd.logformat import JSONFormatter

    return any(isinstance(h.formatter, JSONFormatter) for h in root.handlers)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a systemd CPUAffinity=)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
