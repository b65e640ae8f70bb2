"""A wrong device password costs one argon2 check whether the device id exists or not, so the
bundle download's response time does not tell which device ids exist (no device-id oracle).

The test counts the argon2 verifications of a real hasher instead of measuring times: an unknown,
a revoked and a known id with a wrong password each take exactly one."""

from __future__ import annotations

import base64

import pytest
from argon2 import PasswordHasher

from fleet_server.auth import PasswordChecker, hash_password
from tests.server_fixtures import make_config


class CountingHasher(PasswordHasher):
    """The real argon2id hasher, counting how often it verifies."""

    def __init__(self) -> None:
        super().__init__(time_cost=2, memory_cost=19456, parallelism=1)
        self.verifications = 0

    def verify(self, hash, password):  # noqa: A002 - argon2's own parameter name
        self.verifications += 1
        return super().verify(hash, password)


def test_unknown_and_known_ids_cost_one_verification_each():
    hasher = CountingHasher()
    checker = PasswordChecker(hasher=hasher)
    stored = hash_password("right password")
    assert checker.check("known", "wrong", stored) is False
    assert hasher.verifications == 1
    assert checker.check("nobody", "wrong", None) is False  # the dummy hash, not an early return
    assert hasher.verifications == 2
    assert checker.check("nobody", "right password", None) is False  # never true without a hash
    assert hasher.verifications == 3
    assert checker.check("known", "right password", stored) is True
    assert checker.check("known", "right password", stored) is True  # cached success
    assert hasher.verifications == 4


@pytest.fixture
def server(tmp_path):
    from fleet_server.service import FleetServer

    fleet = FleetServer(make_config(tmp_path / "server"), mqtt=False, ingest=False, loops=False)
    hasher = CountingHasher()
    fleet.svc.passwords = PasswordChecker(hasher=hasher)
    fleet.start()
    yield fleet, hasher
    fleet.stop()


def test_bundle_download_checks_unknown_ids_against_a_dummy_hash(server):
    import requests

    from fleet_server.devices import provision_device, revoke_device

    fleet, hasher = server
    provision_device(fleet.svc, "known-dev", {})
    provision_device(fleet.svc, "gone-dev", {})
    revoke_device(fleet.svc, "gone-dev")

    def attempt(device_id: str) -> int:
        before = hasher.verifications
        auth = base64.b64encode(f"{device_id}:not-the-password".encode()).decode()
        r = requests.get(f"{fleet.url}/api/v1/models/pump/1.0.0/bundle", headers={"Authorization": f"Basic {auth}"},
                         timeout=10)
        assert r.status_code == 401, r.text
        return hasher.verifications - before

    assert attempt("known-dev") == 1
    assert attempt("no-such-dev") == 1  # used to be 0: the check returned at once for unknown ids
    assert attempt("gone-dev") == 1
    assert attempt("../../etc") == 1
