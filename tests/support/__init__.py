"""What the tests share and are not tests themselves (``pythonpath = ["tests"]`` makes it
importable as ``support``).

- :mod:`support.dbtools`: short-lived engines to run SQL on a test database.
- :mod:`support.processes`: free ports, and the helper processes below, started the same way
  by every test that needs them.
- ``crash_writer.py``, ``eio_writer.py``, ``cluster_node.py``: scripts the tests run in their
  own OS processes (``crash_writer`` is also imported, for its batch layout and log reader).
- ``fail_wal_fsync.c``: the ``LD_PRELOAD`` shim ``eio_writer.py`` runs under.
"""
