"""The MLflow side of segtune: the contract's names (`names`), writing sweep and trial runs
(`runs`), reading them back into tables (`query`) and choosing among them (`select`); the
`mlflow server` itself (`server`: its pool setting, health, a local one to measure) and the load
test that measures it (`load`).

Import the submodules: `names` is free of MLflow, so configuration checks can use it.
"""
