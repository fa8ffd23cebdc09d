"""Where API keys live, behind one protocol (``base.py``): the embedded keyring file
(``keyring.py``), Redis (``redis_store.py``) or an external HTTP validation service
(``http.py``); the two remote ones share their options and LRU cache (``cache.py``);
``factory.py`` picks one from the config. May import ``policy`` only.
"""
