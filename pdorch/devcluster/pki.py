"""Certificates and keys for the local control plane.

One throw-away CA signs the apiserver's and the LWS webhook's serving certificates (SAN
127.0.0.1/localhost), and an RSA key pair signs service-account tokens. Clients authenticate
with a static bearer token, which keeps every Python and Go client simple.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdorch.devcluster.manifests import SERVICE_CIDR

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class PkiPaths:
    """Where the generated material lives inside a cluster's state directory."""

    root: Path

    @property
    def ca_crt(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def apiserver_crt(self) -> Path:
        return self.root / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.root / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    @property
    def tokens_csv(self) -> Path:
        return self.root / "tokens.csv"

    @property
    def webhook_dir(self) -> Path:
        """controller-runtime expects tls.crt and tls.key in one directory."""
        return self.root / "lws-webhook"


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _serving_cert(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, cn: str, ips: list[str], dns: list[str]
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def generate(paths: PkiPaths) -> str:
    """Create the CA, serving certs, SA key pair and an admin token; return the token."""
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.webhook_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    ca_key = _new_key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("pdorch-devcluster-ca"))
        .issuer_name(_name("pdorch-devcluster-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths.ca_crt.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths.ca_key, ca_key)

    # The first Service IP is the in-cluster `kubernetes` Service's; it is only ever a SAN, never dialled.
    kubernetes_service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
    api_cert, api_key = _serving_cert(
        ca_cert,
        ca_key,
        "kube-apiserver",
        ["127.0.0.1", kubernetes_service_ip],
        ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
    )
    paths.apiserver_crt.write_bytes(api_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths.apiserver_key, api_key)

    wh_cert, wh_key = _serving_cert(ca_cert, ca_key, "lws-webhook", ["127.0.0.1"], ["localhost"])
    (paths.webhook_dir / "tls.crt").write_bytes(wh_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths.webhook_dir / "tls.key", wh_key)

    sa_key = _new_key()
    _write_key(paths.sa_key, sa_key)
    paths.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    token = secrets.token_hex(16)
    paths.tokens_csv.write_text(f"{token},admin,admin,system:masters\n")
    paths.tokens_csv.chmod(0o600)
    return token
