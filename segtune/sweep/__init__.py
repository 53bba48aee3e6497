"""The Ray Tune side of a sweep, the one layer that imports Ray: the driver (`driver`), the
trainable (`trainable`), the search space, searcher and scheduler (`space`, `search`), the checks
before the first trial (`preflight`, `node_checks`), the cost stage, the sweep's storage, lock,
saved copy and edits, signals and ending, the watch for a sweep in which no trial can start
(`stall`), the trials' names and progress table (`progress`), and the summary (see
docs/design.md)."""
