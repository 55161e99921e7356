"""OpenID Connect issuers: discovery, keys, and the checks of every token the gateway accepts.

The one module that imports joserfc (JWS, JWK, JWT claims) and authlib (OpenID Connect Core's ID
token rules); everything it returns is plain ``dict``/``str``. HTTP to a provider goes through
the gateway's aiohttp (``ProviderHttp``: one session per app lifetime, no cookie jar, no
redirects followed, a timeout per call, bodies bounded), never httpx.

An ``Issuer`` is one trusted issuer URL. Its discovery document
(``<issuer>/.well-known/openid-configuration``) is cached; its ``issuer`` must equal the
configured one exactly, and every endpoint it names must be https, except on loopback (tests,
a sidecar). Keys come only from the discovered ``jwks_uri``, never from a token's ``jku``,
``x5u``, ``x5c`` or embedded ``jwk`` (a token that carries one is refused outright), and only
asymmetric signing keys with a ``kid`` are kept, at most ``max_keys``. A token whose ``kid`` is
unknown refetches the keys at most once per ``jwks_refresh_interval`` (key rotation), so a
stream of made-up ``kid`` values cannot turn the gateway into a load generator against the
provider; keys older than ``jwks_max_age`` are refreshed the same way, the old ones kept while
the provider cannot be reached.

Every token: compact JWS of three base64url parts, ``alg`` in the caller's allowed list and
never ``none`` or HMAC (a public key is never an HMAC secret), ``kid`` required, no ``crit``,
signature by the key of that ``kid`` (its type must fit the algorithm), ``iss`` exactly the
issuer, ``exp`` required, ``nbf`` and ``iat`` not in the future, all with ``leeway`` seconds of
clock skew. Then per kind:

- ID token (``verify_id_token``): ``aud`` contains the client id, ``azp`` equal to it when
  present or when there are several audiences, ``nonce`` equal to the login attempt's, ``sub``
  and ``iat`` present, no ``typ`` of another kind of JWT.
- Logout token (``verify_logout_token``, Back-Channel Logout 1.0 section 2.6): ``aud`` contains
  the client id, ``iat`` at most ``max_age`` old, ``exp`` (required by the 2022 final),
  ``events`` holds the back-channel logout member (an object), no ``nonce``, ``sid`` and/or
  ``sub``, ``jti``, ``typ`` ``logout+jwt`` when a ``typ`` is sent. The replay store (``jti``
  seen before) is the caller's (``guard.identity.sso.LogoutReplay``, shared by replicas
  through the database).
- Access token (``verify_access_token``, RFC 9068): ``aud`` contains the pinned audience, no
  ``nonce`` (an ID token is not an API credential), ``typ`` ``at+jwt`` (or
  ``application/at+jwt``) when the issuer emits one; a generic ``JWT`` or no ``typ`` is also
  accepted, because many issuers (Kubernetes service accounts, Keycloak, Entra ID) send no
  RFC 9068 ``typ``: any other ``typ`` (``logout+jwt``, ...) is refused, and with
  ``require_typ`` only ``at+jwt`` passes.

Failures: ``TokenInvalid(reason)`` for every rejected token (the reason is for logs and the
audit record, never for the caller); ``IssuerUnavailable`` when the provider cannot be reached
or answers nonsense (503 ``identity_unavailable`` upstream), with ``IssuerMisconfigured`` for a
discovery document that names another issuer or an insecure endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Final
from urllib.parse import quote_plus, urlsplit

import aiohttp
from authlib.oidc.core import CodeIDToken
from joserfc import jws
from joserfc.errors import ClaimError, JoseError, SecurityWarning
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.jwt import JWTClaimsRegistry

logger = logging.getLogger("guard.oidc")

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
BACKCHANNEL_EVENT: Final = "http://schemas.openid.net/event/backchannel-logout"
# Asymmetric signatures only: none and HS* are never accepted, whatever a caller allows.
SIGNATURE_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_KEY_TYPES: Final[Mapping[str, type[Key]]] = {"RSA": RSAKey, "EC": ECKey, "OKP": OKPKey}
_ALG_KEY_TYPE: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
# Where keys could come from other than the issuer's jwks_uri, and extensions nobody here knows.
_FORBIDDEN_HEADERS: Final = ("jku", "x5u", "jwk", "x5c", "crit")
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}")
MAX_TOKEN: Final = 16 * 1024  # characters; real tokens are 1-4 KiB
MAX_DOCUMENT: Final = 512 * 1024  # bytes of a discovery document, JWKS or token response
FAILED_FETCH_RETRY: Final = 5.0  # seconds before a failed first fetch is tried again
_ENDPOINTS: Final = (
    "authorization_endpoint",
    "token_endpoint",
    "userinfo_endpoint",
    "jwks_uri",
    "end_session_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
)


class IssuerUnavailable(Exception):
    """The provider cannot be reached or gave no usable answer (503 upstream)."""


class IssuerMisconfigured(IssuerUnavailable):
    """The provider's discovery document cannot be trusted: another issuer, an insecure
    endpoint. Still "unavailable" to a caller; the log says why."""


class TokenInvalid(Exception):
    """A token (or a token endpoint's answer) is refused; ``str(exc)`` says why, for logs."""


# -- URLs ----------------------------------------------------------------------------------------


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is a loopback address or ``localhost``."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_provider_url(url: object, *, allow_insecure_loopback: bool = True) -> str | None:
    """What is wrong with a provider URL (issuer or endpoint), or None: https, or http on
    loopback when allowed; a host; no credentials or fragment."""
    if not isinstance(url, str) or not url:
        return "is not a URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"{url!r} is not a URL"
    if not host or parts.username is not None or parts.password is not None or parts.fragment:
        return f"{url!r} must name a host and carry no credentials or fragment"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and allow_insecure_loopback and is_loopback_url(url):
        return None
    return f"{url!r} must be https (http only on loopback)"


# -- discovery -----------------------------------------------------------------------------------


class ProviderMetadata(Mapping[str, Any]):
    """A validated discovery document; reads like the JSON object, with typed accessors."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self._document = dict(document)

    def __getitem__(self, key: str) -> Any:
        return self._document[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._document)

    def __len__(self) -> int:
        return len(self._document)

    def _url(self, key: str) -> str | None:
        value = self._document.get(key)
        return value if isinstance(value, str) and value else None

    @property
    def issuer(self) -> str:
        return str(self._document["issuer"])

    @property
    def jwks_uri(self) -> str:
        return str(self._document["jwks_uri"])

    @property
    def authorization_endpoint(self) -> str | None:
        return self._url("authorization_endpoint")

    @property
    def token_endpoint(self) -> str | None:
        return self._url("token_endpoint")

    @property
    def userinfo_endpoint(self) -> str | None:
        return self._url("userinfo_endpoint")

    @property
    def end_session_endpoint(self) -> str | None:
        return self._url("end_session_endpoint")

    @property
    def iss_parameter_supported(self) -> bool:
        """RFC 9207: the authorization response carries ``iss`` (check it)."""
        return self._document.get("authorization_response_iss_parameter_supported") is True

    @property
    def code_challenge_methods(self) -> tuple[str, ...]:
        value = self._document.get("code_challenge_methods_supported")
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def parse_metadata(
    document: object, issuer: str, *, allow_insecure_loopback: bool = True
) -> ProviderMetadata:
    """The discovery ``document`` of ``issuer``, checked; raises IssuerMisconfigured."""
    if not isinstance(document, dict):
        raise IssuerMisconfigured(f"{issuer}: the discovery document is not a JSON object")
    if document.get("issuer") != issuer:
        raise IssuerMisconfigured(
            f"{issuer}: the discovery document names issuer {str(document.get('issuer'))[:200]!r}"
            " (it must be exactly the configured issuer)"
        )
    if "jwks_uri" not in document:
        raise IssuerMisconfigured(f"{issuer}: the discovery document names no jwks_uri")
    for key in _ENDPOINTS:
        if key in document:
            problem = validate_provider_url(
                document[key], allow_insecure_loopback=allow_insecure_loopback
            )
            if problem:
                raise IssuerMisconfigured(f"{issuer}: {key} {problem}")
    return ProviderMetadata(document)


# -- HTTP ----------------------------------------------------------------------------------------


class ProviderHttp:
    """The aiohttp session for identity providers: created on first use inside the running
    loop, one per app lifetime (``close`` at shutdown), shared by every issuer."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=20),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


HttpSession = Callable[[], aiohttp.ClientSession]


# -- tokens, unverified --------------------------------------------------------------------------


def looks_like_jwt(value: str) -> bool:
    """Whether ``value`` has a signed JWT's shape: three base64url parts."""
    return len(value) <= MAX_TOKEN and _JWT_SHAPE.fullmatch(value) is not None


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a JWT claims, read without verifying anything: only to pick which trusted
    issuer's keys must verify it. None when it cannot be read."""
    if not looks_like_jwt(token):
        return None
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) and iss else None


