"""A TCP proxy for link faults."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """A TCP proxy to ``host:port`` on its own thread and event loop.

    ``stall()`` stops forwarding in both directions (bytes are held, connections stay
    open: a link that silently stops), ``heal()`` forwards again; ``drop_replies(n, to)``
    forwards the next ``n`` requests containing ``to`` and then closes their connections
    *instead of* forwarding the reply: the server has executed the command, the client
    never learns the result.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._drops = 0
        self._marker = b""
        self.dropped = 0
        self._links: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._call(self._open())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        """A proxy to the Redis server at ``url``; the proxy's ``url`` keeps the scheme,
        credentials and database of ``url``."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 6379)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (
            f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
        )
        proxy.url = urlunsplit(parts._replace(netloc=netloc))
        return proxy

    def stall(self) -> None:
        """Hold every byte from now on (in force when this returns)."""
        self._call(self._set(flowing=False))

    def heal(self) -> None:
        self._call(self._set(flowing=True))

    def drop_replies(self, count: int, to: bytes) -> None:
        self._call(self._set(drops=count, marker=to))

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _set(
        self, *, flowing: bool | None = None, drops: int = 0, marker: bytes = b""
    ) -> None:
        if flowing is not None:
            (self._flowing.set if flowing else self._flowing.clear)()
        if marker:
            self._drops, self._marker = drops, marker

    async def _open(self) -> asyncio.Server:
        self._flowing.set()
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _close(self) -> None:
        self._server.close()
        for task in self._links:
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._link(reader, writer))
        self._links.add(task)
        task.add_done_callback(self._links.discard)

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.transport.abort()
            return
        writers = (client_w, server_w)
        doomed_reply = asyncio.Event()  # this link's next reply is to be dropped
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, writers, doomed_reply, replies=False),
                self._pump(server_r, client_w, writers, doomed_reply, replies=True),
            )
        finally:
            for writer in writers:
                writer.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        doomed_reply: asyncio.Event,
        *,
        replies: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if replies and doomed_reply.is_set():
                    self.dropped += 1
                    for each in writers:
                        each.transport.abort()
                    return
                if not replies and self._drops > 0 and self._marker in data:
                    self._drops -= 1
                    doomed_reply.set()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
