"""Signed desired states: the server signs each document, the device verifies it and refuses
replays (edge_agent.trust), with real Ed25519 keys."""

from __future__ import annotations

import json

import msgspec
import pytest

from edge_agent.protocol import DesiredState, encode
from edge_agent.trust import (
    Accepted,
    DesiredTrustError,
    check_fresh,
    parse_document,
    raw_key_id,
    raw_public_key,
    sign_desired,
    verify_desired,
)
from model_tools.signing import generate_keypair, key_id
from tests.agent_fixtures import keypair, public_pem


def desired_doc(**kw) -> dict:
    fields = dict(model="demo", version="2.0.0", url="http://127.0.0.1:8080/api/v1/models/demo/2.0.0/download",
                  sha256="ab" * 32, size=1234, issued_at=1_700_000_000.125)
    fields.update(kw)
    return msgspec.to_builtins(DesiredState(**fields))


def signed(doc: dict, signer: str = "server") -> bytes:
    """What the server publishes: the signed document as JSON bytes (msgspec, like `encode`)."""
    return msgspec.json.encode(sign_desired(doc, keypair(signer)[0]))


def server_key() -> bytes:
    return raw_public_key(public_pem("server"))


def test_a_signed_document_verifies_after_the_wire():
    doc = parse_document(signed(desired_doc(rollout_id="r-1", mode="shadow")))
    verify_desired(doc, [server_key()])
    assert msgspec.convert(doc, DesiredState).version == "2.0.0"


def test_raw_key_matches_the_bundle_key_id():
    assert raw_key_id(server_key()) == key_id(keypair("server")[1])


@pytest.mark.parametrize("field,value", [
    ("url", "http://evil.example/b.efb"),
    ("version", "0.9.0"),
    ("allow_downgrade", True),
    ("issued_at", 1_800_000_000.0),
    ("sha256", "cd" * 32),
    ("extra", "a field the device does not know"),
])
def test_any_changed_field_is_refused(field, value):
    doc = parse_document(signed(desired_doc()))
    doc[field] = value
    with pytest.raises(DesiredTrustError, match="does not verify"):
        verify_desired(doc, [server_key()])


def test_unsigned_untrusted_and_garbage_are_refused():
    with pytest.raises(DesiredTrustError, match="not signed"):
        verify_desired(parse_document(encode(DesiredState(**desired_doc()))), [server_key()])
    with pytest.raises(DesiredTrustError, match="does not verify"):  # a key the device does not trust
        verify_desired(parse_document(signed(desired_doc(), signer="attacker")), [server_key()])
    with pytest.raises(DesiredTrustError, match="no desired-state key"):
        verify_desired(parse_document(signed(desired_doc())), [])
    doc = parse_document(signed(desired_doc()))
    doc["sig"] = "!!!"
    with pytest.raises(DesiredTrustError, match="base64"):
        verify_desired(doc, [server_key()])
    for payload in (b"[1, 2]", b"\xff\xfe", b"{" * 100_000, b"nul"):
        with pytest.raises(DesiredTrustError):
            parse_document(payload)


def test_another_trusted_key_verifies_too():
    """Rotation: a device may trust the old and the new server key at once."""
    other = raw_public_key(public_pem("other-server"))
    verify_desired(parse_document(signed(desired_doc(), signer="other-server")), [server_key(), other])


def test_replays_are_refused_and_the_same_document_again_passes():
    new = parse_document(signed(desired_doc(version="2.0.0", issued_at=200.0)))
    old = parse_document(signed(desired_doc(version="1.0.0", issued_at=100.0, allow_downgrade=True)))
    accepted = check_fresh(new, None)
    assert check_fresh(new, accepted) == accepted  # the retained copy after a reconnect
    with pytest.raises(DesiredTrustError, match="older than the last accepted"):
        check_fresh(old, accepted)  # an old signed downgrade, replayed
    twin = parse_document(signed(desired_doc(version="3.0.0", issued_at=200.0)))
    with pytest.raises(DesiredTrustError, match="another document"):
        check_fresh(twin, accepted)
    assert check_fresh(parse_document(signed(desired_doc(issued_at=300.0))), accepted).issued_at == 300.0
    assert Accepted.from_json(json.loads(json.dumps(accepted.to_json()))) == accepted
    assert Accepted.from_json({"issued_at": "x"}) is None


def test_fresh_keys_round_trip():
    private, public = generate_keypair()
    from cryptography.hazmat.primitives import serialization

    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    verify_desired(parse_document(msgspec.json.encode(sign_desired(desired_doc(), private))), [raw_public_key(pem)])
    with pytest.raises(DesiredTrustError):
        raw_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
