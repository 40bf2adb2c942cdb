"""Which bundle embedded an index: the identity an index records and the rule that compares it.

An index's vectors live in the embedding space of the bundle whose item tower computed them;
searching them with another bundle's query tower returns noise, and an incremental update that
added another bundle's vectors would mix two spaces in one index.  So the index job records the
bundle's identity in ``index_info.json``, and both the offline update (``update.py``) and the
service's reload rules (``serve/policy.py``) refuse an index whose recorded identity differs;
each turns :func:`mismatch`'s reason into its own error (a ``ValueError`` offline, an HTTP 409
online).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def bundle_fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short digest of a bundle's ``manifest.json`` (step, creation time, tower shapes and
    parameter counts): two exports share it only if they are the same export."""
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def bundle_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What an index records about its bundle (``index_info.json``) and reloads compare."""
    return {"fingerprint": bundle_fingerprint(manifest), "step": manifest.get("step"),
            "created_at": manifest.get("created_at")}


def mismatch(info: Mapping[str, Any], identity: Mapping[str, Any], where: str) -> str | None:
    """Why the index ``info`` was not embedded by the bundle of ``identity`` (None if it was).

    Indexes written before fingerprints were recorded are compared by step and creation time.
    """
    recorded = info.get("bundle_fingerprint")
    if recorded is not None:
        if recorded != identity["fingerprint"]:
            return (f"index {where} was embedded by another bundle (fingerprint {recorded}, "
                    f"step {info.get('bundle_step')}); the serving bundle is "
                    f"{identity['fingerprint']} (step {identity['step']})")
        return None
    made = info.get("bundle_created_at")
    if info.get("bundle_step") != identity["step"] or (made and made != identity["created_at"]):
        return (f"index {where} was embedded by another bundle (step {info.get('bundle_step')}, "
                f"created {made}); the serving bundle is step {identity['step']}, created "
                f"{identity['created_at']}")
    return None
