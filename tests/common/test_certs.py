"""``fedtransfer deploy certs``: a CA, the SuperLink's TLS certificate and SuperNode keys
in the formats Flower 1.41 loads."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)

from cli.main import main
from common.certs import make_deployment_keys


def test_certs_chain_to_the_ca_and_name_the_loopback_host(tmp_path):
    made = make_deployment_keys(tmp_path, sites=2)
    assert len(made) == 12  # CA, server, and per site an auth pair and a ledger pair
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    key = load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for name in ("ca.key", "server.key", "site-0/auth_key", "site-1/auth_key",
                 "site-0/ledger.key", "site-1/ledger.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_site_keys_load_the_way_flower_loads_them(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    make_deployment_keys(tmp_path, sites=2)
    publics = set()
    for i in range(2):
        private = load_ssh_private_key((tmp_path / f"site-{i}" / "auth_key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        registered = try_load_public_key(tmp_path / f"site-{i}" / "auth_key.pub")
        assert registered == public_key_to_bytes(private.public_key())
        publics.add(registered)
    assert len(publics) == 2  # one key pair per site


def test_deploy_certs_command_refuses_to_overwrite(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path), "--sites", "1",
                 "--host", "superlink.example.org", "--host", "10.0.0.5"]) == 0
    assert "site-0 auth public key" in capsys.readouterr().out
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert main(["deploy", "certs", "--out", str(tmp_path)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["deploy", "certs", "--out", str(tmp_path), "--force", "--sites", "0"]) == 0
    with pytest.raises(ValueError, match="sites must be >= 0"):
        make_deployment_keys(tmp_path / "x", sites=-1)


def test_each_site_gets_a_ledger_signing_key_whose_public_half_the_coordinator_keeps(tmp_path):
    """The site names ledger.key in its node config (ledger-key); the coordinator keeps
    ledger.key.pub before any run, and it verifies what the site's ledger signs."""
    from common.privacy.ledger import Entry, Ledger, key_id, load_public_key, verify_anchor

    make_deployment_keys(tmp_path, sites=2)
    pubs = [load_public_key(tmp_path / f"site-{i}" / "ledger.key.pub") for i in range(2)]
    assert key_id(pubs[0]) != key_id(pubs[1])
    ledger = Ledger(tmp_path / "site" / "ledger.sqlite", tmp_path / "site-1" / "ledger.key")
    ledger.append(Entry(run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=5,
                        clip_norm=1.0, delta=1e-5, sampler="poisson", secure_rng=False,
                        accountant="pld/replace-one", accountant_version="x", libraries="{}",
                        dataset_size=50, epsilon_after=1.0))
    anchor = ledger.anchor()
    assert verify_anchor(pubs[1], anchor) and not verify_anchor(pubs[0], anchor)
