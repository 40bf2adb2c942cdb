"""The service's OpenAPI 3.1 description (``GET /openapi.json``).

Written out rather than generated: the routes validate raw query strings themselves (strict
UTF-8, exact error messages) instead of through a schema library, so there is no model to
generate from.  ``tests/test_serve_server.py`` checks this document against the app's routes,
so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: str, media: str = JSON) -> dict[str, Any]:
    return {"description": description,
            "content": {media: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _get(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": responses, **extra}}


def document(*, max_k: int, default_k: int, max_query_chars: int, max_url_bytes: int,
             admin: bool) -> dict[str, Any]:
    """The OpenAPI document for a service with these limits (admin routes only if enabled)."""
    common = {"405": _error("Method other than GET/HEAD."),
              "413": _error("The request has a body (no route accepts one)."),
              "414": _error(f"Request target longer than {max_url_bytes} bytes.")}
    paths: dict[str, Any] = {
        "/search": _get(
            "Top-k items for a text query (query tower online, item embeddings from the index).",
            {"200": _ok("Results, best first.", "SearchResponse"),
             "400": _error("Empty, over-long or non-UTF-8 query; k out of range or not an "
                           "integer; a parameter given twice; control characters."), **common},
            parameters=[
                {"name": "q", "in": "query", "required": True, "description": "Query text.",
                 "schema": {"type": "string", "minLength": 1, "maxLength": max_query_chars}},
                {"name": "k", "in": "query", "required": False, "description": "Results wanted.",
                 "schema": {"type": "integer", "minimum": 1, "maximum": max_k,
                            "default": default_k}},
            ]),
        "/items/{item_id}/image": _get(
            "The image file of an item of the serving index.",
            {"200": {"description": "Image bytes.", "content": {"image/*": {}}},
             "404": _error("Unknown item id, or no servable image file."), **common},
            parameters=[{"name": "item_id", "in": "path", "required": True,
                         "description": "Percent-encoded item id (one path segment).",
                         "schema": {"type": "string"}}]),
        "/healthz": _get("Liveness: the process answers.",
                         {"200": _ok("Service and index summary.", "Health")}),
        "/readyz": _get("Readiness: bundle compiled, index loaded, batch worker running.",
                        {"200": _ok("Ready.", "Ready"), "503": _ok("Not ready.", "Ready")}),
        "/metrics": _get("Prometheus metrics (text exposition format).",
                         {"200": {"description": "Metrics.", "content": {"text/plain": {}}}}),
        "/openapi.json": _get("This document.", {"200": {"description": "OpenAPI document.",
                                                         "content": {JSON: {}}}}),
        "/": _get("Search page (HTML).", {"200": {"description": "Page.",
                                                  "content": {"text/html": {}}}}),
    }
    if admin:
        paths["/admin/reload"] = {"post": {
            "summary": "Load an index directory beside the serving one and swap to it "
                       "(admin listener only).",
            "parameters": [{"name": "index", "in": "query", "required": False,
                            "description": "Index directory (default: the serving index's "
                                           "path as given, re-resolving symlinks).",
                            "schema": {"type": "string"}}],
            "responses": {"200": _ok("Swapped.", "Reload"),
                          "409": _error("Another reload is running."),
                          "422": _error("The new index could not be loaded; the old one "
                                        "still serves (reason in `error`).")}}}
    result = {"type": "object", "required": ["item_id", "score", "title", "image_url"],
              "properties": {"item_id": {"type": "string"}, "score": {"type": "number"},
                             "title": {"type": "string"}, "image_url": {"type": "string"}}}
    index_state = {"type": "object", "properties": {
        k: {"type": t} for k, t in [("directory", "string"), ("kind", "string"),
                                    ("items", "integer"), ("version", "integer"),
                                    ("generation", "integer"), ("tombstones", "integer")]}}
    schemas = {
        "Error": {"type": "object", "required": ["error", "status"],
                  "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
        "Result": result,
        "SearchResponse": {
            "type": "object", "required": ["query", "k", "took_ms", "index", "results"],
            "properties": {"query": {"type": "string"}, "k": {"type": "integer"},
                           "took_ms": {"type": "number", "description": "Batch wait + encode "
                                       "+ index search, in the service."},
                           "index": {"type": "string", "enum": ["flat", "hnsw", "ivf"]},
                           "index_version": {"type": "integer"},
                           "results": {"type": "array",
                                       "items": {"$ref": "#/components/schemas/Result"}}}},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string"}, "items": {"type": "integer"},
            "index": {"type": "string"}, "embed_dim": {"type": "integer"},
            "bundle_step": {"type": "integer"}, "index_version": {"type": "integer"}}},
        "IndexState": index_state,
        "Ready": {"type": "object", "properties": {
            "ready": {"type": "boolean"}, "index": {"$ref": "#/components/schemas/IndexState"},
            "last_reload_error": {"type": ["string", "null"]}}},
        "Reload": {"type": "object", "properties": {
            "previous": {"$ref": "#/components/schemas/IndexState"},
            "serving": {"$ref": "#/components/schemas/IndexState"},
            "warning": {"type": "string"}}},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "vlp_jax product search", "version": "2",
                     "description": "Text-to-multimodal product retrieval: the query tower runs "
                                    "online (dynamically batched), items come from an offline "
                                    "faiss index that can be swapped without a restart. Every "
                                    "client error is a JSON `Error` with a 4xx status."},
            "paths": paths, "components": {"schemas": schemas}}
