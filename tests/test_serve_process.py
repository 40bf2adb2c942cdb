"""A server process's plumbing: the block-written access log and the quiet thread pools."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from vlp_jax.serve import access_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _handler(fd: int, **kwargs) -> tuple[logging.Logger, access_log.BlockHandler]:
    logger = logging.getLogger(f"test_block_handler_{fd}_{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = access_log.BlockHandler(fd, **kwargs)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger, handler


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_block_handler_writes_lines_in_blocks_in_order():
    """Nothing reaches the descriptor per record; a full block, a flush and close write every
    line once, in order, whole."""
    r, w = os.pipe()
    try:
        logger, handler = _handler(w, interval=3600, max_bytes=50)
        for i in range(3):
            logger.info('{"n": %d}', i)
        assert _read_available(r) == b""  # buffered: no write per request
        for i in range(3, 12):  # passes 50 bytes: blocks go out
            logger.info('{"n": %d}', i)
        first = _read_available(r)
        assert first and first.endswith(b"\n") and len(first) >= 50
        logger.info("caf\u00e9 \udcff")  # not UTF-8 encodable: escaped, never dropped
        handler.flush()
        handler.close()
        rest = _read_available(r)
        lines = (first + rest).decode().splitlines()
        assert [json.loads(x)["n"] for x in lines[:12]] == list(range(12))
        assert lines[12] == "caf\u00e9 \\udcff" and len(lines) == 13
    finally:
        os.close(r)
        os.close(w)


def test_block_handler_timer_writes_a_quiet_servers_last_lines():
    r, w = os.pipe()
    try:
        logger, handler = _handler(w, interval=0.1)
        logger.info("only line")
        deadline = time.monotonic() + 10
        got = b""
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
            got = _read_available(r)
        assert got == b"only line\n"  # no further request needed
        handler.close()
    finally:
        os.close(r)
        os.close(w)


def test_block_handler_rejects_bad_settings():
    with pytest.raises(ValueError, match="must be > 0"):
        access_log.BlockHandler(2, interval=0)


_POOLS = """
import os, sys
from vlp_jax.serve import assemble
assemble.quiet_thread_pools()
import jax.numpy as jnp
x = jnp.ones((64, 64))
(x @ x).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
full = all(os.sched_getaffinity(int(t)) == os.sched_getaffinity(0)
           for t in os.listdir("/proc/self/task"))
print(names.count("tf_XLAEigen"), len(os.sched_getaffinity(0)), full,
      os.environ["TOKENIZERS_PARALLELISM"], "multi_thread_eigen=false" in os.environ["XLA_FLAGS"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux thread affinity and 2+ cores")
def test_quiet_thread_pools_gives_xla_one_pool_thread_and_every_thread_all_cores():
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "TOKENIZERS_PARALLELISM")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _POOLS], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["1", str(len(os.sched_getaffinity(0))), "True", "false", "True"], out


class _FakeTransport:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        assert not self.closed
        self.writes.append(data)

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name):
        return f"info:{name}"


def test_coalesced_writes_send_one_step_as_one_write_and_flush_before_close():
    from vlp_jax.serve.protocol import CoalescedWrites

    async def scenario():
        loop = asyncio.get_running_loop()
        raw = _FakeTransport()
        t = CoalescedWrites(raw, loop)
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert raw.writes == [] and t.get_extra_info("peername") == "info:peername"
        await asyncio.sleep(0)  # the end of the step
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"next")
        t.close()  # pending bytes go out before the close
        assert raw.writes[-1] == b"next" and raw.closed
        gone = _FakeTransport()
        t2 = CoalescedWrites(gone, loop)
        t2.write(b"late")
        gone.closed = True  # the peer went away before the step ended
        await asyncio.sleep(0)
        assert gone.writes == []

    asyncio.run(scenario())


class _FakeIndex:
    pass


def test_a_swapped_out_index_is_freed_in_slices_only_once_no_request_holds_it():
    import threading

    from vlp_jax.serve import answer, swap

    index = _FakeIndex()
    answer._fragments(index).update({i: (b"{", b"}") for i in range(5000)})
    containers = [answer._fragments(index)]
    box, in_flight = [index], index  # a request still answering on the old index
    del index
    retire = threading.Thread(target=swap._retire, args=(box,), daemon=True)
    retire.start()
    time.sleep(0.3)
    assert [len(c) for c in containers] == [5000]  # untouched while in use
    del in_flight
    retire.join(10)
    assert not retire.is_alive() and [len(c) for c in containers] == [0]
