"""The outbound policy: pure checks of addresses and URLs, then real sockets on loopback.

"Zero connections" is proved, not assumed: after the refusal the test opens one connection of
its own to the counting listener and waits until the listener has accepted it; connections are
accepted in arrival order, so any connection the client had made would have been counted first.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from adapters import outbound
from adapters.outbound import (
    GuardedResolver,
    OutboundPolicy,
    OutboundRefused,
    forbidden_address,
    guarded_session,
    parse_allowed_hosts,
)
from tests.listener import Listener

MakeServer = Callable[..., Awaitable[TestServer]]
VENICE = {"venice": frozenset({"api.venice.ai"})}
QUICK = aiohttp.ClientTimeout(total=2)

# --- forbidden_address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.1.2.3", "reserved"),
        ("192.0.0.9", "reserved"),
        ("198.18.0.1", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::ffff:127.0.0.1", "IPv4 wrapped in IPv6"),
        ("::ffff:8.8.8.8", "IPv4 wrapped in IPv6"),
        ("::127.0.0.2", "IPv4 wrapped in IPv6"),
        ("::ffff:0:7f00:1", "IPv4 wrapped in IPv6"),
        ("64:ff9b::7f00:1", "IPv4 wrapped in IPv6"),
        ("64:ff9b:1::a00:1", "IPv4 wrapped in IPv6"),
        ("2002:7f00:1::", "IPv4 wrapped in IPv6"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "IPv4 wrapped in IPv6"),
        ("192.0.2.1", "not globally routable"),
        ("2001:db8::1", "not globally routable"),
        ("fec0::1", "not globally routable"),
        ("100::1", "reserved"),
        ("2001:2::1", "not globally routable"),
    ],
)
def test_forbidden_address_names_the_reason(address: str, reason: str) -> None:
    assert forbidden_address(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "2a00:1450::1"]
)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert forbidden_address(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("network", "reason"),
    [
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("100.64.0.0/10", "CGNAT"),
        ("224.0.0.0/4", "multicast"),
        ("fc00::/7", "private"),
        ("ff00::/8", "multicast"),
        ("fe80::/10", "link-local"),
    ],
)
@given(data=st.data())
def test_every_address_of_a_forbidden_network_is_refused(
    network: str, reason: str, data: st.DataObject
) -> None:
    address = data.draw(st.ip_addresses(network=network))
    assert forbidden_address(address) == reason


@given(st.ip_addresses(v=4))
def test_every_ipv4_wrapped_in_ipv6_is_refused(v4: ipaddress.IPv4Address) -> None:
    n = int(v4)
    wrapped = [
        0xFFFF << 32 | n,  # ::ffff:a.b.c.d
        n,  # ::a.b.c.d
        0x64FF9B << 96 | n,  # 64:ff9b::a.b.c.d
        0x0064_FF9B_0001 << 80 | n,  # 64:ff9b:1::a.b.c.d
        0x2002 << 112 | n << 80,  # 2002:abcd:abcd::
        0x2001_0000 << 96 | (~n & 0xFFFFFFFF),  # Teredo
    ]
    for value in wrapped:
        assert forbidden_address(ipaddress.IPv6Address(value)) is not None
    assert OutboundPolicy().is_trusted(f"http://[::ffff:{v4}]/") is False
    with pytest.raises(OutboundRefused):
        OutboundPolicy().check_url(f"http://[::ffff:{v4}]:8080/")


@given(st.ip_addresses())
def test_nothing_allowed_is_outside_global_unicast(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    if forbidden_address(address) is None:
        assert address.is_global
        assert not address.is_multicast


# --- check_url, is_trusted, check_base_url ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url at all", "scheme not allowed"),
        ("ftp://example.com/x", "scheme not allowed"),
        ("file:///etc/passwd", "scheme not allowed"),
        ("gopher://example.com/", "scheme not allowed"),
        ("//example.com/x", "scheme not allowed"),
        ("http:///x", "no host"),
        ("http:example.com", "no host"),
        ("https://user:pass@example.com/", "credentials"),
        ("https://user@example.com/", "credentials"),
        ("https://:@example.com/", "credentials"),
        ("https://api.venice.ai@evil.example/", "credentials"),
        ("http://example.com:0/", "invalid port"),
        ("http://example.com:99999/", "malformed URL"),
        ("http://example.com:http/", "malformed URL"),
        ("http://127.0.0.1/", "loopback"),
        ("http://127.0.0.1:8080/sim/api/v1/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://10.0.0.5/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://[::ffff:127.0.0.1]/", "IPv4 wrapped in IPv6"),
        ("http://[::ffff:7f00:1]/", "IPv4 wrapped in IPv6"),
        ("http://[64:ff9b::a00:1]/", "IPv4 wrapped in IPv6"),
        ("http://[fe80::1%25eth0]/", "link-local"),
        ("http://127.1/", "non-standard IP address"),
        ("http://2130706433/", "non-standard IP address"),
        ("http://0x7f.0.0.1/", "non-standard IP address"),
        ("http://0x7f000001/", "non-standard IP address"),
        ("http://017700000001/", "non-standard IP address"),
        ("http://0177.0.0.1/", "non-standard IP address"),
        ("http://127.000.000.001/", "non-standard IP address"),
        ("http://8.8.8.8./", "non-standard IP address"),
        ("http://example.123/", "non-standard IP address"),
        ("http://a b.example/", "malformed host name"),
        ("http://%31%32%37.0.0.1/", "non-standard IP address"),
        ("http://ex%41mple.com/", "malformed host name"),
        ("http://a..b.example/", "malformed host name"),
        ("http://-bad.example/", "malformed host name"),
    ],
)
def test_check_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(OutboundRefused, match=reason):
        OutboundPolicy().check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.venice.ai/api/v1/video/queue",
        "HTTPS://API.Venice.AI./api/v1",
        "http://8.8.8.8:8080/x?y=1#z",
        "http://[2606:4700:4700::1111]/",
        "https://bücher.example/",
        "http://localhost:8080/",  # a name: the resolver judges it, not the static check
        "http://under_score.example/",
    ],
)
def test_check_url_accepts(url: str) -> None:
    OutboundPolicy().check_url(url)


def test_allow_private_admits_private_literals_but_not_malformed_urls() -> None:
    policy = OutboundPolicy(allow_private=True)
    for url in (
        "http://127.0.0.1:8080/",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://[::ffff:7f00:1]/",
    ):
        policy.check_url(url)
    for url in ("http://127.1/", "http://u:p@127.0.0.1/", "file:///x", "http://127.0.0.1:0/"):
        with pytest.raises(OutboundRefused):
            policy.check_url(url)


SIM = "http://127.0.0.1:8080/sim/api/v1/"


@pytest.mark.parametrize(
    ("url", "trusted"),
    [
        ("http://127.0.0.1:8080/sim/api/v1/", True),
        ("http://127.0.0.1:8080/sim/api/v1", True),
        ("http://127.0.0.1:8080/sim/api/v1/video/queue?x=1", True),
        ("HTTP://127.0.0.1:8080/sim/api/v1/video", True),
        ("http://127.0.0.1:8080/sim/api/v1/./video", True),
        ("http://127.0.0.1:8080/sim/api/v1x", False),
        ("http://127.0.0.1:8080/sim/api/v1x/", False),
        ("http://127.0.0.1:8080/sim/api/", False),
        ("http://127.0.0.1:8080/admin", False),
        ("http://127.0.0.1:8080/sim/api/v1/../../admin", False),
        ("http://127.0.0.1:8080/sim/api/v1/%2e%2e/%2e%2e/admin", False),
        ("http://127.0.0.1:8080/sim/api/v1/..%2F..%2Fadmin", False),
        ("http://127.0.0.1:8080/sim/api/v1/%5C..", False),
        ("http://127.0.0.1:8081/sim/api/v1/", False),
        ("http://127.0.0.1/sim/api/v1/", False),
        ("https://127.0.0.1:8080/sim/api/v1/", False),
        ("http://localhost:8080/sim/api/v1/", False),
        ("http://[::ffff:127.0.0.1]:8080/sim/api/v1/", False),
        ("http://u:p@127.0.0.1:8080/sim/api/v1/", False),
    ],
)
def test_trusted_prefix_matches_on_origin_and_path_boundary(url: str, trusted: bool) -> None:
    policy = OutboundPolicy(trusted_prefixes=(SIM,))
    assert policy.is_trusted(url) is trusted
    if trusted:
        policy.check_url(url)


def test_trusted_prefix_port_may_be_explicit_or_default() -> None:
    policy = OutboundPolicy(trusted_prefixes=("http://Sim.Internal./x/",))
    assert policy.is_trusted("http://sim.internal:80/x/y")
    assert policy.is_trusted("http://SIM.internal/x")
    assert not policy.is_trusted("http://sim.internal:8080/x/y")
    root = OutboundPolicy(trusted_prefixes=("http://10.0.0.7:9000",))
    assert root.is_trusted("http://10.0.0.7:9000/anything/at/all")


@pytest.mark.parametrize(
    "prefix", ["ftp://h/", "http:///x", "http://u:p@h/", "http://h/x?q=1", "http://127.1/"]
)
def test_malformed_trusted_prefix_fails_at_construction(prefix: str) -> None:
    with pytest.raises(ValueError, match="trusted prefix"):
        OutboundPolicy(trusted_prefixes=(prefix,))


@pytest.mark.parametrize(
    "url",
    ["https://api.venice.ai/api/v1", "https://API.VENICE.AI./api/v1", "http://api.venice.ai:8443/"],
)
def test_base_url_on_the_allow_list(url: str) -> None:
    OutboundPolicy(allowed_hosts=VENICE).check_base_url("venice", url)


@pytest.mark.parametrize(
    ("provider", "url", "reason"),
    [
        ("venice", "https://evil.example/api/v1", "host not allowed"),
        ("venice", "https://api.venice.ai.evil.example/", "host not allowed"),
        ("venice", "https://venice.ai/", "host not allowed"),
        ("venice", "https://x.api.venice.ai/", "host not allowed"),
        ("venice", "https://api.venice.ai@evil.example/", "credentials"),
        ("venice", "ftp://api.venice.ai/", "scheme"),
        ("venice", "http://127.0.0.1:8080/sim/api/v1x", "loopback"),
        ("other", "https://api.venice.ai/", "unknown provider"),
        ("other", SIM, "unknown provider"),
    ],
)
def test_base_url_refused(provider: str, url: str, reason: str) -> None:
    policy = OutboundPolicy(trusted_prefixes=(SIM,), allowed_hosts=VENICE)
    with pytest.raises(OutboundRefused, match=reason):
        policy.check_base_url(provider, url)


def test_trusted_base_url_skips_the_allow_list() -> None:
    policy = OutboundPolicy(trusted_prefixes=(SIM,), allowed_hosts=VENICE)
    policy.check_base_url("venice", SIM)
    policy.check_base_url("venice", SIM + "video")


def test_allow_list_entries_are_normalised_when_compared() -> None:
    policy = OutboundPolicy(allowed_hosts={"venice": frozenset({"API.Venice.ai."})})
    policy.check_base_url("venice", "https://api.venice.ai/")


def test_parse_allowed_hosts() -> None:
    assert parse_allowed_hosts(" API.venice.ai. , ,backup.Example.COM..,") == {
        "api.venice.ai",
        "backup.example.com",
    }
    assert parse_allowed_hosts("") == frozenset()
    assert parse_allowed_hosts("bücher.example") == {"xn--bcher-kva.example"}
    OutboundPolicy(allowed_hosts={"p": parse_allowed_hosts("Bücher.example")}).check_base_url(
        "p", "https://BÜCHER.example/"
    )


# --- real sockets ------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: bytes


@dataclass
class Upstream:
    """An aiohttp server whose /sim/api/v1/ paths answer 200 "ok", or a scripted redirect."""

    server: TestServer
    seen: list[Seen] = field(default_factory=list)
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @property
    def prefix(self) -> str:
        return self.url("/sim/api/v1/")


async def start_upstream(aiohttp_server: MakeServer) -> Upstream:
    holder: list[Upstream] = []

    async def handle(req: web.Request) -> web.StreamResponse:
        upstream = holder[0]
        upstream.seen.append(
            Seen(req.method, req.path, req.headers.get("Authorization"), await req.read())
        )
        if req.path in upstream.redirects:
            status, location = upstream.redirects[req.path]
            return web.Response(
                status=status, headers={"Location": location}, text="UPSTREAM-SECRET"
            )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    holder.append(Upstream(server))
    return holder[0]


@pytest.fixture
async def upstream(aiohttp_server: MakeServer) -> Upstream:
    return await start_upstream(aiohttp_server)


@pytest.fixture
async def trusted() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class StaticResolver(AbstractResolver):
    """Answers from a fixed table, so tests can name hosts that no real DNS knows."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


