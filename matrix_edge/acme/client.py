"""The conversation with the CA, with the certbot team's ``acme`` library.

``acme`` is blocking (it speaks HTTP through ``requests``), so each step
here is a plain function that L{matrix_edge.acme.manager} runs on a thread
of its own: the reactor never waits on the CA. One order runs at
a time, and nothing here touches the reactor or the listeners; the answers
to challenges go through the state directory.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import attrs
import josepy as jose
from acme import challenges, client, errors, messages
from acme.crypto_util import make_csr
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from matrix_edge.acme.challenges import (
    remove_http01_answer,
    remove_tls_alpn_answer,
    write_http01_answer,
    write_tls_alpn_answer,
)
from matrix_edge.acme.store import AcmeStore
from matrix_edge.config.acme import AcmeConfig
from matrix_edge.tls import private_key_pem
from matrix_edge.version import version

# How long the CA has to validate and issue, per order.
ORDER_DEADLINE = datetime.timedelta(seconds=90)
NETWORK_TIMEOUT = 30

TLS_ALPN_01 = "tls-alpn-01"
HTTP_01 = "http-01"


class OrderFailed(Exception):
    """An order that did not end in a certificate, with the CA's reason."""

    def __init__(self, message: str, rate_limited: bool = False):
        super().__init__(message)
        self.rate_limited = rate_limited


class _Ready(challenges.ChallengeResponse):
    """The body ``{}`` that tells the CA a challenge is ready (RFC 8555
    section 7.5.1), for challenge types ``acme`` no longer models
    (tls-alpn-01)."""

    typ = "ready"

    def __bool__(self) -> bool:
        # An empty object is falsy, and ``acme`` would send a falsy one as
        # an empty payload: a POST-as-GET, which does not start validation.
        return True


@attrs.frozen
class Issued:
    key: ec.EllipticCurvePrivateKey
    fullchain_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.fullchain_pem)


