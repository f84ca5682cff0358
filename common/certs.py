"""Keys and certificates for a real deployment, made with ``cryptography``.

* ``ca.crt`` / ``ca.key``: a private certificate authority (keep ``ca.key``
  offline). Sites receive ``ca.crt`` only: ``flower-supernode
  --root-certificates ca.crt``.
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by
  the CA, with the given host names and IPs as subject alternative names
  (``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``).
* ``site-<i>/auth_key`` / ``site-<i>/auth_key.pub``: an EC P-384 key pair per
  site, in OpenSSH format, for SuperNode authentication. The coordinator
  registers the public key (``flwr supernode register auth_key.pub``); the
  site keeps the private key (``flower-supernode
  --auth-supernode-private-key auth_key``).
* ``site-<i>/ledger.key`` / ``site-<i>/ledger.key.pub``: an Ed25519 key pair per
  site (PEM) that signs the site's privacy ledger. The site keeps the private key
  (node config ``ledger-key``); the coordinator keeps the public key, before any
  run, and copies it into each run directory as ``sites/site-<i>/ledger.pub``
  (or an auditor passes this folder: ``fedtransfer audit --public-keys``).

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from common.privacy.ledger import generate_key_pair

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca(days: int = 365):
    """A self-signed CA (P-384): ``(certificate, private key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtransfer deployment CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_server_cert(ca_cert, ca_key, hosts: list[str], days: int = 365):
    """The SuperLink's TLS certificate for ``hosts``, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def make_site_key():
    """An EC P-384 key pair in OpenSSH format: ``(private bytes, public bytes)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def make_deployment_keys(out: str | Path, *, sites: int = 3, hosts: list[str] | None = None,
                         days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Write the CA, the SuperLink certificate and ``sites`` SuperNode key pairs
    under ``out``; returns what was written, by role."""
    from cryptography.hazmat.primitives import serialization

    if sites < 0:
        raise ValueError(f"sites must be >= 0, got {sites}")
    out = Path(out)
    hosts = list(hosts or DEFAULT_HOSTS)
    pem = serialization.Encoding.PEM

    def key_bytes(k) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_cert, ca_key = make_ca(days)
    cert, key = make_server_cert(ca_cert, ca_key, hosts, days)
    made = {
        "ca certificate": _write(out / "ca.crt", ca_cert.public_bytes(pem), private=False,
                                 overwrite=overwrite),
        "ca key (keep offline)": _write(out / "ca.key", key_bytes(ca_key), private=True,
                                        overwrite=overwrite),
        "superlink certificate": _write(out / "server.pem", cert.public_bytes(pem),
                                        private=False, overwrite=overwrite),
        "superlink key": _write(out / "server.key", key_bytes(key), private=True,
                                overwrite=overwrite),
    }
    for i in range(sites):
        private, public = make_site_key()
        made[f"site-{i} auth private key"] = _write(out / f"site-{i}" / "auth_key", private,
                                                    private=True, overwrite=overwrite)
        made[f"site-{i} auth public key"] = _write(out / f"site-{i}" / "auth_key.pub", public,
                                                   private=False, overwrite=overwrite)
        private, public = generate_key_pair()
        made[f"site-{i} ledger signing key"] = _write(out / f"site-{i}" / "ledger.key", private,
                                                      private=True, overwrite=overwrite)
        made[f"site-{i} ledger public key"] = _write(out / f"site-{i}" / "ledger.key.pub", public,
                                                     private=False, overwrite=overwrite)
    return made
