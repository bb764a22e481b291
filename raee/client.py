"""The Python client for the raee gRPC service (`raee.client.Client`).

The client itself lives in service/client.py, with the rest of the gRPC code, so the raee library stays free of
gRPC; this module only gives it its public name.
"""

from service.client import (Classification, ClassifyResult, Client, Neighbour, RaeeClientError, ReloadResult,
                            Request, RequestFailure, ServerInfo, TaskInfo, Timings)

__all__ = ["Client", "Classification", "ClassifyResult", "Neighbour", "RaeeClientError", "ReloadResult", "Request",
           "RequestFailure", "ServerInfo", "TaskInfo", "Timings"]
