"""Run logs of an object-store workdir: written to a local folder, uploaded at sync points.

``metrics.jsonl`` is appended to and TensorBoard event files grow at every log period; object
stores have neither append nor partial writes, and a store that stops answering must not stall
training at every log line (the client libraries retry for minutes).  So for a gs:// workdir the
logger writes into a local mirror and ``sync`` uploads each file that changed — one whole-object
upload each, atomic on the store — right after every checkpoint save and at the end.  What is on
the store is then exactly as fresh as the newest checkpoint, which is all a resumed run keeps
anyway (it drops rows written after its checkpoint).  A failed or stuck upload is a warning, not
an error: the checkpoint save's own deadline is what stops a run whose storage is gone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading

from vlp_jax.runtime import fs, storage

SYNC_TIMEOUT_S = 60.0


class RemoteMirror:
    """A local folder standing in for ``remote`` (a gs:// or s3:// prefix) between syncs."""

    def __init__(self, remote: str, files_to_fetch: tuple[str, ...] = ()):
        self.remote = fs.normalize(remote)
        digest = hashlib.sha256(self.remote.encode()).hexdigest()[:12]
        self.local = tempfile.mkdtemp(prefix=f"vlp_run_{digest}_")
        self._synced: dict[str, tuple[int, int]] = {}
        self._inflight: threading.Thread | None = None
        for name in files_to_fetch:  # continued by a resumed run (e.g. metrics.jsonl)
            uri = fs.join(self.remote, name)
            if fs.exists(uri):
                with open(os.path.join(self.local, name), "wb") as f:
                    f.write(fs.read_bytes(uri))
                self._synced[name] = self._stamp(name)

    def _stamp(self, rel: str) -> tuple[int, int]:
        st = os.stat(os.path.join(self.local, rel))
        return st.st_size, st.st_mtime_ns

    def _changed(self) -> list[str]:
        found = []
        for folder, _, names in os.walk(self.local):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), self.local).replace(os.sep, "/")
                if self._synced.get(rel) != self._stamp(rel):
                    found.append(rel)
        return sorted(found)

    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> None:
        """Upload every file changed since the last sync; warn (never raise) on failure.

        An upload still running from an earlier sync (a slow store) is waited for, never
        overlapped: a late old upload must not land after a newer one and drop rows."""
        if self._inflight is not None and self._inflight.is_alive():
            self._inflight.join(min(timeout, SYNC_TIMEOUT_S))
            if self._inflight.is_alive():
                logging.warning("run logs not uploaded to %s: the previous upload is still "
                                "running (will retry at the next sync)", self.remote)
                return
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                self._upload()
            except BaseException as err:  # noqa: BLE001 - reported by the caller below
                errors.append(err)

        self._inflight = threading.Thread(target=upload, name="run-log-upload", daemon=True)
        self._inflight.start()
        self._inflight.join(min(timeout, SYNC_TIMEOUT_S))
        if self._inflight.is_alive() or errors:
            why = storage.reason(errors[0]) if errors else "no answer within the deadline"
            logging.warning("run logs not uploaded to %s (will retry at the next sync): %s",
                            self.remote, why)

    def _upload(self) -> None:
        for rel in self._changed():
            stamp = self._stamp(rel)
            with open(os.path.join(self.local, rel), "rb") as f:
                fs.write_bytes(fs.join(self.remote, rel), f.read())
            self._synced[rel] = stamp
