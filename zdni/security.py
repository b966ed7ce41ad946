"""Optional ZeroMQ CURVE encryption and authentication for runs that cross hosts.

`zdni keys DIR` writes two key pairs: broker.key / broker.key_secret and client.key /
client.key_secret. The broker (with --curve-dir DIR holding broker.key_secret and the public
client keys it accepts) encrypts every socket and refuses peers whose key it does not know;
workers and the driver (with --curve-dir DIR holding client.key_secret and broker.key) encrypt
and authenticate themselves. Copy only what each host needs: the broker host does not need the
client's secret key, and a worker host does not need the broker's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zdni.errors import ZdniError


class KeyError_(ZdniError, RuntimeError):
    """A key file is missing or unreadable; the message names it."""


def create_keys(directory: str) -> list[str]:
    """Write the broker's and a client's key pairs into `directory`; return the paths."""
    if not zmq.has("curve"):
        raise KeyError_("this libzmq has no CURVE support")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in ("broker", "client"):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        paths += [public, secret]
    return paths


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    if not os.path.exists(path):
        raise KeyError_(f"key file {path} is missing (create keys with `zdni keys DIR`)")
    try:
        public, private = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise KeyError_(f"key file {path} is unreadable: {exc}") from None
    if secret and private is None:
        raise KeyError_(f"key file {path} holds no secret key")
    return public, private


@dataclass
class Curve:
    """The keys of one process: its own pair, and the broker's public key for clients."""

    public: bytes
    secret: bytes
    server_public: bytes | None  # None: this process is the broker (the CURVE server)
    directory: str

    @classmethod
    def broker(cls, directory: str) -> Curve:
        public, secret = _load(os.path.join(directory, "broker.key_secret"), True)
        assert secret is not None
        return cls(public, secret, None, directory)

    @classmethod
    def client(cls, directory: str) -> Curve:
        public, secret = _load(os.path.join(directory, "client.key_secret"), True)
        server, _ = _load(os.path.join(directory, "broker.key"), False)
        assert secret is not None
        return cls(public, secret, server, directory)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (broker) or a client of the broker, before bind/connect."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        if self.server_public is None:
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.server_public

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The broker's ZAP handler: accept only the public keys in the key directory."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=self.directory)
        return auth
