"""A delivered JetStream message, and the metadata its ack subject carries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered JetStream message and the metadata its reply subject carries."""

    stream: str
    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None
    stream_seq: int
    num_delivered: int
    stored_ns: int  # when the stream stored it, ns since the epoch

    @property
    def size(self) -> int:
        """What the message counts against a batch's byte budget."""
        return len(self.data) + len(self.subject) + len(self.reply)


def parse_reply(reply: str) -> tuple[str, int, int, int]:
    """(stream, deliveries, stream sequence, stored ns) from `$JS.ACK...`, v1 or v2 token layout."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return t[2], int(t[4]), int(t[5]), int(t[7])
    if len(t) >= 11:  # $JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.x]
        return t[4], int(t[6]), int(t[7]), int(t[9])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def ts_from_nats(text: str | None) -> datetime | None:
    """NATS timestamps carry nanoseconds; datetime takes microseconds. '0001-01-01...' means never."""
    if not text or text.startswith("0001-"):
        return None
    m = re.match(r"^(.*?T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$", text)
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    return datetime.fromisoformat(m.group(1) + frac + ("+00:00" if m.group(3) == "Z" else m.group(3)))
