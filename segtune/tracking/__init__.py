"""The MLflow side of segtune: the contract's names (`names`), writing sweep and trial runs
(`runs`), reading them back into tables (`query`) and choosing among them (`select`); the
tracking URI and whether its server answers (`address`); the `mlflow server` itself (`server`:
its pool setting, a local one to measure) and the load test that measures it (`load`).

Import the submodules: `names` and `address` are free of MLflow, so checks can use them.
"""
