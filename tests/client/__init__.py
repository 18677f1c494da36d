"""Tests of the typed client (clients/python/cruzflow/client) against real servers."""
