"""brainzoo: a DataLad model zoo of 3D brain-MRI models in tf.keras.

The architectures live in :mod:`brainzoo.models` (folder ``models/``), data and training in
:mod:`brainzoo.training` (folder ``training/``); the catalogue under ``neuronets/`` is read by
:mod:`brainzoo.catalogue`.
"""

__version__ = "0.1.0"
