"""Failed-login counting for the console: a sliding window per operator name and per client
address, kept in the database so that every server process sees the same counts and a restart
does not reset them (a guesser cannot spread attempts over processes or wait for a restart)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Failed logins allowed per window, per operator name and per client address.
MAX_FAILURES_PER_NAME = 5
MAX_FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW_S = 300.0


def name_key(name: str) -> str:
    return f"n:{name.lower()}"


def address_key(address: str) -> str:
    return f"a:{address}"


@dataclass(frozen=True)
class LoginLimiter:
    """The policy; the failures themselves are rows in `Storage` (`add_login_failure`, ...).

    A guesser gets 5 tries per name and 20 per address per 5 minutes, whichever process they
    reach; a success clears its name's count but not the address's (one right password must not
    buy another 20 guesses at other names)."""

    max_per_name: int = MAX_FAILURES_PER_NAME
    max_per_address: int = MAX_FAILURES_PER_ADDRESS
    window_s: float = FAILURE_WINDOW_S

    def limit(self, key: str) -> int:
        return self.max_per_name if key.startswith("n:") else self.max_per_address

    def retry_after(self, storage: Any, name: str, address: str, now: float) -> int | None:
        """Seconds until another attempt is allowed, or None when it is allowed now."""
        keys = [name_key(name), address_key(address)]
        recent = storage.login_failures(keys, now - self.window_s)
        waits = [int(times[-self.limit(key)] + self.window_s - now) + 1
                 for key, times in recent.items() if len(times) >= self.limit(key)]
        return max(waits) if waits else None

    def failed(self, storage: Any, name: str, address: str, now: float) -> None:
        storage.add_login_failure([name_key(name), address_key(address)], now, forget_before=now - self.window_s)

    def succeeded(self, storage: Any, name: str) -> None:
        storage.clear_login_failures(name_key(name))

    def locked(self, storage: Any, now: float) -> list[dict[str, Any]]:
        """Operator names and client addresses locked out now, with their failures and until when."""
        out = []
        for row in storage.recent_login_failures(now - self.window_s):
            kind, _, value = row["key"].partition(":")
            times = row["times"]
            limit = self.limit(row["key"])
            if len(times) >= limit:
                out.append({"kind": "operator" if kind == "n" else "address", "value": value,
                            "failures": len(times), "last_at": times[-1],
                            "until": times[-limit] + self.window_s})
        return sorted(out, key=lambda r: -r["until"])
