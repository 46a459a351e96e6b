"""The outbound-call policy for URLs that buyers, sellers and providers' answers supply.

SPEC section 9: every URL the engine calls on a user's behalf (an offer's or buyer provider's
``base_url``, a provider's ``download_url``, a ``webhook_url``) is http(s), carries no
credentials, and reaches only public unicast addresses, unless the operator allows private ones
(``OUTBOUND_ALLOW_PRIVATE``) or the URL falls under a prefix the operator configured itself.

The guard has two layers, because aiohttp offers no single place that sees every address:

* **Static checks** (:meth:`OutboundPolicy.check_url`), before any I/O, on the first URL and on
  every redirect target. They are the only guard for IP literals:
  ``TCPConnector._resolve_host`` returns a host that ``helpers.is_ip_address`` calls an address
  (one containing ``":"``, or only digits and dots) without ever asking the resolver, so a
  resolver-level guard never sees ``http://127.0.0.1/`` or ``http://[::ffff:7f00:1]/``.
  Numeric oddities (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``017700000001``) are refused as
  not standard rather than interpreted: aiohttp 3.14 refuses the all-digit ones itself, but older
  releases hand them to the socket layer, and ``0x7f.0.0.1`` is not an "IP address" to aiohttp
  at all, so it reaches ``getaddrinfo``, whose ``inet_aton`` reads it as 127.0.0.1. The verdict
  must not depend on the aiohttp or libc version. URLs are parsed with yarl, the parser aiohttp
  itself uses, and the parsed :class:`yarl.URL` is what is sent, so the checked URL and the
  requested URL cannot differ.

* **A resolver** (:class:`GuardedResolver`) inside the guarded session's ``TCPConnector`` for
  host names. The connector turns the numeric hosts a resolver returns straight into socket
  addresses (``_convert_hosts_to_addr_infos``) and connects to those; nothing resolves the name
  a second time. Checking inside the resolver therefore pins the connection to the checked
  addresses. A pre-flight ``getaddrinfo`` followed by a normal request would check one DNS answer
  and connect to another (DNS rebinding). The connector's DNS cache only ever stores what the
  resolver returned, so it holds checked addresses only; refusals are exceptions and not cached.

The resolver raises :class:`OutboundRefused`, deliberately not an ``OSError``: aiohttp wraps an
``OSError`` from resolution into ``ClientConnectorDNSError``, which callers treat as a transient
network failure and retry, whereas ``connector.connect`` and ``ClientSession._request`` re-raise
any other exception unchanged. Callers catch one exception type whichever layer refused; the
tests check that the exception comes out of aiohttp unchanged.

:func:`request` follows redirects itself (``allow_redirects=False`` on every hop) so that each
``Location`` is statically checked and sent through the right session: a hop to an
operator-trusted prefix goes through the caller's trusted session, anything else through the
guarded one. The guarded session also re-checks every request it sends (a client middleware,
aiohttp >= 3.12), so a caller that uses it directly with aiohttp's own redirect following still
cannot be redirected to an IP literal. Only :func:`request` strips credentials on a cross-origin
hop.

:class:`OutboundRefused` messages are fixed short phrases. They never contain upstream content
(bodies, ``Location`` headers) and never the URL, so they may be shown to the user as they are.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, NamedTuple

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict
from yarl import URL

__all__ = [
    "GuardedResolver",
    "Outbound",
    "OutboundPolicy",
    "OutboundRefused",
    "forbidden_address",
    "guarded_session",
    "parse_allowed_hosts",
    "request",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(Exception):
    """The policy forbids this call. str(e) is a short safe reason (never upstream content)."""


# --- addresses ---------------------------------------------------------------------------------

# Each of these carries an IPv4 address that a gateway or the host's stack may unwrap and reach,
# so the IPv6 form would smuggle a private IPv4 destination past the IPv4 rules.
_WRAPS_IPV4: Final = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::ffff:0:0/96",  # IPv4-mapped
        "::/96",  # IPv4-compatible (deprecated)
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b::/96",  # NAT64, well-known prefix
        "64:ff9b:1::/48",  # NAT64, local-use prefix
        "2002::/16",  # 6to4
        "2001::/32",  # Teredo
    )
)
_PRIVATE: Final = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
# Named explicitly because Python versions disagree on how they classify some of them.
_IPV4_SPECIAL: Final = (
    (ipaddress.IPv4Network("100.64.0.0/10"), "CGNAT"),
    (ipaddress.IPv4Network("0.0.0.0/8"), "reserved"),
    (ipaddress.IPv4Network("192.0.0.0/24"), "reserved"),
    (ipaddress.IPv4Network("198.18.0.0/15"), "reserved"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved"),  # also holds 255.255.255.255
)
# Everything routable in IPv6 lies in 2000::/3; ipaddress calls e.g. site-local fec0::/10 global.
_IPV6_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")


def forbidden_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the address may not be contacted, or None if it is a public unicast address.

    Reasons: "unspecified", "loopback", "IPv4 wrapped in IPv6", "link-local", "multicast",
    "CGNAT", "private", "reserved", "not globally routable".
    """
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _WRAPS_IPV4):
        return "IPv4 wrapped in IPv6"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address):
        for net, reason in _IPV4_SPECIAL:
            if ip in net:
                return reason
    if any(ip in net for net in _PRIVATE):
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _IPV6_GLOBAL_UNICAST:
        return "not globally routable"
    return None


