"""Python face of the native migration engine.

The engine runs each migration on its own native threads; these calls
return promptly (``wait`` blocks with the GIL released).  Protocol:
``src/PROTOCOL.md``.
"""

import dataclasses
import enum
import logging

from nova_bhyve.native._engine import ffi, lib

LOG = logging.getLogger(__name__)

# OpenSSL seeds its random generator on first use: do it as the engine
# loads, not inside the first migration's handshake
if lib.nb_engine_init() != 0:
    LOG.warning("OpenSSL has no randomness; migrations will fail their "
                "handshake until it has")


class ErrorKind(enum.IntEnum):
    """Why a request or a migration failed (``enum nb_error_kind``)."""

    NONE = lib.NB_ERR_NONE
    INVALID = lib.NB_ERR_INVALID            # a parameter or request refused
    AUTH = lib.NB_ERR_AUTH                  # a side failed authentication
    INCOMPATIBLE = lib.NB_ERR_INCOMPATIBLE  # the hosts cannot hold the guest
    PEER_GONE = lib.NB_ERR_PEER_GONE        # closed, reset or aborted
    REFUSED = lib.NB_ERR_REFUSED            # the peer refused (reason in text)
    CANCELLED = lib.NB_ERR_CANCELLED        # on request, or by the source
    TIMEOUT = lib.NB_ERR_TIMEOUT            # nothing heard within the timeout
    CORRUPT = lib.NB_ERR_CORRUPT            # a frame, page or digest check
    VMM = lib.NB_ERR_VMM                    # the vmm port failed
    RESOURCE = lib.NB_ERR_RESOURCE          # memory, threads, sockets
    TOO_LATE = lib.NB_ERR_TOO_LATE          # cancel after the hand-over
    INTERNAL = lib.NB_ERR_INTERNAL          # an engine bug


class MigrationError(Exception):
    """The engine refused a request or the migration failed; ``kind`` says why."""

    kind = ErrorKind.INTERNAL


class InvalidRequest(MigrationError):
    """A parameter or request the engine refuses."""

    kind = ErrorKind.INVALID


class AuthenticationFailed(MigrationError):
    """A side of the migration failed authentication."""

    kind = ErrorKind.AUTH


class IncompatibleHosts(MigrationError):
    """The two hosts cannot hold the same guest."""

    kind = ErrorKind.INCOMPATIBLE


class PeerGone(MigrationError):
    """The peer closed, reset or aborted the session."""

    kind = ErrorKind.PEER_GONE


class PeerRefused(MigrationError):
    """The peer refused; its reason is in the message."""

    kind = ErrorKind.REFUSED


class MigrationCancelled(MigrationError):
    """Cancelled on request (or, on the destination, by the source)."""

    kind = ErrorKind.CANCELLED


class MigrationTimedOut(MigrationError):
    """Nothing heard from the peer within the timeout."""

    kind = ErrorKind.TIMEOUT


class CorruptStream(MigrationError):
    """A frame, page record or the memory digest failed its check."""

    kind = ErrorKind.CORRUPT


class VmmFailure(MigrationError):
    """The vmm port failed (open, pause, device state, memory)."""

    kind = ErrorKind.VMM


class ResourceExhausted(MigrationError):
    """Out of memory, threads, sockets or randomness."""

    kind = ErrorKind.RESOURCE


class TooLate(MigrationError):
    """Refused because the guest has been handed to the destination."""

    kind = ErrorKind.TOO_LATE


class EngineBug(MigrationError):
    """An engine bug, such as an illegal phase transition."""

    kind = ErrorKind.INTERNAL


_ERRORS = {cls.kind: cls for cls in (
    InvalidRequest, AuthenticationFailed, IncompatibleHosts, PeerGone,
    PeerRefused, MigrationCancelled, MigrationTimedOut, CorruptStream,
    VmmFailure, ResourceExhausted, TooLate, EngineBug)}


def error_for(kind, message):
    """The MigrationError subclass instance for an ``nb_error_kind``."""
    try:
        kind = ErrorKind(kind)
    except ValueError:
        kind = ErrorKind.INTERNAL
    return _ERRORS.get(kind, MigrationError)(message)


def _raise_if(rc, err):
    """Raise the typed error of a refused call (rc: the negated kind)."""
    if rc != 0:
        raise error_for(-rc, ffi.string(err).decode(errors="replace"))


