"""A dead peer process stops every other process within a bounded time, with one clear line.

Why: with ``jax.distributed``, when one process dies (host preempted, OOM-killed) the others are
left inside a collective or a barrier.  Without a watchdog (2 processes × 2 CPU devices, Gloo;
docs/reliability.md) the survivor raises a 40-line Gloo traceback ("Connection closed by
peer") that never says which process is gone, then hangs in ``jax.distributed.shutdown`` until
JAX's heartbeat timeout (100 s by default) and aborts with a C++ stack dump (SIGABRT).
On other transports a collective can block instead of failing.

How: every process runs two daemon threads.  The *beat* thread writes a counter under
``vlp_jax/peers/alive/<i>`` in the coordination service's key-value store every ``interval``
seconds and reads everyone's counters; the *judge* thread only compares timestamps (it never
makes a call that could block).  A peer whose counter has not moved for ``timeout`` seconds is
dead; if the store itself (process 0 hosts it) has not answered for ``timeout`` seconds,
process 0 is.  A process that leaves on purpose first records its exit status
(``mark_exiting``): status 0 is never a fault; a non-zero status stops the others after a
short grace period (they may be about to fail with the same user error and their own exit code).
The judge then prints ``error: process 1 of 2 (pid 4242 on host h) …`` and ends the process
with ``os._exit(PEER_LOST_EXIT)`` — from any state, even inside a stuck collective.  JAX's own
heartbeat and shutdown timeouts are set above ``timeout`` (``jax_timeouts``) so this message,
not JAX's abort, is what the user sees.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from vlp_jax.runtime import abort_guard

PEER_LOST_EXIT = 8
_PREFIX = "vlp_jax/peers/"


def jax_timeouts(timeout: float) -> dict[str, int]:
    """``jax.distributed.initialize`` keyword arguments that leave detection to the watchdog:
    JAX's heartbeat and shutdown barrier give up only well after it would have acted."""
    backstop = int(2 * timeout + 10)
    return {"heartbeat_timeout_seconds": backstop, "shutdown_timeout_seconds": backstop}


