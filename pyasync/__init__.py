"""Internals of pyasync-server that no user imports: routing, timers, TLS set-up, adapters.

Users import from the modules at the top of the repository (``server``, ``client``, ``package``,
``actions``, ``database``, ...); those re-export what is meant to be called.
"""
