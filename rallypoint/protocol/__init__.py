"""The contracts between rallyd, its workers, rallyctl and etcd, in one neutral place.

Both sides of each contract import it from here: the etcd keys (``keys``), the orders and reports
written there (``orders``), the local channel's messages (``channel``), the worker's exit codes
(``exit_codes``) and the plan arithmetic every party must compute alike (``grid``). Nothing here
imports ``daemon``, ``worker`` or ``cli``, so neither side has to import the other.
"""
