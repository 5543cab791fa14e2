"""Shared plumbing of every stage: settings, topics, Kafka clients, errors, storage, observability.

The second layer from the bottom: it imports only `schemas` (tests/unit/test_layers.py).
"""
