"""The CA API over real TLS on a loopback port, driven by the real client."""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from ca_testing import TRUST_DOMAIN, post_join, verified_context
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshd.ca import issuer
from meshd.ca.server import CAEndpoint, server_hosts
from meshd.ca.store import CAMaterial, TokenStore
from meshd.errors import CAError
from meshd.identity import ca_client as client
from meshd.identity import keys
from meshd.identity.ca_client import CARefusedError
from meshd.identity.certs import TrustBundle


def mint(ca: CAMaterial, node: str = "n1", services: tuple[str, ...] = ("web", "cart"),
         ttl: timedelta = timedelta(hours=1), uses: int | None = None,
         now: datetime | None = None) -> str:
    token, _ = TokenStore(ca.directory).mint(
        node, services, now=now or datetime.now(UTC), ttl=ttl, uses=uses
    )
    return token


async def do_join(endpoint: CAEndpoint, token: str, node: str = "n1",
                  services: tuple[str, ...] = ("web",), pin: str | None = None,
                  ) -> client.JoinResult:
    return await client.join(endpoint.url, token=token, node=node, services=services,
                             fingerprint=pin or endpoint.fingerprint)


async def test_join_issues_one_identity_per_service(
    ca: CAMaterial, ca_server: CAEndpoint
) -> None:
    before = datetime.now(UTC)
    result = await do_join(ca_server, mint(ca), services=("web", "cart"))

    assert result.trust_domain == TRUST_DOMAIN
    assert result.bundle.fingerprints() == (ca.fingerprint,)
    assert set(result.identities) == {"web", "cart"}
    web = result.identities["web"]
    assert web.service == "web"
    assert web.spiffe_id == "spiffe://mesh.test/svc/web"
    cert = x509.load_pem_x509_certificate(web.cert_pem)
    cert.verify_directly_issued_by(ca.signer.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://mesh.test/svc/web")]
    lifetime = web.not_after - before
    assert timedelta(hours=23, minutes=59) < lifetime <= timedelta(hours=24, seconds=5)
    # the key was made here, and it is the certificate's key
    key = serialization.load_pem_private_key(web.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert web.serial == format(cert.serial_number, "x")


async def test_roots_endpoint(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    bundle = await client.fetch_roots(ca_server.url, ca.fingerprint.upper().replace("SHA", "sha"))
    assert bundle.trust_domain == TRUST_DOMAIN
    assert bundle.fingerprints() == (ca.fingerprint,)


async def test_the_api_speaks_tls13_with_a_certificate_for_its_address(
    ca: CAMaterial, ca_server: CAEndpoint
) -> None:
    context = verified_context(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with httpx.AsyncClient(verify=context) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{ca_server.url}/v1/ca/roots")
    for url in (ca_server.url, ca_server.url.replace("127.0.0.1", "localhost")):
        async with httpx.AsyncClient(verify=verified_context(ca)) as http:
            response = await http.get(f"{url}/v1/ca/roots")
        assert response.status_code == 200, url


async def test_wrong_fingerprint_is_refused_by_the_client(ca_server: CAEndpoint) -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(CAError) as info:
        await client.fetch_roots(ca_server.url, wrong)
    assert wrong in str(info.value) and ca_server.fingerprint in str(info.value)
    with pytest.raises(CAError, match="not the pinned CA"):
        await do_join(ca_server, "unused", pin=wrong)
    with pytest.raises(CAError, match="invalid CA fingerprint"):
        await client.fetch_roots(ca_server.url, "sha1:abcd")


def test_only_the_pinned_root_is_taken_from_an_unverified_answer(ca: CAMaterial) -> None:
    # Someone in the middle of the first (unverified) request could add a root of their own.
    other_key = keys.new_private_key()
    other = issuer.build_root(other_key, TRUST_DOMAIN, datetime.now(UTC))
    bundle = TrustBundle.from_pems(
        TRUST_DOMAIN, [keys.cert_pem(other), keys.cert_pem(ca.signer.cert)]
    )
    pinned = client.select_pinned(bundle, ca.fingerprint)
    assert pinned.fingerprints() == (ca.fingerprint,)
    with pytest.raises(CAError, match=keys.fingerprint(other)):
        client.select_pinned(TrustBundle.from_pems(TRUST_DOMAIN, [keys.cert_pem(other)]),
                             ca.fingerprint)


async def test_unreachable_ca_is_a_ca_error(ca: CAMaterial) -> None:
    with pytest.raises(CAError, match="cannot reach") as info:
        await client.fetch_roots("https://127.0.0.1:1", ca.fingerprint)
    assert isinstance(info.value.__cause__, httpx.HTTPError)


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [("", 401, "missing_token"),
     ("deadbeef." + "A" * 43, 401, "invalid_token"),
     ("not-a-token", 401, "invalid_token")],
)
async def test_join_without_a_valid_token_is_refused(
    ca_server: CAEndpoint, token: str, status: int, code: str
) -> None:
    with pytest.raises(CARefusedError) as info:
        await do_join(ca_server, token)
    assert (info.value.status, info.value.code) == (status, code)


async def test_missing_token_field(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    response = await post_join(ca_server, ca, {"node": "n1", "csrs": {"web": "x"}})
    assert response.status_code == 401
    assert response.json() == {"error": "missing_token", "reason": "a join token is required"}


async def test_expired_token_is_refused(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    token = mint(ca, now=datetime.now(UTC) - timedelta(hours=2))
    with pytest.raises(CARefusedError, match="expired") as info:
        await do_join(ca_server, token)
    assert info.value.status == 401
    # the operator reading the host's log learns the exact command that mints a new one
    assert info.value.reason.endswith(
        f": mint a new one on the CA host with `meshd ca token --dir {ca.directory} --node n1 "
        "--services web,cart` and put it in the host's join token file ([ca] token_file)")


async def test_used_up_token_is_refused(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    token = mint(ca, uses=1)
    # a refused attempt does not spend the use
    with pytest.raises(CARefusedError):
        await do_join(ca_server, token, node="intruder")
    await do_join(ca_server, token)
    with pytest.raises(CARefusedError, match="used up") as info:
        await do_join(ca_server, token)
    assert info.value.status == 401
    assert info.value.reason == (
        f"the join token has been used up: mint a new one on the CA host with `meshd ca token "
        f"--dir {ca.directory} --node n1 --services web,cart` and put it in the host's join "
        "token file ([ca] token_file)")


async def test_service_not_allowed_names_the_service(
    ca: CAMaterial, ca_server: CAEndpoint
) -> None:
    with pytest.raises(CARefusedError) as info:
        await do_join(ca_server, mint(ca, services=("web",)), services=("web", "billing"))
    assert info.value.status == 403
    assert info.value.code == "service_not_allowed"
    assert "'billing'" in info.value.reason


async def test_wrong_node_is_refused(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    with pytest.raises(CARefusedError) as info:
        await do_join(ca_server, mint(ca, node="n1"), node="n2")
    assert (info.value.status, info.value.code) == (403, "node_not_allowed")
    assert "'n2'" in info.value.reason


def _csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_csr_with_a_non_p256_key_is_refused(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    token = mint(ca, uses=1)
    node_csr = _csr_pem(ec.generate_private_key(ec.SECP256R1()))
    body = {"token": token, "node": "n1", "node_csr": node_csr,
            "csrs": {"web": _csr_pem(ec.generate_private_key(ec.SECP384R1()))}}
    response = await post_join(ca_server, ca, body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_csr"
    assert "P-256" in response.json()["reason"] and "'web'" in response.json()["reason"]
    # the refused request did not spend the single use
    body["csrs"] = {"web": _csr_pem(ec.generate_private_key(ec.SECP256R1()))}
    assert (await post_join(ca_server, ca, body)).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [(b"{not json", 400, "bad_request"),
     (b"[]", 400, "bad_request"),
     (b'{"token": "t", "node": "n1", "csrs": {}}', 400, "bad_request"),
     (b'{"token": "t", "node": "n/1", "csrs": {"web": "x"}}', 400, "bad_request"),
     (b'{"token": "t", "node": "n1", "csrs": {"web": "junk"}}', 400, "bad_csr"),
     (b'{"token": "t", "node": "n1", "csrs": {"a b": "junk"}}', 400, "bad_request"),
     (b'{"token": "t", "node": "n1", "csrs": {"web": "' + b"x" * 100_000 + b'"}}',
      413, "body_too_large")],
)
async def test_malformed_requests(
    ca: CAMaterial, ca_server: CAEndpoint, body: bytes, status: int, code: str
) -> None:
    response = await post_join(ca_server, ca, body)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.json()["reason"]


def test_server_certificate_names() -> None:
    assert server_hosts("10.1.2.3", ["ca.example"], ["ignored"]) == [
        "10.1.2.3", "localhost", "127.0.0.1", "::1", "ca.example"]
    assert server_hosts("0.0.0.0", [], ["host1", "10.0.0.5", "h\u00f6st", "127.0.0.1"]) == [
        "host1", "10.0.0.5", "127.0.0.1", "localhost", "::1"]


async def test_unknown_endpoint_and_method(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    async with httpx.AsyncClient(verify=verified_context(ca)) as http:
        assert (await http.get(f"{ca_server.url}/v1/nope")).status_code == 404
        response = await http.get(f"{ca_server.url}/v1/ca/join")
        assert response.status_code == 405 and response.headers["allow"] == "POST"


async def test_tokens_and_keys_never_reach_the_log(
    ca: CAMaterial, ca_server: CAEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint(ca, uses=1)
    with pytest.raises(CARefusedError):
        await do_join(ca_server, token, node="n2")
    result = await do_join(ca_server, token)
    with pytest.raises(CARefusedError):
        await do_join(ca_server, token)  # used up
    wrong_secret = token.split(".")[0] + ".B" + token.split(".")[1][1:]
    with pytest.raises(CARefusedError):
        await do_join(ca_server, wrong_secret)

    text = caplog.text
    assert "join refused" in text and "node_not_allowed" in text and "token_used_up" in text
    assert token.split(".")[0] in text  # the id is there to correlate with `ca token`
    secret = token.split(".")[1]
    assert secret not in text and wrong_secret.split(".")[1] not in text
    assert b"PRIVATE KEY" not in text.encode()
    assert result.identities["web"].key_pem.decode().splitlines()[1] not in text
