"""Benchmarks, split like the product: entry points orchestrate, measurement measures, the
report renders.

``make bench`` (``python -m bench.run``), the HTTP bench and its report:

* ``run``: the CLI and the orchestration of the rows (which server, which workload, in order);
* ``servers``: the bare aiohttp baseline and ``mediamarket serve`` started, set up through the
  real API, stopped;
* ``measure``: the child processes, CPU accounting from /proc, one load generator driven;
* ``report``: the rows, the markdown table, notes and goals, the README block;
* ``load`` and ``bare``: the load generator and the baseline server, each its own process;
* ``profile``: py-spy on the engine under a workload (``python -m bench.profile``).

``python -m bench.replay``, every projection rebuilt from a generated market log:

* ``replay``: its CLI; ``replaylog``: the simulated market that writes the log;
  ``replaystore``: the cached SQLite log and its PostgreSQL copy; ``replaymeasure``: the
  rebuild timed against reading the same log.

Shared: ``common`` (paths, the model, progress lines), ``databases`` (SQLite URLs, scratch
PostgreSQL databases), ``project`` (every name taken from the project's own packages).
"""
