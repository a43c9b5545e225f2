"""Queries as params -> plan -> legs: ``params`` (``SearchParams``, decided and checked once, and
``SearchResult``), ``filters`` (label filters as allowed-slot bitsets), ``planner`` (which rows go to
which leg, relabel retries, parts), ``cpu`` (graph search in the C engine, exact search over allowed
rows) and ``gpu`` (the GPU side of an index: its mirror, the GPU leg, assisted-insert candidates).
"""
