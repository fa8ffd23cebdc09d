"""Envoy filter names shared by the bootstrap and the servicers: each filter's name is
also its dynamic-metadata namespace, and ext_proc's its attributes' key."""

from __future__ import annotations

EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
# The Lua filter that marks a backend's error answers: its metadata holds the backend's
# own status (ext_proc rewrites such a body OpenAI-shaped; a 5xx reaches clients as 502).
# A success is marked only when it has no body at all (content-length 0): a 502 too.
UPSTREAM_ERRORS = "tokenbooth.upstream_errors"
UPSTREAM_STATUS_KEY = "status"
# The route of GET /v1/models (and /v1/models/{id}), answered by ext_proc: the local
# replies tell its outage by this name.
MODELS_ROUTE = "models"
# The upstream Lua filter on every backend cluster that holds a small answer that is not
# a stream until its end (authz/envoy_config/clusters.py, `whole_answers`).
WHOLE_ANSWERS = "tokenbooth.whole_answers"
