"""raee: retrieval-augmented early exit for transformer classifiers.

Build an exit store from labelled calibration data (`raee.build.build_store`, or `raee-index build`), then
classify with `raee.Engine.load(store_dir).classify(texts)`: each text runs the backbone only to the layer that
its nearest calibration neighbours answered correctly at.
"""

from raee.engine import Classification, Engine, StageTimes
from raee.errors import (BackboneError, DataError, InputError, RaeeError, StoreError, StoreMismatchError,
                         TaskError)

__all__ = ["Engine", "Classification", "StageTimes", "RaeeError", "InputError", "TaskError", "DataError",
           "BackboneError", "StoreError", "StoreMismatchError"]
__version__ = "0.1.0"
