"""A TCP listener on 127.0.0.1 that records every connection it accepts, so a test can prove
that the engine never contacted an address the outbound policy forbids (SPEC 9)."""

from __future__ import annotations

import asyncio


class Listener:
    """Answers each HTTP request with 200 "listener" and keeps the request heads."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.heads: list[bytes] = []
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Recorded before any await, so the order of self.peers is the order of acceptance.
        self.peers.append(writer.get_extra_info("peername")[:2])
        self._changed.set()
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nlistener"
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def accepted_before_now(self) -> list[tuple[str, int]]:
        """The connections accepted before one opened now: connect, wait for the listener to
        accept that connection, and return what it had accepted earlier. Connections are
        accepted in order, so any the engine made would be counted first."""
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        me = writer.get_extra_info("sockname")[:2]
        while me not in self.peers:
            self._changed.clear()
            await self._changed.wait()
        writer.close()
        await writer.wait_closed()
        return self.peers[: self.peers.index(me)]