async def call(
    policy: OutboundPolicy,
    trusted: aiohttp.ClientSession,
    method: str,
    url: str,
    **kwargs: Any,
) -> tuple[int, str]:
    async with (
        guarded_session(policy) as guarded,
        outbound.request(policy, guarded, trusted, method, url, timeout=QUICK, **kwargs) as resp,
    ):
        return resp.status, await resp.text()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",  # a name: refused by GuardedResolver
        "LocalHost",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
    ],
)
async def test_loopback_is_refused_without_a_connection(
    listener: Listener, trusted: aiohttp.ClientSession, host: str
) -> None:
    with pytest.raises(OutboundRefused):
        await call(OutboundPolicy(), trusted, "GET", listener.url(host=host))
    assert await listener.accepted_before_now() == []


async def test_guarded_session_alone_refuses_names_and_literals(listener: Listener) -> None:
    """The session guards without request(): the resolver refuses the name, the middleware
    the literal, and OutboundRefused comes out of aiohttp unwrapped."""
    async with guarded_session(OutboundPolicy()) as guarded:
        with pytest.raises(OutboundRefused, match="resolves to a refused address: loopback"):
            await guarded.get(listener.url(host="localhost"), timeout=QUICK)
        with pytest.raises(OutboundRefused, match="address refused: loopback"):
            await guarded.get(listener.url(), timeout=QUICK)
    assert await listener.accepted_before_now() == []


