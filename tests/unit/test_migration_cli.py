"""nova-bhyve-migrate: how it reads the secret file and its options."""

import argparse
import io
import types

import pytest

from nova_bhyve.migration import cli
from nova_bhyve.native.engine import Phase, Result, RoundStats


def test_the_secret_is_read_byte_for_byte(tmp_path):
    # a random secret may start or end with bytes that look like white space
    secret = b"\n\t " + bytes(range(32, 60)) + b"\r\x0b\x0c"
    path = tmp_path / "secret"
    path.write_bytes(secret)
    assert cli._read_secret(path) == secret


def test_a_short_secret_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 15)
    with pytest.raises(SystemExit, match="at least 16 bytes"):
        cli._read_secret(path)


def test_channels_are_auto_or_a_count_of_1_to_16():
    assert cli._channels("auto") == "auto"
    assert [cli._channels(n) for n in ("1", "16")] == [1, 16]
    for bad in ("0", "17", "-1", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="1..16 or auto"):
            cli._channels(bad)


def _stats(**kw):
    base = dict(phase=Phase.ITERATE, result=Result.RUNNING, round=1,
                mem_total=1 << 28, bytes_transferred=1 << 20,
                bytes_remaining=1 << 16, dirty_pages=16,
                expected_downtime_ms=180.0, max_downtime_ms=300, rtt_ms=0.2)
    base.update(kw)
    return types.SimpleNamespace(**base)


class _FakeSend:
    """A send whose stats follow a script; its last entry is final."""

    def __init__(self, script):
        self.script, self.cancels = list(script), 0

    def wait(self, timeout):
        return len(self.script) == 1

    def stats(self):
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def cancel(self):
        self.cancels += 1


def test_round_trips_beyond_the_limit_cancel_with_the_reason():
    """The command never raises its limit: a link whose two round trips
    exceed it would iterate for ever, so the send is cancelled, once, and
    says why; the guest keeps running on the source."""
    far = _stats(rtt_ms=160.4, expected_downtime_ms=322.0)
    mig = _FakeSend([_stats(phase=Phase.HANDSHAKE, round=0, rtt_ms=160.4),
                     far, far, _stats(result=Result.CANCELLED)])
    out = io.StringIO()
    cli._watch(mig, out, interval=0)
    assert mig.cancels == 1
    assert "two control round trips of 160.4 ms, more than " \
           "--max-downtime-ms 300" in out.getvalue()


def test_a_near_destination_is_not_cancelled():
    mig = _FakeSend([_stats(), _stats(rtt_ms=140.0),
                     _stats(result=Result.COMPLETED)])
    cli._watch(mig, io.StringIO(), interval=0)
    assert mig.cancels == 0


def _completed(**kw):
    """The stats of a completed send, as its report reads them."""
    base = dict(
        result=Result.COMPLETED, error="", total_ms=812.0, downtime_ms=7.0,
        rounds=(), channels=1, digest=0xab, disk_total=0, is_source=True,
        catchup_ms=3.0, pages_zero=1, pages_delta=2, pages_compressed=0,
        pages_raw=3, delta_cache_bytes=64 << 20, throttle=0,
        pause_stop_ms=0.4, pause_final_ms=3.1, pause_verify_ms=2.3,
        pause_commit_ms=1.2, dest_excess_us=0.0)
    base.update(kw)
    return _stats(**base)


def test_the_report_gives_the_pause_in_its_parts():
    st = _completed()
    out = io.StringIO()
    cli._report(st, out)
    assert ("downtime 7.0 ms" in out.getvalue() and
            "downtime in parts: stop/final round/verify/commit "
            "0.4/3.1/2.3/1.2ms\n" in out.getvalue()), out.getvalue()


def test_the_report_gives_the_destinations_pace_in_the_prediction():
    """The time per page the destination took beyond the source's, which
    the prediction priced, follows it."""
    out = io.StringIO()
    cli._report(_completed(expected_downtime_ms=41.7, dest_excess_us=13.24), out)
    assert ("predicted downtime 41.7 ms (the destination 13.2 us a page "
            "slower than the source; after 3.0 ms waiting" in out.getvalue()), \
        out.getvalue()


def test_rounds_add_a_line_per_round_after_the_report():
    st = _completed(rtt_ms=0.1, bandwidth=0, rounds=(
        RoundStats(0, 800.0, 5, 9000, 0),
        RoundStats(800, 4.0, 2, 300, 2, throttle=20, expected_ms=6.5)))
    plain, full = io.StringIO(), io.StringIO()
    cli._report(st, plain)
    cli._report(st, full, rounds=True)
    extra = full.getvalue()[len(plain.getvalue()):].splitlines()
    assert full.getvalue().startswith(plain.getvalue())
    assert extra[:2] == [
        "round 0: 800ms pages=5 bytes=9000 dirty=0 expected=0.0ms "
        "throttle=0% log_reads=0",
        "round 1: 4ms pages=2 bytes=300 dirty=2 expected=6.5ms "
        "throttle=20% log_reads=0"], extra
    assert extra[2].startswith("pages: zero=1 delta=2 "), extra
