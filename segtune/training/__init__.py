"""One trial's training, the same for `segtune.train` and the Ray trainable: its inputs
(`prepare`), the loop (`engine`), the loss (`losses`), the confusion-matrix metrics (`metrics`)
and the test-set evaluation (`evaluation`). No Ray, no MLflow."""
