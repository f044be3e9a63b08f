"""The folder lease: one holder at a time, stale leases taken over, on local disk and on S3."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from pipeline.io.lease import LEASE_FILE, LeaseHeld, LeaseLost, _S3Store, hold_lease, read_lease
from pipeline.io.storage import Location, read_bytes, write_bytes_atomic


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.of(str(tmp_path / "out"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Location(f"s3://test-bucket/lease-{tmp_path.name}", {"endpoint_url": endpoint})


def _lease_file(folder: Location) -> Location:
    return folder.child(LEASE_FILE)


def _foreign_record(heartbeat_age_s: float, host: str = "another-host") -> dict:
    now = time.time()
    return {"owner": f"alice@{host} pid 4242", "purpose": "qformer prep", "host": host,
            "pid": 4242, "pid_started": now - 1000, "started": now - 1000,
            "started_utc": "2026-01-01T00:00:00+00:00", "heartbeat": now - heartbeat_age_s,
            "stale_after_s": 60, "token": "f" * 32}


def _exists(location: Location) -> bool:
    fs, path = location.filesystem()
    fs.invalidate_cache()
    return fs.exists(path)


def test_second_holder_is_refused_naming_the_owner_and_release_frees_it(folder):
    with hold_lease(folder, purpose="qformer prep") as lease:
        record = json.loads(read_bytes(_lease_file(folder)))
        assert record["token"] == lease.record["token"] and record["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld) as refused:
            with hold_lease(folder, purpose="qformer prep"):
                pass
        message = str(refused.value)
        assert record["owner"] in message and "qformer prep" in message and "\n" not in message
        assert refused.value.exit_status == 2
    assert not _exists(_lease_file(folder))
    with hold_lease(folder, purpose="again"):
        pass


def test_stale_lease_of_another_host_is_taken_over_and_says_so(folder, caplog):
    write_bytes_atomic(_lease_file(folder), json.dumps(_foreign_record(120)).encode())
    with caplog.at_level(logging.WARNING, logger="qformer.lease"):
        with hold_lease(folder, purpose="qformer prep", stale_after_s=60) as lease:
            assert json.loads(read_bytes(_lease_file(folder)))["token"] == lease.record["token"]
    assert "taking over the lease of alice@another-host pid 4242" in caplog.text
    assert "120 s old" in caplog.text


def test_fresh_lease_of_another_host_is_respected(folder):
    write_bytes_atomic(_lease_file(folder), json.dumps(_foreign_record(5)).encode())
    with pytest.raises(LeaseHeld, match="alice@another-host pid 4242"):
        with hold_lease(folder, purpose="qformer prep", stale_after_s=60):
            pass
    assert json.loads(read_bytes(_lease_file(folder)))["owner"] == "alice@another-host pid 4242"


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(folder, caplog):
    write_bytes_atomic(_lease_file(folder),
                       json.dumps(_foreign_record(1, host=socket.gethostname())).encode())
    with caplog.at_level(logging.WARNING, logger="qformer.lease"):
        with hold_lease(folder, purpose="qformer prep", stale_after_s=3600):
            pass
    assert "process 4242 on this host is gone" in caplog.text


def test_the_reader_tells_a_held_lease_from_a_dead_holders_and_none(folder):
    assert read_lease(folder) is None
    with hold_lease(folder, purpose="qformer train") as lease:
        state = read_lease(folder)
        assert state.held and state.record["token"] == lease.record["token"] and state.heartbeat_age_s < 60
    assert read_lease(folder) is None
    write_bytes_atomic(_lease_file(folder),
                       json.dumps(_foreign_record(1, host=socket.gethostname())).encode())
    state = read_lease(folder)
    assert not state.held and "process 4242 on this host is gone" in state.stale_reason
    assert state.record["purpose"] == "qformer prep", "reading never changes the lease"


def test_heartbeat_keeps_a_long_run_from_going_stale(folder):
    with hold_lease(folder, purpose="qformer prep", stale_after_s=0.8) as lease:
        time.sleep(1.5)  # longer than stale_after_s: only the heartbeats keep it fresh
        record = json.loads(read_bytes(_lease_file(folder)))
        assert record["token"] == lease.record["token"]
        assert time.time() - record["heartbeat"] < 0.8
        lease.check()


def test_holder_learns_that_its_lease_was_taken_over(folder):
    with hold_lease(folder, purpose="qformer prep", stale_after_s=0.4) as lease:
        # Another run took it over (as it would after this one stalled).
        write_bytes_atomic(_lease_file(folder), json.dumps(_foreign_record(0)).encode())
        deadline = time.monotonic() + 5
        while lease.lost_to is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="alice@another-host pid 4242"):
            lease.check()
    # The lease it lost is not released: it is the other run's now.
    assert json.loads(read_bytes(_lease_file(folder)))["owner"] == "alice@another-host pid 4242"


def test_racing_runs_get_exactly_one_lease(folder):
    start, release = threading.Barrier(4), threading.Event()
    outcomes: list[str] = []

    def contend():
        start.wait()
        try:
            with hold_lease(folder, purpose="race"):
                outcomes.append("held")
                release.wait(30)
        except LeaseHeld:
            outcomes.append("refused")
            if outcomes.count("refused") == 3:
                release.set()

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]


def test_store_without_conditional_writes_falls_back_to_read_back(s3_endpoint, tmp_path):
    folder = Location(f"s3://test-bucket/fallback-{tmp_path.name}", {"endpoint_url": s3_endpoint})
    first, second = _S3Store(folder, conditional=False), _S3Store(folder, conditional=False)
    version = first.create(b'{"token": "a"}')
    assert version is not None and second.create(b'{"token": "b"}') is None
    assert second.replace(b'{"token": "b"}', "not-the-etag") is None
    taken = second.replace(b'{"token": "b"}', version)
    assert taken is not None and second.read()[0] == {"token": "b"}
    first.delete(version)  # no longer its version: left alone
    assert second.read()[0] == {"token": "b"}
    second.delete(taken)
    assert second.read() is None