async def test_a_name_with_any_forbidden_address_is_refused(listener: Listener) -> None:
    inner = StaticResolver({"mixed.test": ["8.8.8.8", "127.0.0.1"]})
    async with guarded_session(OutboundPolicy(), inner_resolver=inner) as guarded:
        with pytest.raises(OutboundRefused, match="loopback"):
            await guarded.get(f"http://mixed.test:{listener.port}/", timeout=QUICK)
    assert inner.asked == ["mixed.test"]
    assert await listener.accepted_before_now() == []


async def test_connection_is_pinned_to_the_resolved_address(
    listener: Listener, trusted: aiohttp.ClientSession
) -> None:
    """sim.test exists only in the guard's inner resolver: reaching the listener shows the
    connector used the address the guard checked, with no second lookup."""
    inner = StaticResolver({"sim.test": ["127.0.0.1"]})
    policy = OutboundPolicy(allow_private=True)
    async with (
        guarded_session(policy, inner_resolver=inner) as guarded,
        outbound.request(
            policy, guarded, trusted, "GET", f"http://sim.test:{listener.port}/x"
        ) as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "listener"
    assert inner.asked == ["sim.test"]
    assert b"Host: sim.test:" in listener.heads[0]


async def test_allow_private_reaches_the_listener(
    listener: Listener, trusted: aiohttp.ClientSession
) -> None:
    policy = OutboundPolicy(allow_private=True)
    assert await call(policy, trusted, "GET", listener.url()) == (200, "listener")
    assert await call(policy, trusted, "GET", listener.url(host="localhost")) == (200, "listener")
    assert len(await listener.accepted_before_now()) == 2


async def test_trusted_prefix_is_reachable(
    upstream: Upstream, trusted: aiohttp.ClientSession
) -> None:
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    assert await call(policy, trusted, "GET", upstream.url("/sim/api/v1/video")) == (200, "ok")
    with pytest.raises(OutboundRefused, match="loopback"):
        await call(policy, trusted, "GET", upstream.url("/sim/api/v1x"))
    assert [seen.path for seen in upstream.seen] == ["/sim/api/v1/video"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_redirect_from_trusted_to_untrusted_loopback_is_refused(
    upstream: Upstream, listener: Listener, trusted: aiohttp.ClientSession, host: str
) -> None:
    upstream.redirects["/sim/api/v1/go"] = (302, listener.url(host=host))
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    with pytest.raises(OutboundRefused) as refused:
        await call(policy, trusted, "GET", upstream.url("/sim/api/v1/go"))
    assert "UPSTREAM" not in str(refused.value)
    assert await listener.accepted_before_now() == []


async def test_redirect_outside_the_prefix_on_the_same_server_is_refused(
    upstream: Upstream, trusted: aiohttp.ClientSession
) -> None:
    upstream.redirects["/sim/api/v1/go"] = (307, "/admin")
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    with pytest.raises(OutboundRefused, match="loopback"):
        await call(policy, trusted, "GET", upstream.url("/sim/api/v1/go"))
    assert [seen.path for seen in upstream.seen] == ["/sim/api/v1/go"]


async def test_auto_followed_redirects_of_the_guarded_session_are_checked(
    upstream: Upstream, listener: Listener
) -> None:
    upstream.redirects["/sim/api/v1/go"] = (302, listener.url())
    async with guarded_session(OutboundPolicy(trusted_prefixes=(upstream.prefix,))) as guarded:
        with pytest.raises(OutboundRefused, match="loopback"):
            await guarded.get(upstream.url("/sim/api/v1/go"), timeout=QUICK)
    assert await listener.accepted_before_now() == []


async def test_redirect_to_another_trusted_path_is_followed(
    upstream: Upstream, trusted: aiohttp.ClientSession
) -> None:
    upstream.redirects["/sim/api/v1/go"] = (302, "done?x=1")
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    assert await call(policy, trusted, "GET", upstream.url("/sim/api/v1/go")) == (200, "ok")
    assert [seen.path for seen in upstream.seen] == ["/sim/api/v1/go", "/sim/api/v1/done"]


async def test_too_many_redirects(upstream: Upstream, trusted: aiohttp.ClientSession) -> None:
    upstream.redirects["/sim/api/v1/a"] = (302, "/sim/api/v1/b")
    upstream.redirects["/sim/api/v1/b"] = (301, "/sim/api/v1/a")
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    with pytest.raises(OutboundRefused, match="too many redirects"):
        await call(policy, trusted, "GET", upstream.url("/sim/api/v1/a"), max_redirects=2)
    assert len(upstream.seen) == 3


@pytest.mark.parametrize(
    ("status", "method", "next_method", "next_body"),
    [
        (303, "POST", "GET", b""),
        (302, "POST", "GET", b""),
        (301, "POST", "GET", b""),
        (307, "POST", "POST", b"payload"),
        (308, "PUT", "PUT", b"payload"),
        (302, "PUT", "PUT", b"payload"),
    ],
)
async def test_redirect_method_and_body(
    upstream: Upstream,
    trusted: aiohttp.ClientSession,
    status: int,
    method: str,
    next_method: str,
    next_body: bytes,
) -> None:
    upstream.redirects["/sim/api/v1/jobs"] = (status, "/sim/api/v1/jobs/1")
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    url = upstream.url("/sim/api/v1/jobs")
    assert await call(policy, trusted, method, url, data=b"payload") == (200, "ok")
    first, second = upstream.seen
    assert (first.method, first.body) == (method, b"payload")
    assert (second.method, second.body) == (next_method, next_body)


async def test_redirect_that_would_resend_a_stream_is_refused(
    upstream: Upstream, trusted: aiohttp.ClientSession
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"chunk"

    upstream.redirects["/sim/api/v1/up"] = (307, "/sim/api/v1/elsewhere")
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    with pytest.raises(OutboundRefused, match="streamed body"):
        await call(policy, trusted, "POST", upstream.url("/sim/api/v1/up"), data=body())
    assert len(upstream.seen) == 1


async def test_authorization_is_not_sent_to_another_origin(
    aiohttp_server: MakeServer, trusted: aiohttp.ClientSession
) -> None:
    home = await start_upstream(aiohttp_server)
    other = await start_upstream(aiohttp_server)
    home.redirects["/sim/api/v1/same"] = (307, "/sim/api/v1/next")
    home.redirects["/sim/api/v1/away"] = (307, other.url("/sim/api/v1/there"))
    other.redirects["/sim/api/v1/there"] = (307, home.url("/sim/api/v1/back"))
    policy = OutboundPolicy(trusted_prefixes=(home.prefix, other.prefix))
    auth = {"Authorization": "Bearer sk-secret", "Cookie": "session=1"}

    await call(policy, trusted, "GET", home.url("/sim/api/v1/same"), headers=auth)
    assert [(s.path, s.authorization) for s in home.seen] == [
        ("/sim/api/v1/same", "Bearer sk-secret"),
        ("/sim/api/v1/next", "Bearer sk-secret"),
    ]

    home.seen.clear()
    await call(policy, trusted, "GET", home.url("/sim/api/v1/away"), headers=auth)
    assert [(s.path, s.authorization) for s in other.seen] == [("/sim/api/v1/there", None)]
    # Once dropped, credentials stay dropped, even back on the original origin.
    assert [(s.path, s.authorization) for s in home.seen] == [
        ("/sim/api/v1/away", "Bearer sk-secret"),
        ("/sim/api/v1/back", None),
    ]
    assert auth == {"Authorization": "Bearer sk-secret", "Cookie": "session=1"}


@pytest.mark.parametrize(
    "location",
    ["ftp://SECRET/", "http://u:SECRET@example.com/", "http://127.0.0.1:1/SECRET"],
)
async def test_refusals_of_redirects_never_echo_the_location(
    upstream: Upstream, trusted: aiohttp.ClientSession, location: str
) -> None:
    upstream.redirects["/sim/api/v1/go"] = (302, location)
    policy = OutboundPolicy(trusted_prefixes=(upstream.prefix,))
    with pytest.raises(OutboundRefused) as refused:
        await call(policy, trusted, "GET", upstream.url("/sim/api/v1/go"))
    assert "SECRET" not in str(refused.value)


async def test_request_rejects_arguments_that_bypass_the_policy(
    trusted: aiohttp.ClientSession,
) -> None:
    for argument in ("allow_redirects", "proxy"):
        with pytest.raises(TypeError, match=argument):
            await call(OutboundPolicy(), trusted, "GET", "https://example.com/", **{argument: None})
    with pytest.raises(TypeError, match="resolver"):
        guarded_session(OutboundPolicy(), resolver=GuardedResolver())