def _header(token: str) -> dict[str, Any]:
    """The JOSE header of a JWT-shaped ``token``, read before anything else is trusted."""
    part = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise TokenInvalid("the header is not base64url JSON") from exc
    if not isinstance(header, dict):
        raise TokenInvalid("the header is not a JSON object")
    return header


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return aud
    raise TokenInvalid("aud is missing or not a string or list of strings")


def _typ(header: Mapping[str, Any]) -> str | None:
    typ = header.get("typ")
    if typ is None:
        return None
    if not isinstance(typ, str):
        raise TokenInvalid("typ is not a string")
    return typ.lower().removeprefix("application/")


def _claim_error(exc: JoseError) -> str:
    """joserfc's complaint with the claim it is about: ``invalid_claim nbf: ...``."""
    claim = f" {exc.claim}" if isinstance(exc, ClaimError) else ""
    return f"{exc.error}{claim}: {exc.description}"[:200]


# -- the issuer ----------------------------------------------------------------------------------


class Issuer:
    """One trusted issuer: its discovery document, its keys, and token checks against them."""

    def __init__(
        self,
        issuer: str,
        *,
        http: HttpSession,
        timeout: float = 10.0,
        jwks_refresh_interval: float = 60.0,
        allow_insecure_loopback: bool = True,
        max_keys: int = 32,
        metadata_max_age: float = 3600.0,
        jwks_max_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if problem := validate_provider_url(
            issuer, allow_insecure_loopback=allow_insecure_loopback
        ):
            raise ValueError(f"issuer {problem}")
        self.issuer = issuer
        self._http = http
        self.timeout = timeout
        self.jwks_refresh_interval = jwks_refresh_interval
        self.allow_insecure_loopback = allow_insecure_loopback
        self.max_keys = max_keys
        self.metadata_max_age = metadata_max_age
        self.jwks_max_age = jwks_max_age
        self._clock = clock
        self._monotonic = monotonic
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = -math.inf
        self._metadata_tried = -math.inf
        self._metadata_lock = asyncio.Lock()
        self._keys: dict[str, Key] | None = None
        self._keys_at = -math.inf
        self._keys_tried = -math.inf
        self._refetched_at = -math.inf
        self._keys_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Issuer({self.issuer!r})"

    # -- fetching ------------------------------------------------------------------------------

    async def _get_json(self, url: str, what: str) -> object:
        try:
            async with self._http().get(
                url,
                allow_redirects=False,
                headers={"accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                if response.status != 200:
                    raise IssuerUnavailable(f"{what} {url}: HTTP {response.status}")
                body = await response.content.read(MAX_DOCUMENT + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IssuerUnavailable(f"{what} {url}: {type(exc).__name__} {exc}") from exc
        if len(body) > MAX_DOCUMENT:
            raise IssuerUnavailable(f"{what} {url}: larger than {MAX_DOCUMENT} bytes")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise IssuerUnavailable(f"{what} {url}: not JSON") from exc

    def _may_try(self, tried: float, have: bool) -> bool:
        """Whether a fetch may go out now: at most once per refresh interval, and a first fetch
        that failed is retried after a few seconds (not on every request)."""
        wait = (
            self.jwks_refresh_interval
            if have
            else min(self.jwks_refresh_interval, FAILED_FETCH_RETRY)
        )
        return self._monotonic() - tried >= wait

    async def metadata(self) -> ProviderMetadata:
        """The discovery document, cached for ``metadata_max_age``; a stale one is kept while
        the provider cannot be reached. Raises IssuerUnavailable."""
        current = self._metadata
        if current is not None and self._monotonic() - self._metadata_at < self.metadata_max_age:
            return current
        async with self._metadata_lock:
            current = self._metadata
            fresh = current is not None and (
                self._monotonic() - self._metadata_at < self.metadata_max_age
            )
            if fresh or not self._may_try(self._metadata_tried, current is not None):
                if current is None:
                    raise IssuerUnavailable(f"{self.issuer}: discovery failed moments ago")
                return current
            self._metadata_tried = self._monotonic()
            try:
                document = await self._get_json(self.issuer.rstrip("/") + DISCOVERY_PATH,
                                                "discovery")  # fmt: skip
                metadata = parse_metadata(
                    document, self.issuer, allow_insecure_loopback=self.allow_insecure_loopback
                )
            except IssuerUnavailable as exc:
                if current is None:
                    raise
                logger.warning("keeping the cached discovery document: %s", exc)
                return current
            self._metadata, self._metadata_at = metadata, self._monotonic()
            return metadata

    def _parse_keys(self, document: object) -> dict[str, Key]:
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise IssuerUnavailable(f"{self.issuer}: the JWKS has no keys list")
        found: dict[str, Key] = {}
        for entry in keys:
            if not isinstance(entry, dict):
                continue
            kid, kty = entry.get("kid"), entry.get("kty")
            # Only public signing keys with a kid: a token must name its key, an "oct" key
            # would be an HMAC secret anyone reading the JWKS knows.
            key_class = _KEY_TYPES.get(kty) if isinstance(kty, str) else None
            if not isinstance(kid, str) or not kid or kid in found or key_class is None:
                continue
            if entry.get("use", "sig") != "sig":
                continue
            public = {k: v for k, v in entry.items() if k not in {"d", "p", "q", "dp", "dq", "qi"}}
            try:
                found[kid] = key_class.import_key(public)
            except (JoseError, ValueError, TypeError) as exc:
                logger.warning("%s: JWKS key %r ignored (%s)", self.issuer, kid[:64], exc)
                continue
            if len(found) >= self.max_keys:
                logger.warning("%s: JWKS holds more than %d keys; the rest are ignored",
                               self.issuer, self.max_keys)  # fmt: skip
                break
        return found

    async def _key(self, kid: str) -> Key:
        """The issuer's key ``kid``. The JWKS is fetched on first use, refetched for an unknown
        kid at most once per refresh interval (rotation), and refreshed when older than
        ``jwks_max_age``. Raises TokenInvalid or IssuerUnavailable."""
        keys = self._keys
        fresh = self._monotonic() - self._keys_at < self.jwks_max_age
        if keys is not None and kid in keys and fresh:
            return keys[kid]
        async with self._keys_lock:  # one fetch for many waiting requests
            keys, now = self._keys, self._monotonic()
            if keys is None:
                fetch = self._may_try(self._keys_tried, have=False)
            elif kid not in keys:
                fetch = now - self._refetched_at >= self.jwks_refresh_interval
                self._refetched_at = now if fetch else self._refetched_at
            else:
                fetch = now - self._keys_at >= self.jwks_max_age and self._may_try(
                    self._keys_tried, have=True
                )
            if fetch:
                self._keys_tried = now
                try:
                    metadata = await self.metadata()
                    document = await self._get_json(metadata.jwks_uri, "JWKS")
                    self._keys, self._keys_at = self._parse_keys(document), self._monotonic()
                except IssuerUnavailable as exc:
                    if keys is None:
                        raise
                    logger.warning("keeping the cached keys: %s", exc)
                keys = self._keys
        if keys is None:
            raise IssuerUnavailable(f"{self.issuer}: the keys could not be fetched moments ago")
        key = keys.get(kid)
        if key is None:
            raise TokenInvalid(f"unknown kid {kid[:64]!r} (the issuer's JWKS has no such key)")
        return key

    # -- verification --------------------------------------------------------------------------

    async def _verified(
        self, token: str, algorithms: Collection[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Header and claims of a JWT whose signature is the issuer's, by an allowed algorithm
        and the key its kid names. Raises TokenInvalid or IssuerUnavailable."""
        if not looks_like_jwt(token):
            raise TokenInvalid("not a signed JWT (three base64url parts)")
        header = _header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in SIGNATURE_ALGORITHMS or alg not in algorithms:
            raise TokenInvalid(f"alg {str(alg)[:20]!r} is not allowed")
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise TokenInvalid(f"header {name} refused: keys come only from the jwks_uri")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenInvalid("no kid in the header")
        try:
            obj = jws.extract_compact(token.encode("ascii"))
        except (JoseError, ValueError) as exc:
            raise TokenInvalid(f"malformed JWT ({type(exc).__name__})") from exc
        key = await self._key(kid)
        if key.key_type != _ALG_KEY_TYPE[alg[:2]] or key.alg not in (None, alg):
            raise TokenInvalid(f"key {kid[:64]!r} is not a key for {alg}")
        # Header names nobody registered are ignored, as RFC 7515 asks (only crit could make
        # them matter, and crit is refused above). joserfc warns that RFC 9864 deprecates the
        # name EdDSA; an operator who allowed it meant it.
        registry = jws.JWSRegistry(algorithms=[alg], strict_check_header=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SecurityWarning)
                valid = jws.validate_compact(obj, key, [alg], registry)
        except JoseError as exc:
            raise TokenInvalid(f"signature not verified ({exc.error})") from exc
        if not valid:
            raise TokenInvalid("bad signature")
        try:
            claims = json.loads(obj.payload)
        except ValueError as exc:
            raise TokenInvalid("the payload is not JSON") from exc
        if not isinstance(claims, dict):
            raise TokenInvalid("the payload is not a JSON object")
        return header, claims

    def _check_claims(self, claims: dict[str, Any], leeway: float, **options: Any) -> None:
        """iss exactly the issuer, exp required and not past, nbf and iat not in the future."""
        registry = JWTClaimsRegistry(
            now=int(self._clock()),
            leeway=int(leeway),
            iss={"essential": True, "value": self.issuer},
            exp={"essential": True},
            **options,
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise TokenInvalid(_claim_error(exc)) from exc

    async def verify_id_token(
        self,
        token: str,
        *,
        client_id: str,
        nonce: str,
        algorithms: Collection[str],
        leeway: float,
    ) -> dict[str, Any]:
        """The claims of an ID token from this issuer for ``client_id`` with ``nonce``
        (OpenID Connect Core 3.1.3.7). Raises TokenInvalid or IssuerUnavailable."""
        if not nonce:
            raise ValueError("an ID token is always checked against a nonce")
        header, claims = await self._verified(token, algorithms)
        if _typ(header) in {"at+jwt", "logout+jwt"}:
            raise TokenInvalid(f"typ {header['typ']!r} is not an ID token's")
        self._check_claims(claims, leeway)
        audiences = _audiences(claims)
        if client_id not in audiences:
            raise TokenInvalid("aud does not name this client")
        if len(audiences) > 1 and "azp" not in claims:
            raise TokenInvalid("several audiences and no azp")
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(
            claims["nonce"].encode(), nonce.encode()
        ):
            raise TokenInvalid("nonce missing or not this login's")
        # OpenID Connect Core's remaining rules (sub, iat, azp, auth_time, amr): authlib's.
        id_token = CodeIDToken(
            claims, header, {"iss": {"essential": True, "value": self.issuer}},
            {"client_id": client_id, "nonce": nonce},
        )  # fmt: skip
        try:
            id_token.validate(now=int(self._clock()), leeway=int(leeway))
        except JoseError as exc:
            raise TokenInvalid(_claim_error(exc)) from exc
        return claims

    async def verify_logout_token(
        self,
        token: str,
        *,
        client_id: str,
        algorithms: Collection[str],
        leeway: float,
        max_age: float = 120.0,
    ) -> dict[str, Any]:
        """The claims of a back-channel logout token (Back-Channel Logout 1.0, 2.6) for
        ``client_id``; the caller checks ``jti`` against its replay store. Raises TokenInvalid
        or IssuerUnavailable."""
        header, claims = await self._verified(token, algorithms)
        typ = _typ(header)
        if typ is not None and typ != "logout+jwt":
            raise TokenInvalid(f"typ {header['typ']!r} is not logout+jwt")
        self._check_claims(claims, leeway, iat={"essential": True})
        if client_id not in _audiences(claims):
            raise TokenInvalid("aud does not name this client")
        if self._clock() - claims["iat"] > max_age + leeway:
            raise TokenInvalid(f"iat is more than {max_age:.0f}s old")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
            raise TokenInvalid("events has no back-channel logout member")
        if "nonce" in claims:
            raise TokenInvalid("a logout token must not carry a nonce")
        sid, sub = claims.get("sid"), claims.get("sub")
        if not (isinstance(sid, str) and sid) and not (isinstance(sub, str) and sub):
            raise TokenInvalid("neither sid nor sub")
        for name, value in (("sid", sid), ("sub", sub)):
            if value is not None and not (isinstance(value, str) and value):
                raise TokenInvalid(f"{name} is not a string")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise TokenInvalid("no jti")
        return claims

    async def verify_access_token(
        self,
        token: str,
        *,
        audience: str,
        algorithms: Collection[str],
        leeway: float,
        require_typ: bool = False,
    ) -> dict[str, Any]:
        """The claims of a JWT access token (RFC 9068) from this issuer for ``audience``.
        Raises TokenInvalid or IssuerUnavailable."""
        header, claims = await self._verified(token, algorithms)
        typ = _typ(header)
        if typ == "at+jwt":
            pass
        elif require_typ or typ not in {None, "jwt"}:
            raise TokenInvalid(f"typ {str(header.get('typ'))[:40]!r} is not at+jwt")
        if "nonce" in claims:
            raise TokenInvalid("a nonce claim: an ID token, not an access token")
        self._check_claims(claims, leeway)
        if audience not in _audiences(claims):
            raise TokenInvalid("aud does not name this gateway")
        return claims

    async def exchange_code(
        self,
        code: str,
        *,
        redirect_uri: str,
        code_verifier: str,
        client_id: str,
        client_secret: str,
    ) -> dict[str, Any]:
        """The token endpoint's answer to an authorization code with its PKCE verifier
        (client_secret_basic). Raises TokenInvalid (refused, or not a token response) or
        IssuerUnavailable."""
        metadata = await self.metadata()
        endpoint = metadata.token_endpoint
        if endpoint is None:
            raise IssuerMisconfigured(
                f"{self.issuer}: the discovery document has no token_endpoint"
            )
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        # RFC 6749 2.3.1: both parts form-encoded before they are joined and base64-encoded.
        pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
        auth = "Basic " + base64.b64encode(pair).decode("ascii")
        try:
            async with self._http().post(
                endpoint,
                data=form,
                allow_redirects=False,
                headers={"accept": "application/json", "authorization": auth},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                status = response.status
                body = await response.content.read(MAX_DOCUMENT + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IssuerUnavailable(f"token endpoint: {type(exc).__name__} {exc}") from exc
        if status >= 500 or len(body) > MAX_DOCUMENT:
            raise IssuerUnavailable(f"token endpoint: HTTP {status}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TokenInvalid(f"token endpoint: HTTP {status}, not a JSON object")
        if status != 200:
            error = answer.get("error")
            raise TokenInvalid(f"token endpoint refused: {str(error)[:64]} (HTTP {status})")
        token_type = answer.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenInvalid("token endpoint: token_type is not Bearer")
        return answer
