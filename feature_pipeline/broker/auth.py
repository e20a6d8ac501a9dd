"""How to authenticate to NATS and encrypt the connection, and keeping credentials out of output."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from typing import Any


def redact(url: str) -> str:
    """Drop user:password@ from server URLs before they reach a log or the UI."""
    return ",".join(re.sub(r"^([A-Za-z]+://).*@", r"\1***@", u) for u in url.split(","))


@dataclass(frozen=True)
class NatsAuth:
    """Empty strings mean 'not used'. Paths are files."""

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    creds: str = ""
    nkey_seed: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for nats-py's `connect`."""
        opts: dict[str, Any] = {}
        if self.user:
            opts.update(user=self.user, password=self.password)
        if self.token:
            opts["token"] = self.token
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey_seed:
            opts["nkeys_seed"] = self.nkey_seed
        if self.tls_ca or self.tls_cert or url.startswith("tls://"):
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = ctx
        return opts
