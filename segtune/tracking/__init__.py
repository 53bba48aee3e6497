"""The MLflow side of segtune: the contract's names (`names`), writing sweep and trial runs
(`runs`), reading them back into tables (`query`) and choosing among them (`select`).

Import the submodules: `names` is free of MLflow, so configuration checks can use it.
"""
