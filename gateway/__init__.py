"""``refgen gateway``: job events as Server-Sent Events (with replay), the live job pages, an
index of recent jobs, the local store's signed files and ``/metrics``.

A service of its own: it reads Redis and never imports Celery. It may use ``worker``'s
constants, settings, metrics and local store, never ``tasks``.
"""
