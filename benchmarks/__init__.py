"""The side-by-side benchmark of casty event journals, as a package.

``python benchmarks/run.py`` is the entry point (``make bench``); its docstring
says what is measured. The modules, in the order a run uses them:

- ``cli``: the flags and ``main``.
- ``data``: the events and snapshots the workloads write, and the checks of what comes back.
- ``raw``: the raw-driver baselines (aiosqlite, asyncpg, asyncmy) on casty-sa's tables.
- ``postgres``: the PostgreSQL server and a fresh database per repetition.
- ``mysql``: the MariaDB (MySQL) server and a fresh database per repetition.
- ``journals``: the journals under test by name, each opened on a fresh store and warmed up.
- ``workloads``: the workloads W1 to W6, and every workload of a run in order.
- ``casty_e2e``: W7, casty end to end (event-sourced entities in an ``ActorSystem``).
- ``writers``: M, several writer processes on one PostgreSQL (and the writer process itself).
- ``disk``: D, bytes on disk per event and where they go.
- ``grown``: G, W1, W2, W4 tail and W5 again on a table of millions of events (opt-in).
- ``read_side``: the read-side workloads R1 and R2.
- ``projection``: the projection workloads P1 and P2.
- ``machine``: the machine the run is on (description, load average, peak RSS).
- ``measure``: the run itself: every workload over every journal, repetitions interleaved.
- ``targets``: the targets of the issues, and whether a run meets them.
- ``report``: the Markdown table, the targets' verdicts and the JSON.
- ``rss_scan``: W2 alone in a fresh process per journal and entity count (``--rss-scan``).
- ``progress``: progress lines on stderr.
- ``chart``: the SVG chart of a run's JSON (a script of its own).
"""
