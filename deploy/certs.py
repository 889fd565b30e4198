"""TLS certificates for the SuperLink and the key pairs that authenticate SuperNodes.

Files are written with ``cryptography`` (a Flower dependency, imported only when a file is written); private keys
get mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import DeployError

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Certificates:
    """The TLS files of a deployment (``certs/`` under the deployment folder)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def exist(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.server_cert, self.server_key))


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write atomically with ``mode`` set before the rename (a secret is never on disk more readable)."""
    from popri.checkpoint import atomic_write_bytes  # inside: popri.checkpoint loads torch, deploy stays light

    atomic_write_bytes(path, data, mode=mode)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only."""
    _write_file(path, data, mode=0o600)


def san_entries(hosts: Sequence[str] = ()) -> list[str]:
    """Subject alternative names: the loopback names plus each host (IP addresses as IP, others as DNS names).

    ``0.0.0.0`` and ``::`` are bind addresses, not addresses a SuperNode dials, so they are refused.
    """
    names: list[str] = []
    for host in (*LOOPBACK_NAMES, *hosts):
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise DeployError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            entry = f"DNS:{host.lower()}"
        else:
            if ip.is_unspecified:
                raise DeployError(
                    f"--host {host}: give the address the SuperNodes dial (e.g. the machine's LAN IP or DNS name); "
                    f"{host} is only what the SuperLink binds to"
                )
            entry = f"IP:{ip}"
        if entry not in names:
            names.append(entry)
    return names


def write_certificates(
    directory: Path, hosts: Sequence[str] = (), *, days: int = 365, overwrite: bool = False
) -> Certificates:
    """A self-signed CA and a server certificate it signs, valid for the loopback names and ``hosts``.

    RSA-2048 keys, SHA-256 signatures; the private keys are written with mode 0600. Existing files are kept unless
    ``overwrite`` (a new CA would invalidate the ``ca.crt`` already copied to the devices).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs = Certificates(Path(directory))
    if certs.exist() and not overwrite:
        raise DeployError(f"{certs.directory} already holds certificates; pass --overwrite to replace them")
    sans = san_entries(hosts)
    alt_names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(v[3:])) if v.startswith("IP:") else x509.DNSName(v[4:]) for v in sans
    ]
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "popri deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) or ["localhost"])[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem_key = {
        "encoding": serialization.Encoding.PEM,
        "format": serialization.PrivateFormat.TraditionalOpenSSL,
        "encryption_algorithm": serialization.NoEncryption(),
    }
    certs.directory.mkdir(parents=True, exist_ok=True)
    _write_private(certs.ca_key, ca_key.private_bytes(**pem_key))
    _write_private(certs.server_key, server_key.private_bytes(**pem_key))
    _write_file(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write_file(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    logger.info("wrote %s (SAN %s)", certs.directory, ", ".join(sans))
    return certs


def certificate_sans(cert_path: Path) -> list[str]:
    """The subject alternative names of a PEM certificate, as ``DNS:name`` / ``IP:addr``."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)] + [
        f"IP:{ip}" for ip in ext.get_values_for_type(x509.IPAddress)
    ]


def write_node_keys(directory: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes), for SuperNode auth.

    Returns ``(private, public)``: ``directory/name`` (mode 0600, stays on the device) and ``directory/name.pub``
    (given to ``flwr supernode register``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DeployError(f"node name {name!r}: use letters, digits, '.', '_' or '-'")
    private, public = Path(directory) / name, Path(directory) / f"{name}.pub"
    if private.exists() and not overwrite:
        raise DeployError(f"{private} exists; a registered key must not be replaced silently (pass --overwrite)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    _write_file(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" popri-{name}\n".encode(),
        mode=0o644,
    )
    return private, public