class AcmeClient:
    """One account at one CA; its methods block, and are run in a thread."""

    def __init__(
        self,
        config: AcmeConfig,
        store: AcmeStore,
        log: Callable[[str], None] = lambda message: None,
    ):
        self.config = config
        self.store = store
        self._log = log
        self._client: client.ClientV2 | None = None
        self.account_uri: str | None = None

    def _connected(self) -> client.ClientV2:
        """The directory fetched and the account registered (or found
        again: the CA answers a known key with its account)."""
        if self._client is not None:
            return self._client
        url = self.config.directory
        key = jose.JWKEC(key=self.store.account_key(url))
        net = client.ClientNetwork(
            key,
            alg=jose.ES256,
            verify_ssl=self.config.ca_bundle or True,  # type: ignore[arg-type]
            user_agent=f"matrix-edge/{version()}",
            timeout=NETWORK_TIMEOUT,
        )
        acme_client = client.ClientV2(client.ClientV2.get_directory(url, net), net)
        known = self.store.registration(url)
        registration = messages.NewRegistration.from_data(
            email=self.config.contact, terms_of_service_agreed=True
        )
        try:
            regr = acme_client.new_account(registration)
        except errors.ConflictError as existing:
            regr = messages.RegistrationResource(uri=existing.location)
            net.account = regr
            if existing.location != known:
                self.store.save_registration(url, existing.location)
            self._log(f"ACME account {existing.location} at {url}")
        else:
            assert regr.uri is not None
            self.store.save_registration(url, regr.uri)
            self._log(f"ACME account {regr.uri} registered at {url}")
        self.account_uri = net.account.uri if net.account is not None else None
        self._client = acme_client
        return acme_client

    def issue(self, name: str) -> Issued:
        """Order a certificate for ``name`` and see the order through:
        answer a challenge (http-01 when a port-80 listener is configured,
        else tls-alpn-01), wait for the CA, finalize, download the chain."""
        try:
            return self._issue(name)
        except messages.Error as e:
            self._client = None if e.code == "accountDoesNotExist" else self._client
            raise OrderFailed(_describe(e), rate_limited=e.code == "rateLimited") from e
        except errors.ValidationError as e:
            raise OrderFailed(_validation_failure(e)) from e
        except errors.TimeoutError as e:
            raise OrderFailed("the CA did not finish in time") from e
        except errors.Error as e:
            raise OrderFailed(f"{type(e).__name__}: {e}") from e
        except OSError as e:
            raise OrderFailed(f"cannot reach the CA: {e}") from e

    def _issue(self, name: str) -> Issued:
        acme_client = self._connected()
        key = ec.generate_private_key(ec.SECP256R1())
        order = acme_client.new_order(make_csr(private_key_pem(key), [name]))
        cleanups: list[Callable[[], None]] = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue
                cleanups.append(self._answer(acme_client, name, authorization))
            deadline = datetime.datetime.now() + ORDER_DEADLINE
            order = acme_client.poll_and_finalize(order, deadline)
        finally:
            for cleanup in cleanups:
                cleanup()
        assert order.fullchain_pem is not None
        return Issued(key=key, fullchain_pem=order.fullchain_pem.encode("ascii"))

    def _answer(
        self,
        acme_client: client.ClientV2,
        name: str,
        authorization: messages.AuthorizationResource,
    ) -> Callable[[], None]:
        """Put up the answer to one challenge and tell the CA; returns how
        to take it down."""
        offered = {_type(c): c for c in authorization.body.challenges}
        account_key = acme_client.net.key
        assert account_key is not None
        # http-01 first when port 80 was opened for it; tls-alpn-01 needs
        # nothing but the TLS listener.
        preference = [TLS_ALPN_01]
        if self.config.http01_port is not None:
            preference.insert(0, HTTP_01)
        for kind in preference:
            if kind not in offered:
                continue
            body = offered[kind]
            token = body.chall.to_partial_json()["token"]
            key_authorization = _key_authorization(token, account_key)
            if kind == TLS_ALPN_01:
                write_tls_alpn_answer(self.store, name, key_authorization)
                _ready(acme_client, body)
                return lambda: remove_tls_alpn_answer(self.store, name)
            write_http01_answer(self.store, token, key_authorization)
            _ready(acme_client, body)
            return lambda: remove_http01_answer(self.store, token)
        raise OrderFailed(
            f"the CA offers {', '.join(sorted(offered)) or 'no challenge'} for "
            f"{name}; matrix-edge answers tls-alpn-01"
            + (", and http-01 with acme.http01_port" if HTTP_01 in offered else "")
        )

    def revoke(self, certificate: x509.Certificate, reason: int = 0) -> None:
        """Revoke ``certificate`` with this account (RFC 8555 section 7.6)."""
        try:
            self._connected().revoke(certificate, reason)
        except (errors.Error, messages.Error) as e:
            raise OrderFailed(f"revocation refused: {e}") from e


def _ready(acme_client: client.ClientV2, body: messages.ChallengeBody) -> None:
    """Tell the CA to validate. Not ``answer_challenge``, which insists on
    a ``Link: rel="up"`` header that RFC 8555 does not require (Pebble
    sends none)."""
    acme_client.net.post(
        body.uri, _Ready(), new_nonce_url=acme_client.directory["newNonce"]
    )


def _type(body: messages.ChallengeBody) -> str:
    """A challenge's type, also for those ``acme`` does not model."""
    return str(body.chall.to_partial_json().get("type", ""))


def _key_authorization(token: str, account_key: jose.JWK) -> str:
    thumbprint = jose.b64encode(account_key.thumbprint()).decode("ascii")
    return f"{token}.{thumbprint}"


def _describe(error: messages.Error) -> str:
    text = error.detail or error.description or error.typ
    return f"{error.code or error.typ}: {text}"


def _validation_failure(error: errors.ValidationError) -> str:
    reasons = []
    for authorization in error.failed_authzrs:
        for challenge in authorization.body.challenges:
            if challenge.error is not None:
                reasons.append(
                    f"{_type(challenge)} for "
                    f"{authorization.body.identifier.value}: "
                    f"{_describe(challenge.error)}"
                )
    return "validation failed: " + ("; ".join(reasons) or "no reason given")
