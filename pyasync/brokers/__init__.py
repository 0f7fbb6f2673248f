"""Broker backends: one module per ``BROKER_URL`` scheme, each importing its driver lazily."""
