"""Envoy filter names shared by the bootstrap and the servicers: each filter's name is
also its dynamic-metadata namespace, and ext_proc's its attributes' key."""

from __future__ import annotations

EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
