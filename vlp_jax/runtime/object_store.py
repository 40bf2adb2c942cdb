"""The object-store operations epath does not offer: conditional writes and a reachability check.

A workdir lock needs "create only if absent" and "replace only if unchanged" (compare-and-swap),
which both stores provide as preconditions on a single request:

- GCS (google-cloud-storage): ``ifGenerationMatch=0`` creates only if absent, ``=<generation>``
  replaces only that version.  Small uploads go out as *multipart* uploads, the kind the GCS
  emulator enforces preconditions on as real GCS does (it ignores them on simple media uploads).
- S3 (boto3): ``If-None-Match: *`` creates only if absent, ``If-Match: <ETag>`` replaces only
  that version (AWS since 2024; SeaweedFS honours both).

The token returned by ``read_versioned`` (GCS generation or S3 ETag) is what ``replace`` checks.
Endpoints and credentials come from the environment as each client documents
(``STORAGE_EMULATOR_HOST``; ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so the same code
talks to the cloud and to the local servers the tests start.
"""

from __future__ import annotations

import functools
import os

from vlp_jax.runtime import uri


@functools.cache
def _gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()


@functools.cache
def _s3_client():
    import boto3

    return boto3.session.Session().client("s3")  # a new session re-reads the environment


def _s3_code(err: Exception) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def gcs_create_if_absent(bucket: str, key: str, data: bytes) -> bool:
    from google.api_core import exceptions as gex

    try:
        _gcs_client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
    except gex.PreconditionFailed:
        return False
    return True


def s3_create_if_absent(bucket: str, key: str, data: bytes) -> bool:
    from botocore.exceptions import ClientError

    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as err:
        if _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            return False
        raise
    return True


def read_versioned(loc: uri.Location) -> tuple[bytes, str] | None:
    """The object's bytes and version token (generation / ETag); None if it does not exist."""
    bucket, key = uri.bucket_and_key(loc)
    if uri.scheme(loc) == "gs":
        from google.api_core import exceptions as gex

        blob = _gcs_client().bucket(bucket).blob(key)
        try:
            data = blob.download_as_bytes()
        except gex.NotFound:
            return None
        return data, str(blob.generation)
    from botocore.exceptions import ClientError

    try:
        obj = _s3_client().get_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if _s3_code(err) in ("NoSuchKey", "404"):
            return None
        raise
    return obj["Body"].read(), obj["ETag"]


def replace_if_unchanged(loc: uri.Location, data: bytes, token: str) -> bool:
    """Overwrite the object only if it is still the version ``token``; False if it changed."""
    bucket, key = uri.bucket_and_key(loc)
    if uri.scheme(loc) == "gs":
        from google.api_core import exceptions as gex

        try:
            _gcs_client().bucket(bucket).blob(key).upload_from_string(
                data, if_generation_match=int(token))
        except (gex.PreconditionFailed, gex.NotFound):
            return False
        return True
    from botocore.exceptions import ClientError

    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=token)
    except ClientError as err:
        if _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                             "412", "404"):
            return False
        raise
    return True


def check_bucket(loc: uri.Location, what: str = "location") -> None:
    """Raise ``uri.StorageAccessError`` naming ``loc`` if its bucket is missing, the credentials
    are refused, or the endpoint cannot be reached; return quietly otherwise."""
    bucket, _ = uri.bucket_and_key(loc)
    where = uri.normalize(loc)
    try:
        if uri.scheme(loc) == "gs":
            from google.api_core import exceptions as gex

            try:  # listing needs only storage.objects.list, which any reader of the run has
                prefix = uri.bucket_and_key(loc)[1]
                list(_gcs_client().list_blobs(bucket, prefix=prefix, max_results=1, timeout=30))
            except gex.NotFound as err:
                raise uri.StorageAccessError(
                    f"{what} {where}: bucket gs://{bucket} does not exist") from err
            except gex.Forbidden as err:
                raise uri.StorageAccessError(
                    f"{what} {where}: access to gs://{bucket} refused (credentials: "
                    "GOOGLE_APPLICATION_CREDENTIALS or the VM's service account)") from err
            return
        from botocore.exceptions import ClientError, NoCredentialsError

        try:  # ListObjectsV2 needs only s3:ListBucket on the bucket, like every reader
            _s3_client().list_objects_v2(Bucket=bucket, Prefix=uri.bucket_and_key(loc)[1],
                                         MaxKeys=1)
        except NoCredentialsError as err:
            raise uri.StorageAccessError(
                f"{what} {where}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a profile)") from err
        except ClientError as err:
            code = _s3_code(err)
            if code in ("404", "NoSuchBucket"):
                raise uri.StorageAccessError(
                    f"{what} {where}: bucket s3://{bucket} does not exist") from err
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise uri.StorageAccessError(
                    f"{what} {where}: access to s3://{bucket} refused ({code}; check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from err
            raise
    except uri.StorageAccessError:
        raise
    except Exception as err:  # unreachable endpoint, DNS, TLS: say where and why, in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise uri.StorageAccessError(f"{what} {where}: cannot reach the object store: {first}") \
            from err


def reset_clients() -> None:
    """Forget the cached clients (after the endpoint or credential variables changed)."""
    _gcs_client.cache_clear()
    _s3_client.cache_clear()
    import fsspec

    for name in ("gs", "gcs", "s3"):
        try:
            fsspec.get_filesystem_class(name).clear_instance_cache()
        except (ImportError, ValueError):
            pass
