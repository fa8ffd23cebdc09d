"""Envoy's configuration as an artifact rendered from the policy: the bootstrap
(``bootstrap.py``), the HTTP filter chain (``http_filters.py``), clusters
(``clusters.py``), OpenAI-shaped local replies (``local_replies.py``), the filter names
shared with the servicers (``names.py``) and the Envoy binary lookup (``binary.py``).
Built from typed ``envoy-data-plane`` dataclasses, off the per-request path. May import
``policy`` only.
"""
