"""segtune: architecture and hyperparameter sweeps for aerial semantic segmentation."""
