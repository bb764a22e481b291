"""The generated raee.v1 messages and stubs, generated from proto/ on first use if missing or stale."""

from service.protos import ensure_generated

ensure_generated()

from service.generated.raee.v1 import raee_pb2 as pb  # noqa: E402
from service.generated.raee.v1 import raee_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
