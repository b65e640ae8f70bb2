"""paho-mqtt's network loop, able to watch any file descriptor.

paho's loop waits on its socket with `select.select()`, which refuses descriptors numbered 1024
(FD_SETSIZE) or above; paho takes that error for a lost connection and tries again, for ever and
without a word (eclipse-paho/paho.mqtt.python#819). A process with many files and sockets open
(a fleet server answering many HTTP clients, a long test run) then never connects. `install`
gives paho's client module a `select` whose `select()` is built on `poll()`, which has no such
limit; everything else is the real module.
"""

from __future__ import annotations

import errno
import select as _select
import types
from typing import Any

_READ = _select.POLLIN | _select.POLLPRI | _select.POLLHUP | _select.POLLERR
_WRITE = _select.POLLOUT | _select.POLLHUP | _select.POLLERR


def _fd(obj: Any) -> int:
    if isinstance(obj, int):
        fd = obj
    else:
        fileno = getattr(obj, "fileno", None)
        if fileno is None:
            raise TypeError("argument must be an int, or have a fileno() method")
        fd = fileno()
    if fd < 0:
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


class PollSelect(types.ModuleType):
    """The `select` module, with `select()` implemented on `poll()` (same arguments and results:
    a descriptor is readable or writable on hang-up or error too, as with select)."""

    def __init__(self) -> None:
        super().__init__("select")

    def __getattr__(self, name: str) -> Any:
        return getattr(_select, name)

    @staticmethod
    def select(rlist: list, wlist: list, xlist: list, timeout: float | None = None) -> tuple[list, list, list]:
        wanted: dict[int, int] = {}
        for objs, mask in ((rlist, _READ), (wlist, _WRITE), (xlist, _select.POLLPRI)):
            for obj in objs:
                fd = _fd(obj)
                wanted[fd] = wanted.get(fd, 0) | mask
        poller = _select.poll()
        for fd, mask in wanted.items():
            poller.register(fd, mask)
        events = dict(poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0))
        if any(ev & _select.POLLNVAL for ev in events.values()):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return (
            [o for o in rlist if events.get(_fd(o), 0) & _READ],
            [o for o in wlist if events.get(_fd(o), 0) & _WRITE],
            [o for o in xlist if events.get(_fd(o), 0) & _select.POLLPRI],
        )


_POLL_SELECT = PollSelect()


def install(client_module: types.ModuleType) -> types.ModuleType:
    """Make paho's client module (`paho.mqtt.client`) wait with poll(); returns the module."""
    if getattr(client_module, "select", None) is not _POLL_SELECT:
        client_module.select = _POLL_SELECT
    return client_module
