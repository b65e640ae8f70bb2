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
from tests.agent_fixtures import (
    BundleServer,
    bundle_bytes,
    bundle_server_fixture,  # noqa: F401 - fixture
    collector_fixture,  # noqa: F401 - fixture
    install_active,
    keypair,
    make_config,
    public_pem,
    publish_desired,
)
from tests.brokers import wait_until

pytest_plugins = ["tests.server_fixtures"]


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


# ---------------------------------------------------------------- a real agent, a real broker


@pytest.fixture
def signed_agent(tmp_path, broker, bundle_server):
    """Start an in-process agent (AgentService) that trusts the "server" desired key."""
    from edge_agent.agent import Agent
    from edge_agent.config import ServerConfig
    from edge_agent.service import AgentService

    services = []

    def start(**kw):
        config = make_config(tmp_path, broker, server=ServerConfig(url=bundle_server.base), **kw)
        config.trust.desired_keys_pem = [public_pem("server")]
        if not (config.path / "state.json").exists():
            install_active(config.path, bundle_bytes("lr", "1.0.0"))
        service = AgentService(config, agent_factory=lambda c: Agent(c, faults="")).start()
        services.append(service)
        wait_until(lambda: service.agent.link.connected, 10, message="agent connected")
        return service

    yield start
    for s in services:
        s.stop()


def sign_state(desired: DesiredState, signer: str = "server", **changes) -> bytes:
    doc = msgspec.to_builtins(desired)
    doc.update(changes)
    return signed(doc, signer)


def test_agent_takes_a_signed_desired(signed_agent, broker, collector, bundle_server):
    service = signed_agent()
    desired = bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0"), issued_at=100.0)
    publish_desired(broker, "dev-1", sign_state(desired))
    wait_until(lambda: collector.outcomes() == ["success"], 30, message="signed update succeeds")
    assert service.agent.active_version() == "2.0.0"


@pytest.mark.parametrize("forgery", ["unsigned", "attacker key", "changed url", "downgrade allowed"])
def test_a_forged_retained_desired_is_refused(forgery, signed_agent, broker, collector, bundle_server):
    """What a compromised broker (or anyone able to publish `desired`) can send: refused, nothing
    downloaded, the device keeps its model."""
    service = signed_agent()
    desired = bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0"), issued_at=100.0)
    payload = {
        "unsigned": encode(desired),
        "attacker key": sign_state(desired, signer="attacker"),
        "changed url": _tamper(sign_state(desired), url=desired.url.replace("b.efb", "c.efb")),
        "downgrade allowed": _tamper(sign_state(desired), allow_downgrade=True),
    }[forgery]
    publish_desired(broker, "dev-1", payload)
    refused = wait_until(lambda: collector.events("refused"), 10, message="forged desired refused")
    assert "desired" in refused[0].reason and ("signed" in refused[0].reason or "verify" in refused[0].reason)
    assert bundle_server.requests == [] and collector.chain() == []
    assert service.agent.active_version() == "1.0.0" and service.agent.desired() is None


def _tamper(payload: bytes, **changes) -> bytes:
    doc = json.loads(payload)
    doc.update(changes)
    return json.dumps(doc).encode()


def test_an_old_signed_desired_is_not_replayed_even_after_a_restart(signed_agent, broker, collector, bundle_server):
    """An old, validly signed desired allowing a downgrade (captured earlier) is refused once a
    newer one was accepted, also by the agent after a restart."""
    old = sign_state(bundle_server.desired("dev-1", "a.efb", bundle_bytes("lr", "1.0.0"), allow_downgrade=True,
                                           issued_at=100.0))
    service = signed_agent()
    publish_desired(broker, "dev-1", sign_state(bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0"),
                                                                      issued_at=200.0)))
    wait_until(lambda: collector.outcomes() == ["success"], 30, message="signed update succeeds")
    publish_desired(broker, "dev-1", old)
    refused = wait_until(lambda: collector.events("refused"), 10, message="replay refused")
    assert "replayed desired" in refused[0].reason
    service.stop()

    service = signed_agent()  # the old document is still the broker's retained copy
    wait_until(lambda: len(collector.events("refused")) == 2, 10, message="replay refused after the restart")
    assert service.agent.active_version() == "2.0.0" and collector.outcomes() == ["success"]