# --- URLs --------------------------------------------------------------------------------------

_SCHEMES: Final = frozenset({"http", "https"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# A last label that a WHATWG URL parser or inet_aton would read as a number makes the whole host
# an IPv4 address to them; no real top-level domain is numeric, so such a host is either a
# canonical dotted quad or refused.
_NUMERIC_LABEL: Final = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.ASCII | re.IGNORECASE)
_NAME_LABEL: Final = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.ASCII)


def _parse(url: str | URL) -> URL:
    """The URL if it passes the checks that need no knowledge of the host."""
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            raise OutboundRefused("malformed URL") from None
    if parsed.scheme not in _SCHEMES:
        raise OutboundRefused("scheme not allowed")
    if not parsed.raw_host:
        raise OutboundRefused("URL has no host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise OutboundRefused("credentials in URL")
    if "@" in (parsed.raw_authority or ""):
        raise OutboundRefused("credentials in URL")
    try:
        port = parsed.port
    except ValueError:
        raise OutboundRefused("invalid port") from None
    if port is None or not 1 <= port <= 65535:
        raise OutboundRefused("invalid port")
    return parsed


def _host_address(url: URL) -> IPAddress | None:
    """The address an IP-literal host names, None for a host name; refuses malformed hosts."""
    host = url.raw_host or ""
    if ":" in host:
        # url.host has the zone id ("%25eth0") decoded, which ipaddress understands.
        try:
            return ipaddress.IPv6Address(url.host or "")
        except ValueError:
            raise OutboundRefused("malformed IP address") from None
    name = host.removesuffix(".")
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
        if address is None or str(address) != host:
            raise OutboundRefused("non-standard IP address")
        return address
    if len(name) > 253 or not all(_NAME_LABEL.fullmatch(label) for label in labels):
        raise OutboundRefused("malformed host name")
    return None


def _normalise_host(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


class _Origin(NamedTuple):
    scheme: str
    host: str
    port: int


def _origin(url: URL) -> _Origin:
    """Scheme, host and port with the default port filled in, so that ``http://h`` and
    ``http://h:80`` are the same origin."""
    port = url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme, 0)
    return _Origin(url.scheme, _normalise_host(url.raw_host or ""), port)


class _Prefix(NamedTuple):
    origin: _Origin
    path: str  # without its trailing "/"; "" trusts the whole origin


@lru_cache(maxsize=32)
def _compile_prefixes(prefixes: tuple[str, ...]) -> tuple[_Prefix, ...]:
    compiled = []
    for prefix in prefixes:
        try:
            url = _parse(prefix)
            _host_address(url)
        except OutboundRefused as refused:
            raise ValueError(f"trusted prefix {prefix!r}: {refused}") from None
        if url.raw_query_string or url.raw_fragment:
            raise ValueError(f"trusted prefix {prefix!r}: a prefix has no query or fragment")
        compiled.append(_Prefix(_origin(url), url.path.rstrip("/")))
    return tuple(compiled)


def _path_is_plain(url: URL) -> bool:
    """Whether the path means the same to every server: no encoded "/" or "\\", no dot
    segments left after yarl's normalisation. Otherwise a server that decodes first could route
    ``/sim/api/v1/..%2Fadmin`` outside the trusted prefix it appears to be under."""
    raw = url.raw_path.lower()
    if "%2f" in raw or "%5c" in raw or "\\" in url.path:
        return False
    return not any(segment in (".", "..") for segment in url.path.split("/"))


@dataclass(frozen=True)
class OutboundPolicy:
    """What the engine may call on a user's behalf. Construct once from the settings."""

    allow_private: bool = False
    # Operator-configured URL prefixes (e.g. "http://127.0.0.1:8080/sim/api/v1/"): a URL that
    # starts with one of them (normalised scheme, lowercase host, explicit-or-default port, path
    # prefix on a "/" boundary) is trusted: the private-address rule does not apply to it.
    trusted_prefixes: tuple[str, ...] = ()
    # Per provider, the hosts a user-supplied base_url may name (lowercase, no trailing dot).
    allowed_hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A mistyped operator prefix should stop the engine at start, not silently trust nothing.
        _compile_prefixes(self.trusted_prefixes)

    def is_trusted(self, url: str | URL) -> bool:
        """Whether ``url`` lies under one of the operator's trusted prefixes."""
        try:
            parsed = _parse(url)
        except OutboundRefused:
            return False
        return self._trusted(parsed)

    def _trusted(self, url: URL) -> bool:
        if not self.trusted_prefixes or not _path_is_plain(url):
            return False
        origin = _origin(url)
        path = url.path
        return any(
            prefix.origin == origin
            and (not prefix.path or path == prefix.path or path.startswith(prefix.path + "/"))
            for prefix in _compile_prefixes(self.trusted_prefixes)
        )

    def check_url(self, url: str | URL) -> None:
        """Static checks of a user-supplied URL, before any I/O. Raises OutboundRefused."""
        self._checked(url)

    def _checked(self, url: str | URL) -> URL:
        parsed = _parse(url)
        address = _host_address(parsed)
        if address is not None and not self.allow_private:
            reason = forbidden_address(address)
            if reason is not None and not self._trusted(parsed):
                raise OutboundRefused(f"address refused: {reason}")
        return parsed

    def check_base_url(self, provider: str, url: str | URL) -> None:
        """check_url, plus: the host must be one the operator allows for ``provider`` (unless
        the URL is trusted). An unknown provider is refused whatever the URL."""
        parsed = self._checked(url)
        hosts = self.allowed_hosts.get(provider)
        if hosts is None:
            raise OutboundRefused("unknown provider")
        if self._trusted(parsed):
            return
        host = _normalise_host(parsed.raw_host or "")
        if host not in {_normalise_host(allowed) for allowed in hosts}:
            raise OutboundRefused("host not allowed for this provider")


def parse_allowed_hosts(text: str) -> frozenset[str]:
    """The hosts of a comma-separated setting such as ``PROVIDER_ALLOWED_HOSTS_VENICE``.

    Non-ASCII names are IDNA-encoded the way yarl encodes a URL's host, so that they compare
    equal to the host of a URL naming them. No wildcards.
    """
    hosts = set()
    for item in text.split(","):
        host = _normalise_host(item)
        if not host:
            continue
        if not host.isascii():
            host = URL.build(scheme="http", host=host).raw_host or host
        hosts.add(host)
    return frozenset(hosts)


# --- the guarded session -----------------------------------------------------------------------


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` (default: aiohttp's ``DefaultResolver``) and raises
    :class:`OutboundRefused` for the whole name if any address it resolves to is forbidden,
    unless ``allow_private``.

    The connector connects to exactly the addresses returned here (see the module docstring).
    An empty answer is an ``OSError``, which aiohttp reports as ``ClientConnectorDNSError``
    like any failed lookup.
    """

    def __init__(self, *, allow_private: bool = False, inner: AbstractResolver | None = None):
        self._allow_private = allow_private
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise OSError("host name resolved to no address")
        for result in results:
            # Even when private addresses are allowed, a non-numeric answer would be resolved
            # again by the socket layer, which would undo the pinning.
            try:
                address = ipaddress.ip_address(result["host"])
            except ValueError:
                raise OutboundRefused("resolver returned a non-numeric address") from None
            if self._allow_private:
                continue
            reason = forbidden_address(address)
            if reason is not None:
                raise OutboundRefused(f"host name resolves to a refused address: {reason}")
        return list(results)

    async def close(self) -> None:
        await self._inner.close()


def _check_every_request(policy: OutboundPolicy) -> aiohttp.ClientMiddlewareType:
    async def middleware(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        policy.check_url(req.url)
        return await handler(req)

    return middleware


def guarded_session(
    policy: OutboundPolicy,
    *,
    inner_resolver: AbstractResolver | None = None,
    **connector_kwargs: Any,
) -> aiohttp.ClientSession:
    """A ClientSession for untrusted URLs; use it through :func:`request`.

    ``TCPConnector(resolver=GuardedResolver(...), **connector_kwargs)``; ``inner_resolver`` is
    what the guard resolves with. ``trust_env=False``, so no proxy or netrc from the
    environment. A ``DummyCookieJar``, because the session serves every user: a cookie one
    user's server sets must not be sent to another's. Redirects are not followed by the session
    but by :func:`request`; aiohttp has no session-wide switch, so the session re-checks every
    request it sends instead. The connector does not close a resolver it was given: the
    guard's inner resolver is released with ``GuardedResolver.close`` (a no-op for the default
    threaded resolver).
    """
    if "resolver" in connector_kwargs:
        raise TypeError("guarded_session installs its own resolver; pass inner_resolver")
    resolver = GuardedResolver(allow_private=policy.allow_private, inner=inner_resolver)
    connector = aiohttp.TCPConnector(resolver=resolver, **connector_kwargs)
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=(_check_every_request(policy),),
    )


# --- one call, with its redirects --------------------------------------------------------------

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS: Final = (hdrs.AUTHORIZATION, hdrs.COOKIE, hdrs.PROXY_AUTHORIZATION)
_BODY_HEADERS: Final = (hdrs.CONTENT_LENGTH, hdrs.CONTENT_TYPE, hdrs.CONTENT_ENCODING)
# Arguments that would let a request escape the policy: a proxy connects elsewhere than the URL
# says, and the redirects are this module's to follow.
_REFUSED_ARGUMENTS: Final = ("allow_redirects", "proxy", "proxy_auth")


def _replayable(data: object) -> bool:
    """Whether sending ``data`` again sends the same body (streams and FormData are consumed)."""
    return data is None or isinstance(data, bytes | bytearray | str | Mapping)


def _redirected_method(
    status: int, method: str, kwargs: dict[str, Any], headers: CIMultiDict[str]
) -> str:
    """The method of the next hop, dropping the body (from ``kwargs`` and ``headers``) when
    the redirect turns the request into a GET: 303 always (HEAD stays HEAD), 301 and 302 for
    a POST, as browsers and aiohttp do. 307 and 308 keep method and body."""
    if (status == 303 and method != hdrs.METH_HEAD) or (
        status in (301, 302) and method == hdrs.METH_POST
    ):
        kwargs.pop("data", None)
        kwargs.pop("json", None)
        for name in _BODY_HEADERS:
            headers.popall(name, None)
        return hdrs.METH_GET
    if not _replayable(kwargs.get("data")):
        raise OutboundRefused("redirect would resend a streamed body")
    return method


@asynccontextmanager
async def request(
    policy: OutboundPolicy,
    guarded: aiohttp.ClientSession,
    trusted: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    max_redirects: int = 3,
    **kwargs: Any,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """One call to a user-supplied URL; yields the final response and releases it on exit.

    Each hop is statically checked, then sent with ``trusted`` if it lies under a trusted
    prefix, else with ``guarded``; redirects (301/302/303/307/308 with a Location) are followed
    up to ``max_redirects`` times, then ``OutboundRefused("too many redirects")``. See
    ``_redirected_method`` for what a redirect does to method and body. After a hop to an origin
    other than the original URL's, ``Authorization``, ``Cookie`` and ``Proxy-Authorization``
    headers and the ``auth`` and ``cookies`` arguments are dropped for the rest of the call, so
    neither session should carry default credentials. A redirect response's body is never read.
    ``kwargs`` go to ``ClientSession.request``; a ``timeout`` applies to each hop.
    """
    for name in _REFUSED_ARGUMENTS:
        if name in kwargs:
            raise TypeError(f"request() does not accept {name}=")
    current = policy._checked(url)
    home = _origin(current)
    method = method.upper()
    headers: CIMultiDict[str] = CIMultiDict(kwargs.pop("headers", None) or {})
    followed = 0
    while True:
        session = trusted if policy._trusted(current) else guarded
        response = await session.request(
            method, current, headers=headers, allow_redirects=False, **kwargs
        )
        location = response.headers.get(hdrs.LOCATION) if response.status in _REDIRECTS else None
        if location is None:
            break
        response.release()
        if followed >= max_redirects:
            raise OutboundRefused("too many redirects")
        followed += 1
        try:
            target = current.join(URL(location))
        except ValueError:
            raise OutboundRefused("malformed redirect location") from None
        current = policy._checked(target)
        method = _redirected_method(response.status, method, kwargs, headers)
        # Query parameters belonged to the first URL; the Location carries its own.
        kwargs.pop("params", None)
        if _origin(current) != home:
            for name in _CREDENTIAL_HEADERS:
                headers.popall(name, None)
            kwargs.pop("auth", None)
            kwargs.pop("cookies", None)
    try:
        yield response
    finally:
        response.release()


# --- the engine's outbound HTTP, in one object --------------------------------------------------


class Outbound:
    """The sessions every outbound call shares, and the policy that picks among them.

    A URL under a trusted prefix (what the operator configured) goes through a plain session,
    anything else through the guarded one. ``fresh`` sessions open a new connection per
    request: a pooled keep-alive connection that the server closed a moment ago fails a POST in
    a way indistinguishable from a lost answer, which a call that bills (a provider's queue)
    cannot afford. Provider API calls pass ``provider`` so a user-supplied base URL is also held
    to that provider's host allow-list; they follow no redirect (a POST that bills is not
    replayed elsewhere), while a download follows a few, each re-checked.
    """

    def __init__(self, policy: OutboundPolicy, *, limit: int = 256) -> None:
        self.policy = policy
        self._trusted = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, family=socket.AF_INET)
        )
        self._trusted_fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, family=socket.AF_INET)
        )
        self._guarded = guarded_session(policy, limit=limit)
        self._guarded_fresh = guarded_session(policy, force_close=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The plain session, for URLs the operator configured (S3, a provider's catalog)."""
        return self._trusted

    def request(
        self,
        method: str,
        url: str,
        *,
        provider: str | None = None,
        fresh: bool = False,
        **kwargs: Any,
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        if provider is not None:
            if not self.policy.is_trusted(url):
                self.policy.check_base_url(provider, url)
            kwargs.setdefault("max_redirects", 0)
        guarded, trusted = (
            (self._guarded_fresh, self._trusted_fresh) if fresh else (self._guarded, self._trusted)
        )
        return request(self.policy, guarded, trusted, method, url, **kwargs)

    async def close(self) -> None:
        for session in (self._trusted, self._trusted_fresh, self._guarded, self._guarded_fresh):
            await session.close()