class Mode(enum.IntEnum):
    """How the guest is moved."""

    LIVE = lib.NB_MODE_LIVE     # pre-copy rounds from the dirty log
    WARM = lib.NB_MODE_WARM     # pause, copy everything, run on the destination
    COLD = lib.NB_MODE_COLD     # from or to a checkpoint file set


class VmmKind(enum.IntEnum):
    """Which vmm port reaches the VM."""

    TESTHOST = lib.NB_VMM_TESTHOST
    BHYVE = lib.NB_VMM_BHYVE
    CHECKPOINT = lib.NB_VMM_CKPT
    NONE = lib.NB_VMM_NONE      # a stopped guest: its disks only (cold mode)


class Phase(enum.IntEnum):
    """Where a migration is."""

    SETUP = lib.NB_PHASE_SETUP
    HANDSHAKE = lib.NB_PHASE_HANDSHAKE
    PRECOPY = lib.NB_PHASE_PRECOPY
    ITERATE = lib.NB_PHASE_ITERATE
    SWITCHOVER = lib.NB_PHASE_SWITCHOVER
    VERIFY = lib.NB_PHASE_VERIFY
    COMMIT = lib.NB_PHASE_COMMIT
    DONE = lib.NB_PHASE_DONE
    FAILED = lib.NB_PHASE_FAILED
    CANCELLED = lib.NB_PHASE_CANCELLED


class Result(enum.IntEnum):
    """How a migration ended (RUNNING while it has not)."""

    RUNNING = lib.NB_RESULT_RUNNING
    COMPLETED = lib.NB_RESULT_COMPLETED
    FAILED = lib.NB_RESULT_FAILED
    CANCELLED = lib.NB_RESULT_CANCELLED


@dataclasses.dataclass(frozen=True)
class RoundStats:
    """One pre-copy round."""

    start_ms: float
    duration_ms: float
    pages: int
    bytes: int
    dirty: int
    blocks: int = 0         # disk blocks sent in the round
    dirty_blocks: int = 0   # disk blocks pending at the sync that began it
    throttle: int = 0       # percent the guest was slowed by meanwhile
    log_reads: int = 0      # dirty-log chunks it read and cleared (lazy)
    expected_ms: float = 0.0    # pause predicted by the count that began it


@dataclasses.dataclass(frozen=True)
class MigrationStats:
    """A snapshot of a migration's progress."""

    phase: Phase
    result: Result
    is_source: bool
    mode: Mode
    port: int
    round: int
    mem_total: int
    bytes_transferred: int
    bytes_remaining: int
    pages_sent: int
    pages_zero: int
    pages_delta: int
    pages_compressed: int
    pages_raw: int
    dirty_pages: int
    dirty_rate: float
    bandwidth: float
    expected_downtime_ms: float
    downtime_ms: float
    catchup_ms: float
    total_ms: float
    rtt_ms: float
    max_downtime_ms: int
    throttle: int
    delta_cache_bytes: int
    compressing: int
    committed: bool
    guest_runs_here: bool
    digest: int
    rounds: tuple
    error: str
    error_kind: ErrorKind = ErrorKind.NONE
    disk_total: int = 0         # bytes of all disks moved
    disk_bytes: int = 0         # bytes on the wire in DISK frames
    disk_blocks: int = 0        # blocks sent (source) or written (destination)
    dirty_blocks: int = 0       # disk blocks pending at the last sync
    disk_digest: int = 0
    # source: downtime_ms in its parts (engine.h): pausing the guest and
    # its last syncs, the final round and device state, DIGEST until READY,
    # COMMIT until RUNNING
    pause_stop_ms: float = 0.0
    pause_final_ms: float = 0.0
    pause_verify_ms: float = 0.0
    pause_commit_ms: float = 0.0
    stream_bytes: int = 0       # stream disks' bytes sent or written
    converge_steps: int = 0     # throttle steps: rounds stopped shrinking
    trim_steps: int = 0         # throttle steps: a pause that fitted, cut
    channels: int = 0           # page channels of the session (as chosen)
    # source: the time per page (or block) the destination took beyond
    # the source's, as the last round timed on it showed, which
    # expected_downtime_ms adds for each page and block of the rest (0: it
    # kept up, or no round timed since round 0)
    dest_excess_us: float = 0.0

    @property
    def finished(self):
        """True once the migration has ended, whichever way."""
        return self.result != Result.RUNNING

    @property
    def exception(self):
        """The typed MigrationError for a failed migration, else None."""
        if self.result in (Result.RUNNING, Result.COMPLETED):
            return None
        return error_for(self.error_kind, self.error)


