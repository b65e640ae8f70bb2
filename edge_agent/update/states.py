"""What each update state does on entry. Each returns an Event, or None to wait.

States touch the device only through the `UpdateHost` the machine is given (the Agent), so a
simulator drives the same code with its own host, clock and files. A handler gets the running
machine as an `UpdateRun` (update/context.py): the states never import the machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_agent.download import (
    DiskFull,
    DownloadError,
    DownloadRequest,
    download,
    file_sha256,
    resolve_url,
)
from edge_agent.protocol import DesiredState, encode
from edge_agent.store import SAFE_VERSION, free_bytes, is_disk_full, is_downgrade
from edge_agent.update.events import LIVE_STATES, Event, State
from model_tools.bundle import extract_bundle, load_extracted, read_bundle
from model_tools.digest import sha256
from model_tools.errors import BundleError
from model_tools.manifest import Manifest

if TYPE_CHECKING:
    from edge_agent.update.context import UpdateRun

MAX_ATTEMPTS = 3  # transient failures (network, restarts) of one desired before giving up


def desired_key(d: DesiredState) -> str:
    """Identity of one desired message: any change (e.g. allow_downgrade) is a new request."""
    return sha256(encode(d)).hexdigest()[:16]


def attempts_left(attempts: dict[str, int], d: DesiredState) -> bool:
    """Whether `d` may be tried again: it has not failed for good nor used up its attempts."""
    return attempts.get(desired_key(d), 0) < MAX_ATTEMPTS


def schema_problem(active: Manifest, candidate: Manifest) -> str | None:
    """Why `candidate` would break local apps built for `active`, or None when compatible."""
    a, c = active.inputs, candidate.inputs
    if [f.name for f in a] != [f.name for f in c]:
        return f"input features differ: active {[f.name for f in a][:8]}, candidate {[f.name for f in c][:8]}"
    for fa, fc in zip(a, c, strict=True):
        if (fa.kind, fa.dtype) != (fc.kind, fc.dtype):
            return f"feature {fa.name!r} changes from {fa.kind}/{fa.dtype} to {fc.kind}/{fc.dtype}"
        if fa.allow_nan and not fc.allow_nan:
            return f"feature {fa.name!r} no longer accepts missing values"
        missing = set(fa.categories or ()) - set(fc.categories or ())
        if fa.kind == "categorical" and missing:
            return f"feature {fa.name!r} drops categories {sorted(missing)[:5]}"
    return None


def window_open(d: DesiredState, now: float) -> bool:
    """Whether a live update may be activated now: the desired has no maintenance windows, or
    `now` is inside one of them (UTC intervals the server computed for this device)."""
    return d.activate_windows is None or any(a <= now < b for a, b in d.activate_windows)


def refusal(m: UpdateRun, d: DesiredState) -> str | None:
    """Reasons to refuse a desired state without starting (checked in Idle)."""
    if not SAFE_VERSION.match(d.version):
        return f"version {d.version[:80]!r} is not a safe version name"
    active = m.host.active_version()
    if is_downgrade(d.version, active) and not d.allow_downgrade:
        return f"refusing downgrade from {active} to {d.version} (desired.allow_downgrade is not set)"
    if d.size <= 0 or len(d.sha256) != 64:
        return "desired has no valid size/sha256"
    return None


def idle(m: UpdateRun) -> Event | None:
    d = m.host.desired()
    if d is None or d.version == m.host.active_version():
        return None
    if not attempts_left(m.ctx.attempts, d):
        return None  # already failed for good: wait for a new desired
    if m.ctx.desired is not None and desired_key(m.ctx.desired) == desired_key(d) and m.disk_full_waiting():
        return None  # the same update failed on a full disk: wait for the space it needs
    reason = refusal(m, d)
    if reason:
        m.ctx.attempts[desired_key(d)] = MAX_ATTEMPTS
        m.refuse(d, reason)
        return None
    m.begin(d)
    return Event.SUCCESS


def _still_wanted(m: UpdateRun) -> bool:
    d, mine = m.host.desired(), m.ctx.desired
    return d is not None and mine is not None and d.version == mine.version and d.sha256 == mine.sha256


def download_state(m: UpdateRun) -> Event | None:
    d = m.ctx.desired
    assert d is not None
    cfg = m.host.config
    url = resolve_url(d.url, cfg.server.url)
    req = DownloadRequest(
        url=url,
        server_url=cfg.server.url,  # the only origin the device password goes to
        allowed_origins=cfg.update.allowed_download_origins,
        via=m.host.download_via(url),
        dest=m.host.data.downloads / f"{d.sha256}.efb",
        size=d.size,
        sha256=d.sha256,
        username=cfg.device_id,
        password=cfg.mqtt.password,
        ca_file=cfg.mqtt.ca_file,
        timeout_s=cfg.update.download_timeout_s,
        max_bytes=cfg.update.max_download_bytes,
        min_free_disk_bytes=cfg.update.min_free_disk_bytes,
    )
    try:
        download(req, cancelled=lambda: not _still_wanted(m))
    except DownloadError as exc:
        if not _still_wanted(m):
            return Event.NOTHING_TO_DO
        disk = (exc.free, exc.needed) if isinstance(exc, DiskFull) else None
        return m.fail(f"download: {exc}", final=not exc.transient, disk=disk)
    return Event.SUCCESS if _still_wanted(m) else Event.NOTHING_TO_DO


def revoked_key_ids(m: UpdateRun) -> list[str]:
    """Signing keys the device refuses (`[trust] revoked_key_ids`), even if it still trusts them."""
    trust = getattr(m.host.config, "trust", None)
    return list(getattr(trust, "revoked_key_ids", ()))


def verify(m: UpdateRun) -> Event | None:
    d = m.ctx.desired
    assert d is not None
    path = m.host.data.downloads / f"{d.sha256}.efb"
    if not path.exists() or path.stat().st_size != d.size:
        return m.fail(f"verify: downloaded file is missing or not {d.size} bytes", final=False)
    actual = file_sha256(path)
    if actual != d.sha256:
        path.unlink(missing_ok=True)  # a corrupt file must not be resumed
        return m.fail(f"verify: sha256 of the download is {actual[:12]}..., desired says {d.sha256[:12]}...")
    try:
        bundle = read_bundle(path, m.host.trusted_keys(), revoked_key_ids=revoked_key_ids(m))
    except BundleError as exc:
        return m.fail(f"verify: {exc}")
    manifest = bundle.manifest
    if manifest.name != d.model or manifest.version != d.version:
        return m.fail(
            f"verify: bundle is {manifest.name} {manifest.version}, desired names {d.model} {d.version}"
        )
    active = m.host.active_manifest()
    if active is not None and not d.allow_schema_change:
        problem = schema_problem(active, manifest)
        if problem:
            return m.fail(f"verify: incompatible input schema: {problem} (desired.allow_schema_change is not set)")
    return Event.SUCCESS if _still_wanted(m) else Event.NOTHING_TO_DO


def install(m: UpdateRun) -> Event | None:
    d = m.ctx.desired
    assert d is not None
    try:
        extract_bundle(
            m.host.data.downloads / f"{d.sha256}.efb",
            m.host.data.version_dir(d.version),
            m.host.trusted_keys(),
            overwrite=True,
            revoked_key_ids=revoked_key_ids(m),
        )
    except OSError as exc:
        if is_disk_full(exc):  # roughly the bundle's size again, unpacked
            free = free_bytes(m.host.data.root)
            return m.fail(f"install: disk full: {free} bytes free, about {d.size} needed ({exc})", disk=(free, d.size))
        return m.fail(f"install: {exc}")
    except BundleError as exc:
        return m.fail(f"install: {exc}")
    return Event.SUCCESS


def selftest(m: UpdateRun) -> Event | None:
    d = m.ctx.desired
    assert d is not None
    try:
        bundle = load_extracted(m.host.data.version_dir(d.version), m.host.trusted_keys())
        runtime = m.host.load_runtime(bundle)
    except Exception as exc:  # a model onnxruntime cannot load is a failed self-test
        return m.fail(f"selftest: cannot load the model: {exc}")
    result = runtime.self_test(latency_floor_ms=m.host.config.update.selftest_latency_floor_ms)
    if not result.ok:
        return m.fail(f"selftest: {result.reason}")
    m.candidate = runtime
    m.ctx.selftest_p50_ms = result.latency_ms_p50
    return Event.SUCCESS if _still_wanted(m) else Event.NOTHING_TO_DO


def shadow(m: UpdateRun) -> Event | None:
    d = m.host.desired()
    if not _still_wanted(m):
        m.host.set_shadow(None)
        return Event.NOTHING_TO_DO
    assert d is not None
    if d.mode == "live":
        m.host.set_shadow(None)
        m.ctx.desired = d
        if not window_open(d, m.host.clock()):
            return None  # ready; `UpdateMachine.check_window` activates when the window opens
        return Event.SUCCESS
    if m.candidate is None:
        return m.fail("shadow: the candidate is not loaded", final=False)
    m.host.set_shadow(m.candidate)
    return None  # wait for desired to switch to live or move on


def activate(m: UpdateRun) -> Event | None:
    if m.candidate is None:
        return m.fail("activate: the candidate is not loaded", final=False)
    m.host.activate(m.candidate)
    m.ctx.activated_at = m.host.clock()
    return Event.SUCCESS


def probation(m: UpdateRun) -> Event | None:
    m.host.start_probation()
    return None  # `UpdateMachine.check_probation` posts the verdict from tick


def commit(m: UpdateRun) -> Event | None:
    d = m.ctx.desired
    assert d is not None
    try:
        m.host.commit(d.version, m.ctx.previous_version)
    except OSError as exc:
        if is_disk_full(exc):
            free = free_bytes(m.host.data.root)
            return m.fail(f"commit: disk full: {free} bytes free, state.json needs 4096 ({exc})", disk=(free, 4096))
        return m.fail(f"commit: {exc}", final=False)
    return Event.SUCCESS


def check_rollback(m: UpdateRun) -> Event | None:
    return Event.SUCCESS if m.ctx.went_live else Event.NOTHING_TO_DO


def rollback(m: UpdateRun) -> Event | None:
    try:
        m.host.rollback(m.ctx.previous_version)
    except Exception as exc:
        m.ctx.last_error = f"rollback: {exc}"
        return Event.FAILURE
    return Event.SUCCESS


def failed(m: UpdateRun) -> Event | None:
    d = m.ctx.desired
    if d is not None:
        key = desired_key(d)
        if m.ctx.disk_needed is None:  # a full disk uses no attempt: it is retried once space returns
            m.ctx.attempts[key] = MAX_ATTEMPTS if m.ctx.final else m.ctx.attempts.get(key, 0) + 1
    return Event.SUCCESS


def cleanup(m: UpdateRun) -> Event | None:
    m.host.set_shadow(None)
    m.candidate = None
    d = m.ctx.desired
    try:
        if d is not None:
            done = m.ctx.outcome is not None and (m.ctx.outcome.value != "failure" or m.ctx.final)
            if done:
                (m.host.data.downloads / f"{d.sha256}.efb").unlink(missing_ok=True)
                (m.host.data.downloads / f"{d.sha256}.efb.part").unlink(missing_ok=True)
        m.host.prune_versions()
    except OSError as exc:
        m.ctx.last_error = f"cleanup: {exc}"
        return Event.FAILURE
    return Event.SUCCESS


HANDLERS = {
    State.IDLE: idle,
    State.DOWNLOAD: download_state,
    State.VERIFY: verify,
    State.INSTALL: install,
    State.SELFTEST: selftest,
    State.SHADOW: shadow,
    State.ACTIVATE: activate,
    State.PROBATION: probation,
    State.COMMIT: commit,
    State.CHECK_ROLLBACK: check_rollback,
    State.ROLLBACK: rollback,
    State.FAILED: failed,
    State.CLEANUP: cleanup,
}
assert set(HANDLERS) >= LIVE_STATES
