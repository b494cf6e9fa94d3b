"""The run folder's lease: one holder at a time, a heartbeat, takeover of a dead holder (its
process gone, or no heartbeat for a ttl), and a holder that learns it lost the lease."""
import json
import os
import socket
import threading
import time

import pytest

from mtl.lease import NAME, Lease, LeaseHeld


@pytest.fixture(autouse=True)
def short_ttl(monkeypatch):
    monkeypatch.setenv("MTL_LEASE_TTL_S", "1.0")


def holder(folder, **fields):
    """A lease file as another process would have written it."""
    record = {"token": "other", "host": "node-17", "pid": 4242, "user": "ada", "purpose": "trial",
              "since": time.time() - 60, "heartbeat": time.time(), "ttl_s": 1.0, **fields}
    folder.mkdir(exist_ok=True)
    (folder / NAME).write_text(json.dumps(record))


def test_one_holder_at_a_time_and_release(tmp_path):
    with Lease(str(tmp_path)).acquire() as lease:
        record = json.loads((tmp_path / NAME).read_text())
        assert (record["host"], record["pid"], record["token"]) == (socket.gethostname(), os.getpid(), lease.token)
        with pytest.raises(LeaseHeld, match=rf"^{tmp_path} is in use by run of .* on {socket.gethostname()} "
                                            rf"pid {os.getpid()} since .*, heartbeat \d+ s ago"):
            Lease(str(tmp_path)).acquire()
    assert not (tmp_path / NAME).exists()
    Lease(str(tmp_path)).acquire().release()       # free again


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path):
    with Lease(str(tmp_path)).acquire():
        first = json.loads((tmp_path / NAME).read_text())["heartbeat"]
        time.sleep(1.6)                               # beats every ttl/4, and the ttl has passed
        assert json.loads((tmp_path / NAME).read_text())["heartbeat"] > first
        with pytest.raises(LeaseHeld):
            Lease(str(tmp_path)).acquire()


def test_a_dead_holder_is_taken_over(tmp_path):
    holder(tmp_path, host=socket.gethostname(), pid=2 ** 22 + 12345)      # this host, no such process
    Lease(str(tmp_path)).acquire().release()
    holder(tmp_path, heartbeat=time.time() - 5)                          # another host, silent for 5 ttl
    Lease(str(tmp_path)).acquire().release()
    (tmp_path / NAME).write_text("{torn")                                 # a half-written file
    Lease(str(tmp_path)).acquire().release()


def test_a_live_holder_elsewhere_is_waited_out_only_when_asked(tmp_path):
    holder(tmp_path)                                                     # fresh heartbeat, another host
    with pytest.raises(LeaseHeld, match="is in use by trial of ada on node-17 pid 4242"):
        Lease(str(tmp_path)).acquire()
    started = time.monotonic()
    Lease(str(tmp_path)).acquire(wait_s=5).release()                     # its heartbeat stops: ~1 ttl
    assert 0.5 < time.monotonic() - started < 4


def test_a_holder_that_lost_its_lease_finds_out(tmp_path):
    lease = Lease(str(tmp_path)).acquire()
    holder(tmp_path)                                                     # someone took the folder over
    deadline = time.monotonic() + 3
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseHeld, match="lost the lease: .* was taken over by trial of ada on node-17"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / NAME).read_text())["token"] == "other"  # not ours to remove


def test_two_racing_writers_end_with_one_holder(tmp_path):
    results = []

    def take():
        try:
            results.append(Lease(str(tmp_path)).acquire())
        except LeaseHeld:
            results.append(None)
    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [r for r in results if r is not None]
    assert len(held) == 1
    held[0].release()