class PeerWatchdog:
    """Liveness of the other processes of a ``jax.distributed`` job (see the module doc).

    ``client`` is the coordination-service client (``key_value_set``, ``key_value_dir_get``);
    ``exit_fn`` and ``clock`` are replaceable for tests.
    """

    def __init__(
        self, client: Any, process_id: int, num_processes: int, timeout: float, *,
        interval: float | None = None, coordinator: str = "",
        exit_fn: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic,
    ):
        if timeout <= 0:
            raise ValueError(f"peer timeout must be > 0 seconds, got {timeout}")
        self.client, self.me, self.n = client, process_id, num_processes
        self.timeout = float(timeout)
        self.interval = interval or max(0.2, min(2.0, self.timeout / 10))
        self.grace = min(self.timeout, 10.0)
        self.coordinator = coordinator
        self._exit, self._clock = exit_fn, clock
        now = clock()
        self._last_seen = {p: now for p in range(num_processes) if p != process_id}
        self._last_value: dict[int, str] = {}
        self._exited: dict[int, tuple[int, float]] = {}  # peer -> (status, first seen)
        self._store_ok = now
        self._info: dict[int, dict[str, Any]] = {}
        self._own_status: int | None = None
        self._counter = 0
        self._noted = False
        self._exiting_since = 0.0
        self._stop = threading.Event()
        self.verdict = threading.Event()  # set just before the process is ended
        self._threads: list[threading.Thread] = []
        self.abort_report = False  # True: hand the supervisor process 0's details once known

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PeerWatchdog:
        info = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            self.client.key_value_set(f"{_PREFIX}info/{self.me}", json.dumps(info), True)
        except Exception as err:  # noqa: BLE001 - liveness still works without the details
            logging.warning("peer watchdog: could not publish this process's pid/host (%s)", err)
        for target, name in ((self._beat_loop, "beat"), (self._judge_loop, "judge")):
            thread = threading.Thread(target=target, name=f"vlp-peer-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logging.info("peer watchdog: a process silent for %.0f s stops the run (exit %d)",
                     self.timeout, PEER_LOST_EXIT)
        return self

    def mark_exiting(self, status: int) -> None:
        """Tell the peers this process is leaving with ``status`` (0 = finished/preempted);
        the first status recorded wins."""
        if self._own_status is not None:
            return
        self._own_status, self._exiting_since = int(status), self._clock()
        try:
            self.client.key_value_set(f"{_PREFIX}alive/{self.me}", f"exit:{int(status)}", True)
        except Exception:  # noqa: BLE001 - the peers then judge by silence, as for a crash
            pass

    def stop(self) -> None:
        self._stop.set()

    def wait_for_verdict(self, seconds: float | None = None) -> bool:
        """Block until the judge has declared a peer lost (True) or ``seconds`` passed.

        ``main`` calls it when a multi-process run fails with an unexpected error: if a peer
        died, the judge's one-line message (and exit) replaces the collective's traceback.
        """
        return self.verdict.wait(self.timeout + 3 * self.interval if seconds is None else seconds)

    # ------------------------------------------------------------------ threads
    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval)

    def _judge_loop(self) -> None:
        while not self._stop.is_set():
            message = self.judge()
            if message:
                self._fire(message)
                return
            if self.lingering():
                logging.warning("peer watchdog: still running %.0f s after finishing (JAX's "
                                "shutdown barrier waits for a lost process); exiting with status "
                                "%d", self.timeout, self._own_status)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                sys.stderr.flush()
                self._exit(int(self._own_status or 0))
                return
            self._stop.wait(self.interval / 2)

    def lingering(self) -> bool:
        """This process finished (``mark_exiting``) more than ``timeout`` seconds ago and is
        still alive: JAX's shutdown barrier is waiting for a peer that will never come."""
        return (self._own_status is not None
                and self._clock() - self._exiting_since > self.timeout)

    def beat(self) -> None:
        """One round trip to the store: publish our counter, read everyone's."""
        if self._own_status is None:
            self._counter += 1
            try:
                self.client.key_value_set(f"{_PREFIX}alive/{self.me}", str(self._counter), True)
            except Exception as err:  # noqa: BLE001 - store unreachable: judged by staleness
                self._note(err)
                return
        try:
            values = dict(self.client.key_value_dir_get(f"{_PREFIX}alive/"))
            if len(self._info) < self.n:  # pid/host for the message, read while we can
                for key, value in self.client.key_value_dir_get(f"{_PREFIX}info/"):
                    self._info[int(key.rsplit("/", 1)[1])] = json.loads(value)
                if self.abort_report and 0 in self._info:  # process 0's pid/host are known
                    self.abort_report = not abort_guard.publish(
                        self.coordinator, self.coordinator_lost(), PEER_LOST_EXIT)
        except Exception as err:  # noqa: BLE001
            self._note(err)
            return
        now = self._clock()
        self._store_ok = now
        for key, value in values.items():
            peer = int(key.rsplit("/", 1)[1])
            if peer == self.me or peer not in self._last_seen:
                continue
            if value.startswith("exit:"):
                self._exited.setdefault(peer, (int(value[5:]), now))
            elif value != self._last_value.get(peer):
                self._last_value[peer] = value
                self._last_seen[peer] = now

    def _note(self, err: Exception) -> None:
        if not self._noted:
            self._noted = True
            logging.warning("peer watchdog: the coordination service did not answer (%s)",
                            str(err).splitlines()[0][:200] if str(err) else type(err).__name__)

    def judge(self) -> str | None:
        """The fault line if a peer is lost, else None (timestamps only: never blocks).

        A peer is stale when its counter has not moved across our own successful reads for
        ``timeout`` seconds, so a slow or failing store is never mistaken for a dead peer; a
        store silent for ``timeout`` seconds is process 0's fault (it hosts the store).
        """
        now = self._clock()
        if now - self._store_ok > self.timeout:
            if self.me != 0:
                return self._lost(0, f"the coordination service it hosts{self._at()} has not "
                                     f"answered for {now - self._store_ok:.0f} s")
            return (f"error: the coordination service in process 0 has not answered its own "
                    f"process for {now - self._store_ok:.0f} s; stopping (exit "
                    f"{PEER_LOST_EXIT}). Rerun the same launch command to resume from the newest "
                    "complete checkpoint.")
        for peer, seen in sorted(self._last_seen.items()):
            if peer in self._exited:
                status, since = self._exited[peer]
                if status != 0 and self._own_status is None and now - since > self.grace:
                    return self._lost(peer, f"exited with status {status}", died=False)
                continue
            if self._store_ok - seen > self.timeout:
                return self._lost(peer, f"no heartbeat for {self._store_ok - seen:.0f} s")
        return None

    def coordinator_lost(self) -> str:
        """The line for process 0 found dead by a refused connection (``abort_guard``, printed
        by the supervisor); builds a string only, from details the beat thread cached."""
        return self._lost(0, f"the coordination service it hosts{self._at()} closed its "
                             "connection and refuses new ones")

    # ------------------------------------------------------------------ reporting
    def _at(self) -> str:
        return f" at {self.coordinator}" if self.coordinator else ""

    def _describe(self, peer: int) -> str:
        info = self._info.get(peer, {})  # cached by the beat thread: no call here
        where = (f" (pid {info['pid']} on host {info['host']})" if info.get("pid") else "")
        return f"process {peer} of {self.n}{where}"

    def _lost(self, peer: int, why: str, *, died: bool = True) -> str:
        what = "is gone" if died else "stopped"
        return (f"error: {self._describe(peer)} {what}: {why}. Stopping process {self.me} too "
                f"(exit {PEER_LOST_EXIT}, peer timeout {self.timeout:.0f} s); rerun the same "
                "launch command to resume from the newest complete checkpoint.")

    def _fire(self, message: str) -> None:
        self.mark_exiting(PEER_LOST_EXIT)  # before anything else can record another status
        try:
            sys.stdout.flush()
            print(message, file=sys.stderr, flush=True)
        finally:
            self._exit(PEER_LOST_EXIT)
            self.verdict.set()  # reached only with a test's exit_fn


