"""brainzoo: a DataLad model zoo of 3D brain-MRI models in tf.keras.

The architectures live in :mod:`brainzoo.models` (folder ``models/``), data and training in
:mod:`brainzoo.training` (folder ``training/``); the catalogue under ``neuronets/`` is read by
:mod:`brainzoo.catalogue`.
"""

__version__ = "0.1.0"

import os as _os

# TensorFlow 2.15 leaves its oneDNN CPU kernels off on this class of CPU; with them the Keras ports run
# 2-3x faster and still match the PyTorch originals to ~1e-6 (benchmarks/bench_forward.py). It must be
# set before TensorFlow is imported, and a user's own setting wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines drown the records
