"""The generated raee.v1 messages and stubs. They are made by the install step (`make install` or `make proto`, which
run `python -m service.protos`; the Dockerfile runs the same), never on import: importing writes no file."""

try:
    from service.generated.raee.v1 import raee_pb2 as pb
    from service.generated.raee.v1 import raee_pb2_grpc as pb_grpc
except ImportError as exc:  # a checkout that skipped the install step, or a proto edited since
    raise ImportError("the generated raee.v1 gRPC code is missing (service/generated/): run `make install` or "
                      f"`make proto` (python -m service.protos) first ({exc})") from exc

__all__ = ["pb", "pb_grpc"]
