"""What the admin listener may do: who may call it, which index it may load, which files the
public port may then serve.

The admin port can swap the index every public answer comes from, and an index names the
catalog directory its images are served from — so reaching the admin port must not be enough to
read files.  The rules, applied identically by the in-process holder (``swap.py``) and the
multi-worker coordinator (``workers.py``):

* **A token on every admin route.**  ``Authorization: Bearer <token>``, compared in constant
  time; the token comes from ``--admin_token_file`` or the ``VLP_ADMIN_TOKEN`` environment
  variable (never a flag: command lines are world-readable in ``ps``).  An admin listener
  without a token refuses to start.
* **Index paths under a root.**  ``?index=`` is resolved (symlinks followed, relative paths
  taken from the root) and must lie inside ``--index_root`` (default: the directory holding
  ``--index``); anything else is a 403.
* **Images from the catalog root only.**  The image root is fixed when the server starts
  (``--image_root``, default the starting index's ``base_dir``); a reload of an index built over
  another catalog root is refused (409), and every image path is resolved and checked to stay
  inside the root (``..``, absolute paths and symlinks leading out are 404s).
* **The serving model only.**  An index records the fingerprint of the bundle that embedded it;
  a reload of an index from another bundle is refused (409): its vectors live in another
  embedding space, and searching them with this query tower returns noise.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from typing import Any

from vlp_jax.indexing import provenance

TOKEN_ENV = "VLP_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


class Forbidden(Exception):
    """The request is not allowed (HTTP 403)."""


class Refused(Exception):
    """The index conflicts with what is serving (HTTP 409); the old index keeps serving."""


def load_token(token_file: str | None = None,
               environ: Mapping[str, str] | None = None) -> str:
    """The admin token from ``token_file`` or ``$VLP_ADMIN_TOKEN``; ValueError if neither
    gives one of at least ``MIN_TOKEN_CHARS`` characters."""
    environ = os.environ if environ is None else environ
    if token_file:
        with open(token_file, encoding="utf-8") as f:  # a local secret, never a bucket URI
            token = f.read().strip()
        source = token_file
    else:
        token, source = environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if not token:
        raise ValueError(f"the admin listener needs a token: set {TOKEN_ENV} or "
                         "--admin_token_file")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token from {source} has {len(token)} characters; use at "
                         f"least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
    return token


def authorized(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """True when the ASGI ``headers`` carry ``Authorization: Bearer <token>``."""
    want = b"bearer " + token.encode()
    for name, value in headers:
        if name == b"authorization":
            got = value.strip()
            return hmac.compare_digest(got[:7].lower() + got[7:], want)
    return False


def _is_remote(path: str) -> bool:
    return "://" in path


def resolve_index(target: str | None, configured: str, root: str) -> str:
    """The directory a reload loads: ``target`` (inside ``root``) or, without one, the
    configured ``--index`` path as given (so a flipped ``current -> vN`` symlink is followed).
    """
    if target is None:
        return configured
    if _is_remote(target) or _is_remote(root):
        norm = root.rstrip("/") + "/"
        if not target.startswith(norm) or "/../" in target + "/" or "/./" in target + "/":
            raise Forbidden(f"index {target!r} is outside the index root {root!r}")
        return target
    full = target if os.path.isabs(target) else os.path.join(root, target)
    real, real_root = os.path.realpath(full), os.path.realpath(root)
    if os.path.commonpath([real_root, real]) != real_root:
        raise Forbidden(f"index {target!r} is outside the index root {root!r} (resolved to "
                        f"{real!r})")
    return full


def default_index_root(index_path: str) -> str:
    """The directory holding the ``--index`` path (the link itself, not its target)."""
    if _is_remote(index_path):
        return index_path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(index_path))


def check_bundle(info: Mapping[str, Any], identity: Mapping[str, Any], where: str) -> None:
    """Refused unless the index ``info`` was embedded by the bundle of ``identity``
    (``provenance.bundle_identity``; the rule is ``provenance.mismatch``, which the offline
    update applies too)."""
    reason = provenance.mismatch(info, identity, where)
    if reason is not None:
        raise Refused(reason)


def check_image_root(base_dir: str, image_root: str, where: str) -> None:
    """Refused unless the index's catalog root is the server's image root."""
    same = (base_dir.rstrip("/") == image_root.rstrip("/") if _is_remote(image_root)
            else os.path.realpath(base_dir) == os.path.realpath(image_root))
    if not same:
        raise Refused(f"index {where} serves images from {base_dir!r}, but this server "
                      f"serves images only from {image_root!r}; restart with --image_root to "
                      "change it")


def image_path(image_root: str, relative: str) -> str | None:
    """The resolved file of an item image, or None if it leads outside ``image_root`` (``..``,
    an absolute path, a symlink pointing out), is not a regular file, or is not a path at all
    (a non-string ``image`` in a hand-edited ``items.jsonl``)."""
    if not isinstance(relative, str):
        return None
    root = os.path.realpath(image_root)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        return None
    return path