_VERIFY = {"incremental": lib.NB_VERIFY_INCREMENTAL, "full": lib.NB_VERIFY_FULL}
_COMPRESS = {"off": lib.NB_COMPRESS_OFF, False: lib.NB_COMPRESS_OFF,
             "on": lib.NB_COMPRESS_ON, True: lib.NB_COMPRESS_ON,
             "auto": lib.NB_COMPRESS_AUTO}


def _channels(value):
    """0 for "auto", else the count given (the engine checks it: 1..16, or
    0, auto, as the Nova option says it)."""
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"channels must be 1..16 or 'auto', not {value!r}")
    return value


def _compress(value):
    try:
        return _COMPRESS[value]
    except (KeyError, TypeError):
        raise InvalidRequest("compress must be 'auto', 'on' or 'off' "
                             f"(or a bool), not {value!r}") from None


def _delta_cache(value):
    """(bytes, auto) from "auto", "auto:<cap bytes>" or a byte count."""
    if value == "auto":
        return 0, 1
    if isinstance(value, str) and value.startswith("auto:"):
        return int(value[5:]), 1
    if isinstance(value, int) and value >= 0:
        return value, 0
    raise InvalidRequest("delta_cache must be 'auto' or a number of bytes >= 0, "
                         f"not {value!r}")


@dataclasses.dataclass(frozen=True)
class Stream:
    """A stream disk's descriptors (PROTOCOL.md, "Streams").

    ``first`` and ``final``: the two parts, readable on the source (part 0
    while the guest runs, part 1 produced once it is paused), writable on
    the destination (closed by the engine at each part's end).
    ``notify`` (source only): the engine writes one byte there once the
    guest is paused, the signal for part 1's producer, then closes it.
    ``status``: read to its end once the parts are done; "ok" from the
    producers (source) or consumers (destination), anything else fails
    the migration before the commit.  The engine keeps duplicates: the
    caller closes its own descriptors once the migration has started.
    """

    first: int
    final: int
    status: int
    notify: int = -1


def _stream_arrays(p, streams, keep):
    streams = list(streams)
    fds = ffi.new("int[]", [fd for s in streams for fd in (s.first, s.final)] or 1)
    notify = ffi.new("int[]", [s.notify for s in streams] or 1)
    status = ffi.new("int[]", [s.status for s in streams] or 1)
    keep += [fds, notify, status]
    p.nstreams = len(streams)
    p.stream_fds, p.stream_notify_fds, p.stream_status_fds = fds, notify, status


def _params(*, mode, vmm_kind, vmm_target, secret, host, port, channels,
            compress, zstd_level, delta_cache, max_bandwidth, max_downtime_ms,
            verify, timeout_ms, keep_paused=False, encrypt=True,
            auto_converge=False, disks=(), detached_disks=(), streams=(), keep):
    if isinstance(secret, str):
        secret = secret.encode()
    if verify not in _VERIFY:
        raise InvalidRequest(f"verify must be one of {sorted(_VERIFY)}")
    p = ffi.new("struct nb_mig_params *")
    target = ffi.new("char[]", str(vmm_target).encode())
    sec = ffi.new("uint8_t[]", bytes(secret) or b"\0")
    hst = ffi.new("char[]", (host or "").encode())
    keep += [target, sec, hst]
    p.mode = int(Mode(mode))
    p.vmm_kind = int(VmmKind(vmm_kind))
    p.vmm_target = target
    p.secret = sec
    p.secret_len = len(secret)
    p.host = hst
    p.port = int(port)
    p.channels = _channels(channels)
    p.compress = _compress(compress)
    p.zstd_level = int(zstd_level)
    p.delta_cache, p.delta_cache_auto = _delta_cache(delta_cache)
    p.auto_converge = 1 if auto_converge else 0
    p.max_bandwidth = int(max_bandwidth)
    p.max_downtime_ms = int(max_downtime_ms)
    p.verify = _VERIFY[verify]
    p.timeout_ms = int(timeout_ms)
    p.keep_paused = 1 if keep_paused else 0
    if not encrypt:
        LOG.warning("page channels in the clear (encrypt=False): guest memory "
                    "crosses the wire readable by anyone on the path")
    p.plaintext_pages = 0 if encrypt else 1
    paths = [ffi.new("char[]", str(path).encode()) for path in disks]
    array = ffi.new("const char *[]", paths or 1)
    keep += paths + [array]
    p.ndisks = len(paths)
    p.disk_paths = array
    p.disks_detached = _detached_mask(disks, detached_disks)
    _stream_arrays(p, streams, keep)
    return p


