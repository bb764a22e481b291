"""raee: retrieval-augmented early exit for transformer classifiers.

Build an exit store from labelled calibration data (`raee.build.build_store`, or `raee-index build`), then
classify with `raee.Engine.load(store_dir).classify(texts)`: each text runs the backbone only to the layer that
its nearest calibration neighbours answered correctly at. `service.client.Client` talks to a raee-serve server
(the library itself knows nothing of gRPC).
"""

from typing import TYPE_CHECKING

from raee.errors import BackboneError, DataError, InputError, RaeeError, StoreError, StoreMismatchError, TaskError

if TYPE_CHECKING:
    from raee.engine import Classification, Engine, StageTimes

__all__ = ["Engine", "Classification", "StageTimes", "RaeeError", "InputError", "TaskError", "DataError",
           "BackboneError", "StoreError", "StoreMismatchError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The engine pulls in torch and faiss; import it on first use so that `import raee` (errors, kinds) stays light.
    if name in ("Engine", "Classification", "StageTimes"):
        from raee import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'raee' has no attribute {name!r}")
