"""The two lock-free pieces of the --workers supervisor: its pipe conversations (``pipes.py``)
and the flags its signal handlers set (``multi.SignalFlag``)."""

import multiprocessing
import time

from vlp_jax.serve import multi, pipes


def test_a_garbled_reply_fails_its_own_worker_only():
    """pipes.collect keeps the answers it read: one unreadable reply is that worker's error."""
    good, good_end = multiprocessing.Pipe()
    bad, bad_end = multiprocessing.Pipe()
    good_end.send(("committed", 7, None))
    bad_end.send_bytes(b"not a pickle")
    out = pipes.collect({0: good, 1: bad}, 7, "committed", time.monotonic() + 5, 5)
    assert out[0] is None and out[1].startswith("unreadable reply"), out


def test_signal_flag_sets_and_clears():
    flag = multi.SignalFlag()
    assert not flag.is_set()
    flag.set()
    assert flag.is_set()
    flag.clear()
    assert not flag.is_set()
