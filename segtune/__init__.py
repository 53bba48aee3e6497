"""segtune: architecture and hyperparameter sweeps for aerial semantic segmentation."""

import os

# albumentations asks the package index for a newer version at import unless told not to: on
# a cluster node without internet that is a name-resolution error per process. Every entry
# point imports this package first.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
