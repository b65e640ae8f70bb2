"""Delivery acknowledgements: the seqs an ingest process has stored, sent back to each device on `ack`.

A broker's PUBACK only proves the broker received a message; a broker killed before its next
autosave forgets it, and a message published while no ingest process is subscribed is dropped.
So a device deletes an outbox message only when the server acknowledges its seq (and sends it
again when no acknowledgement comes). Ingest adds the seqs of every committed batch here; `due`
hands out one `DeliveryAck` per device at most every `interval_s`, and at once for a device with
`batch` seqs waiting. Each ingest process acknowledges what it stored itself: the shared
subscription splits a device's messages between processes, and the device does not care who acks.
"""

from __future__ import annotations

from collections.abc import Iterable

ACK_BATCH = 64  # seqs a device waits for before its acknowledgement goes out at once
ACK_KEEP = 4 * ACK_BATCH  # seqs kept per device while the broker is unreachable (the rest are resent)


class AckBuffer:
    """Seqs waiting to be acknowledged, per device; bounded by `keep` seqs a device.

    Not thread-safe: the ingest writer thread alone adds and takes.
    """

    def __init__(self, interval_s: float, *, batch: int = ACK_BATCH, keep: int = ACK_KEEP) -> None:
        self.interval_s = interval_s
        self.batch = batch
        self.keep = max(keep, batch)
        self.dropped = 0  # seqs forgotten because a device's list was full: the device resends them
        self._pending: dict[str, list[int]] = {}
        self._full: set[str] = set()  # devices with `batch` or more seqs waiting
        self._last_flush = float("-inf")

    def add(self, keys: Iterable[tuple[str, int]]) -> None:
        """Remember (device, seq) keys the server now has (stored, duplicate, or refused for good)."""
        pending, batch = self._pending, self.batch
        for device, seq in keys:
            seqs = pending.get(device)
            if seqs is None:
                pending[device] = [seq]
                continue
            seqs.append(seq)
            if len(seqs) >= batch:
                self._full.add(device)
                if len(seqs) > self.keep:
                    # No broker for a while: forget the oldest; the device sends them again.
                    extra = len(seqs) - self.keep
                    del seqs[:extra]
                    self.dropped += extra

    def __len__(self) -> int:
        return sum(len(s) for s in self._pending.values())

    def due(self, now: float) -> list[tuple[str, list[int]]]:
        """Take what should be acknowledged now: every device once per interval, full ones at once."""
        if now - self._last_flush >= self.interval_s:
            self._last_flush = now
            out, self._pending = list(self._pending.items()), {}
            self._full.clear()
            return out
        if not self._full:
            return []
        out = [(device, self._pending.pop(device)) for device in self._full if device in self._pending]
        self._full.clear()
        return out

    def put_back(self, acks: list[tuple[str, list[int]]]) -> None:
        """Return acknowledgements that could not be published (not connected): sent next time."""
        for device, seqs in acks:
            self.add((device, seq) for seq in seqs)