def _detached_mask(disks, detached):
    """The engine's disks_detached bitmask: bit i for each of ``detached``."""
    order = [str(path) for path in disks]
    mask = 0
    for path in detached:
        if str(path) not in order:
            raise InvalidRequest(f"detached disk {path} is not one of the disks")
        mask |= 1 << order.index(str(path))
    return mask


class Migration:
    """One side of one migration, running on native threads."""

    def __init__(self, handle, is_source):
        self._h = handle
        self.is_source = is_source

    @classmethod
    def _start(cls, fn, is_source, kwargs):
        keep = []
        params = _params(keep=keep, **kwargs)
        out = ffi.new("nb_mig **")
        err = ffi.new("char[]", 256)
        _raise_if(fn(params, out, err, 256), err)
        return cls(out[0], is_source)

    @classmethod
    def send(cls, *, vmm_target, host, port, secret, mode=Mode.LIVE,
             vmm_kind=VmmKind.TESTHOST, channels="auto", compress="auto",
             zstd_level=1, delta_cache="auto", max_bandwidth=0,
             max_downtime_ms=300, verify="incremental", timeout_ms=30000,
             keep_paused=False, encrypt=True, auto_converge=True, disks=(),
             detached_disks=(), streams=()):
        """Start migrating the VM at ``vmm_target`` to ``host:port``.

        ``disks``: the VM's disk files, in the vmm's order, moved with its
        memory (their writes come from the vmm's dirty-block log; the
        destination must be given as many target files).
        ``detached_disks``: those of ``disks`` the VM does not have attached
        (nothing may write them meanwhile): they have no dirty-block log
        and go whole in round 0; the others are the vmm's disks, in order.
        ``streams``: stream disks (``Stream``, with ``notify``) whose bytes
        travel in the session; the source switches over only once every
        first part has ended, and sends the final parts while the guest is
        paused.

        ``channels``: page connections, 1..16, or "auto" (one per CPU of
        this host that the running guest's vCPUs leave free, 1 to 2;
        stats().channels says how many).
        ``compress``: "auto" (zstd while the link is the bottleneck),
        "on" or "off".  ``delta_cache``: bytes, or "auto" (the guest's
        memory, at most a quarter of this host's free memory; "auto:N"
        caps it at N bytes).  ``auto_converge``: throttle the guest's
        vCPUs when rounds stop shrinking, or to shorten a long pause
        (stats().throttle says how much, each round's ``throttle`` when,
        ``converge_steps`` and ``trim_steps`` why).

        ``keep_paused``: the guest is paused and stays so (never resumed here).
        ``encrypt=False`` sends pages in the clear (both sides must say so;
        for measuring the cipher's cost, never for production).
        """
        return cls._start(lib.nb_mig_send, True, dict(
            mode=mode, vmm_kind=vmm_kind, vmm_target=vmm_target, secret=secret,
            host=host, port=port, channels=channels, compress=compress,
            zstd_level=zstd_level, delta_cache=delta_cache,
            max_bandwidth=max_bandwidth, max_downtime_ms=max_downtime_ms,
            verify=verify, timeout_ms=timeout_ms, keep_paused=keep_paused,
            encrypt=encrypt, auto_converge=auto_converge, disks=disks,
            detached_disks=detached_disks, streams=streams))

    @classmethod
    def receive(cls, *, vmm_target, secret, host="127.0.0.1", port=0,
                vmm_kind=VmmKind.TESTHOST, verify="incremental",
                timeout_ms=30000, keep_paused=False, encrypt=True, disks=(),
                streams=()):
        """Listen for a migration into ``vmm_target``; see ``port``.

        ``keep_paused``: take the guest over paused at the commit.
        ``disks``: the files to write the source's disks into, created or
        truncated to the announced sizes.  A file the migration created is
        removed if it fails; one that existed is left truncated and partly
        written (the caller's, as the incoming VM is).  ``streams``: where
        each stream disk's parts go (``Stream`` without ``notify``); READY,
        and so the commit, waits for every status to say "ok".
        """
        return cls._start(lib.nb_mig_receive, False, dict(
            mode=Mode.LIVE, vmm_kind=vmm_kind, vmm_target=vmm_target,
            secret=secret, host=host, port=port, channels=1, compress=False,
            zstd_level=1, delta_cache=0, max_bandwidth=0, max_downtime_ms=300,
            verify=verify, timeout_ms=timeout_ms, keep_paused=keep_paused,
            encrypt=encrypt, disks=disks, streams=streams))

    def _handle(self):
        if self._h is None:
            raise InvalidRequest("migration handle already closed")
        return self._h

    @property
    def port(self):
        """The TCP port a receiving side listens on."""
        return self.stats().port

    def stats(self):
        """Return a MigrationStats snapshot."""
        s = ffi.new("struct nb_mig_stats *")
        lib.nb_mig_stats(self._handle(), s)
        rounds = tuple(RoundStats(r.start_ms, r.duration_ms, r.pages, r.bytes,
                                  r.dirty, r.blocks, r.dirty_blocks, r.throttle,
                                  r.log_reads, r.expected_ms)
                       for r in list(s.rounds)[:min(s.nrounds, len(s.rounds))])
        return MigrationStats(
            phase=Phase(s.phase), result=Result(s.result),
            is_source=bool(s.is_source), mode=Mode(s.mode), port=s.port,
            round=s.round, mem_total=s.mem_total,
            bytes_transferred=s.bytes_transferred,
            bytes_remaining=s.bytes_remaining, pages_sent=s.pages_sent,
            pages_zero=s.pages_zero, pages_delta=s.pages_delta,
            pages_compressed=s.pages_compressed, pages_raw=s.pages_raw,
            dirty_pages=s.dirty_pages, dirty_rate=s.dirty_rate,
            bandwidth=s.bandwidth, expected_downtime_ms=s.expected_downtime_ms,
            downtime_ms=s.downtime_ms, catchup_ms=s.catchup_ms,
            pause_stop_ms=s.pause_stop_ms, pause_final_ms=s.pause_final_ms,
            pause_verify_ms=s.pause_verify_ms,
            pause_commit_ms=s.pause_commit_ms,
            total_ms=s.total_ms, rtt_ms=s.rtt_ms,
            max_downtime_ms=s.max_downtime_ms, throttle=s.throttle,
            delta_cache_bytes=s.delta_cache_bytes, compressing=s.compressing,
            committed=bool(s.committed), guest_runs_here=bool(s.guest_runs_here),
            digest=s.digest, rounds=rounds,
            error=ffi.string(s.error).decode(errors="replace"),
            error_kind=ErrorKind(s.error_kind), disk_total=s.disk_total,
            disk_bytes=s.disk_bytes, disk_blocks=s.disk_blocks,
            dirty_blocks=s.dirty_blocks, disk_digest=s.disk_digest,
            stream_bytes=s.stream_bytes, converge_steps=s.converge_steps,
            trim_steps=s.trim_steps, channels=s.channels,
            dest_excess_us=s.dest_excess_us)

    def set_param(self, name, value):
        """Change max_downtime_ms, max_bandwidth or throttle while running."""
        err = ffi.new("char[]", 256)
        _raise_if(lib.nb_mig_set_param(self._handle(), name.encode(), int(value),
                                       err, 256), err)

    def force_complete(self):
        """Switch over at the next opportunity, whatever the estimate."""
        lib.nb_mig_force_complete(self._handle())

    def cancel(self):
        """Abort; refused once the guest has been handed over."""
        err = ffi.new("char[]", 256)
        _raise_if(lib.nb_mig_cancel(self._handle(), err, 256), err)

    def wait(self, timeout=None):
        """Wait for the end (seconds; None = forever); True if it ended."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return bool(lib.nb_mig_wait(self._handle(), ms))

    def close(self):
        """Free the native session (cancelling it if still running)."""
        if self._h is not None:
            lib.nb_mig_free(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def spec_check(src_preamble, dst_preamble):
    """Compare two compatibility preambles; raise MigrationError if they clash."""
    err = ffi.new("char[]", 256)
    _raise_if(lib.nb_spec_check(src_preamble.encode(), dst_preamble.encode(),
                                err, 256), err)