_ACTIVE: PeerWatchdog | None = None


def start_watchdog(timeout: float, coordinator: str = "") -> PeerWatchdog | None:
    """Start the watchdog of this ``jax.distributed`` process (None for a single process)."""
    global _ACTIVE
    import jax
    from jax._src import distributed  # the coordination-service client has no public handle

    client = distributed.global_state.client
    if jax.process_count() < 2 or client is None or timeout <= 0:
        abort_guard.announce(jax.process_count() > 1)  # for a supervisor's SIGTERM forwarding
        return None
    address = coordinator or getattr(distributed.global_state, "coordinator_address", "")
    dog = PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout,
                       coordinator=address or "")
    if dog.me != 0:  # JAX aborts us within ~1 s of process 0's death: the supervisor
        # (runtime.supervise), if any, then says why and exits 8 (runtime.abort_guard); the
        # line is handed over now and again once the beat thread knows process 0's pid/host.
        dog.abort_report = abort_guard.publish(dog.coordinator, dog.coordinator_lost(),
                                               PEER_LOST_EXIT)
    if not dog.abort_report:
        abort_guard.announce(True)  # a forwarded SIGTERM is safe now (runtime.supervise)
    _ACTIVE = dog.start()
    return _ACTIVE


def align(name: str, timeout: float = 900.0) -> None:
    """Wait until every process reaches ``name`` (a coordination-service barrier, no-op for one
    process).

    Why: a Gloo collective waits only 30 s (fixed) for the other processes to join it.  On a
    loaded host one process can reach the first train step tens of seconds after another (its
    model init is slower), and the early one then fails with ``Gloo context initialization
    failed: DEADLINE_EXCEEDED``.  Lining the processes up here, with a
    generous timeout, before the first collective of training removes that race; a process
    that died meanwhile is caught by the watchdog.
    """
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if jax.process_count() < 2 or client is None:
        return
    client.wait_at_barrier(f"vlp_jax/{name}", int(timeout * 1000))


def active() -> PeerWatchdog | None:
    """The running watchdog, if any."""
    return _ACTIVE
