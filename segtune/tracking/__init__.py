"""The MLflow side of segtune: writing sweep and trial runs (`runs`), reading them back into
tables (`query`) and choosing among them (`select`); the cost table (`costs`) and a sweep's time
account (`timing`); the tracking URI and whether its server answers (`address`, `outage`); the
`mlflow server` itself (`server`: its pool setting, a local one to measure), the cluster's
server's login (`auth`) and the load test that measures it (`server_load`). The contract's names are `segtune.config.names`.

Import the submodules: `address` is free of MLflow, so checks can use it.
"""
