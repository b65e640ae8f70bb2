"""Message accounting per device and install, the same on every backend.

Ingest reads a device's `seq_stats` row, applies the batch's fresh seqs in seq order (`account`)
and writes the row back, all in the batch's transaction.
"""

from __future__ import annotations

from edge_agent.protocol import SEQ_NEW_INSTALL_JUMP

# A seq more than this (2**19) above a device's highest is a new install: an outbox created afresh
# (new install, wiped data dir) starts its seqs at its creation second << 20, while a real gap
# (messages the outbox bound dropped) stays in the thousands. One constant with the agent's.
NEW_INSTALL_JUMP = SEQ_NEW_INSTALL_JUMP


class SeqAccount:
    """One device's message accounting (a `seq_stats` row without the retention floor)."""

    __slots__ = ("first_seq", "max_seq", "received", "dropped_total", "reinstalls", "reinstalled_at")

    def __init__(self, first_seq: int, max_seq: int, received: int, dropped_total: int,
                 reinstalls: int = 0, reinstalled_at: float | None = None) -> None:
        self.first_seq, self.max_seq, self.received = first_seq, max_seq, received
        self.dropped_total, self.reinstalls, self.reinstalled_at = dropped_total, reinstalls, reinstalled_at

    def row(self) -> tuple:
        return (self.first_seq, self.max_seq, self.received, self.dropped_total, self.reinstalls,
                self.reinstalled_at)


def account(acc: SeqAccount | None, seqs: list[tuple[int, int]], now: float) -> SeqAccount | None:
    """Apply a device's fresh (seq, dropped_total) pairs, in seq order, to its accounting.

    - a seq more than NEW_INSTALL_JUMP above `max_seq` starts a new install: first_seq, max_seq,
      received and dropped_total (the agent's own counter since install) start over from it, and
      `reinstalls` counts it;
    - a seq more than NEW_INSTALL_JUMP below `first_seq` is a straggler of an earlier install
      (another ingest process stored it after the jump): stored, but not counted, so `missing`
      (max_seq - first_seq + 1 - received) stays that of the current install;
    - any other seq counts in the current install, also when it arrives after higher ones.
    Events carry no dropped_total: they pass 0.
    """
    for seq, dropped in sorted(seqs):
        if acc is None:
            acc = SeqAccount(seq, seq, 1, dropped)
        elif seq > acc.max_seq + NEW_INSTALL_JUMP:
            acc = SeqAccount(seq, seq, 1, dropped, acc.reinstalls + 1, now)
        elif seq < acc.first_seq - NEW_INSTALL_JUMP:
            continue
        else:
            acc.first_seq, acc.max_seq = min(acc.first_seq, seq), max(acc.max_seq, seq)
            acc.received += 1
            acc.dropped_total = max(acc.dropped_total, dropped)
    return acc
