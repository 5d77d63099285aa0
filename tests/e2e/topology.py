"""Who is where in the end-to-end suite.

    hs1.test  127.0.0.2   edge :443 + :8448 -> Synapse :8008
    hs2.test  127.0.0.3   edge :443 + :8448 -> Synapse :8008
    hs3.test  127.0.0.4   edge :443 + :8448 -> %xx-decoding shim :8009
                                             -> Synapse :8008
    hs4.test  127.0.0.5   edge :443 + :8448 -> Synapse's main process :8008
                                             and its workers (see workers.py)

hs4.test is started only by the worker tests (test_e2e_workers.py).

Users: alice on hs1, bob on hs2, carol on hs3 (only in the tests that
expect failures), and an admin on hs1 whose token is used only on Synapse's
own port (whois).
"""

from __future__ import annotations

import os

import attrs

from tests.e2e.homeserver import Homeserver

HOSTS = {"hs1.test": "127.0.0.2", "hs2.test": "127.0.0.3", "hs3.test": "127.0.0.4"}
# The homeserver with Synapse workers, apart from the cluster above.
WORKERS_HOST = ("hs4.test", "127.0.0.5")
# Every name the suite needs in /etc/hosts.
ALL_HOSTS = {**HOSTS, WORKERS_HOST[0]: WORKERS_HOST[1]}
# Which homeserver's edge forwards through the %xx-decoding shim. To watch
# the main scenario fail at the signature checks, run the suite with
# MATRIX_EDGE_E2E_DECODING_SHIM=hs2.test (the hs3 tests then fail too, as
# nothing decodes there).
DECODING_SHIM_HOST = os.environ.get("MATRIX_EDGE_E2E_DECODING_SHIM", "hs3.test")
SHIM_PORT = 8009
PASSWORD = "correct horse battery staple"

# Each client connects from its own loopback address, so that the address
# Synapse records can only have come from X-Forwarded-For.
SOURCE_IPS = {
    "alice": "127.0.0.21",
    "bob": "127.0.0.22",
    "carol": "127.0.0.23",
}


@attrs.frozen
class Cluster:
    hs1: Homeserver
    hs2: Homeserver
    hs3: Homeserver  # behind the %xx-decoding shim


@attrs.frozen
class User:
    name: str
    user_id: str
    device_id: str  # of the matrix-nio login
    server: Homeserver


@attrs.frozen
class Users:
    alice: User  # on hs1
    bob: User  # on hs2
    hs1_admin_token: str