def test_a_signed_desired_naming_another_origin_gets_no_credentials(signed_agent, broker, collector, bundle_server):
    """Even a validly signed desired may only send the password to the configured server."""
    other = BundleServer().start()
    try:
        signed_agent()
        desired = other.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0"), issued_at=100.0)
        publish_desired(broker, "dev-1", sign_state(desired))
        wait_until(lambda: collector.outcomes() == ["failure"], 30, message="the download is refused")
        assert other.requests == []
        failure = [e for e in collector.events("transition") if e.event == "failure"][0]
        assert "allowed_download_origins" in failure.reason
    finally:
        other.stop()


# ---------------------------------------------------------------- the server's side


@pytest.mark.broker
def test_the_server_signs_with_the_key_add_device_prints(fleet):
    """What a device receives on `desired` verifies with the key in the config the server printed
    for it, and every field the device acts on is covered."""
    import tomllib

    from fleet_server.devices import provision_device
    from tests.server_fixtures import DeviceClient

    provisioned = provision_device(fleet.svc, "sig-1")
    keys = [raw_public_key(p) for p in tomllib.loads(provisioned.agent_config)["trust"]["desired_keys_pem"]]
    device = DeviceClient(fleet.config, "sig-1", provisioned.password).wait_connected()
    try:
        device.client.subscribe(device.topic("desired"), qos=1)
        desired = DesiredState(model="m", version="2.0.0", url="http://x/b.efb", sha256="0" * 64, size=1,
                               allow_downgrade=True, issued_at=fleet.svc.clock())
        assert fleet.svc.publisher.publish_desired("sig-1", desired)
        got = wait_until(lambda: [m for m in device.received if m.topic.endswith("/desired")], 10)
        doc = parse_document(got[-1].payload)
        verify_desired(doc, keys)
        assert msgspec.convert(doc, DesiredState) == desired
        doc["url"] = "http://evil.example/b.efb"
        with pytest.raises(DesiredTrustError):
            verify_desired(doc, keys)
        # A second desired within the same clock tick is still issued after the first, so the
        # device does not refuse it as a replay.
        second = msgspec.structs.replace(desired, version="2.0.1")
        assert fleet.svc.publisher.publish_desired("sig-1", second)
        both = wait_until(lambda: (m := [m for m in device.received if m.topic.endswith("/desired")])[1:] and m, 10)
        first, later = parse_document(both[0].payload), parse_document(both[-1].payload)
        verify_desired(later, keys)
        assert later["version"] == "2.0.1" and later["issued_at"] > first["issued_at"]
        check_fresh(later, check_fresh(first, None))  # what the device does: taken, not a replay
    finally:
        device.close()


def test_the_check_keeps_cryptography_out_of_the_agent_process():
    """In a process without cryptography (the long-lived agent) the signature is checked in a
    short-lived child: the answers are the same and the library is never imported."""
    import subprocess
    import sys

    from tests.agent_fixtures import ROOT

    doc = sign_desired(desired_doc(), keypair("server")[0])
    code = (
        "import json, sys\n"
        "from edge_agent.trust import DesiredTrustError, raw_public_key, verify_desired\n"
        "doc, keys = json.loads(sys.argv[1]), [raw_public_key(sys.argv[2])]\n"
        "verify_desired(doc, keys)\n"
        "doc['version'] = '9.9.9'\n"
        "try:\n"
        "    verify_desired(doc, keys)\n"
        "    print('forged accepted')\n"
        "except DesiredTrustError:\n"
        "    print('forged refused')\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(doc), public_pem("server")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert out == ["forged refused", "[]"]
