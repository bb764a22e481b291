"""The gRPC side of raee: server, client, admin CLI.

gRPC's C core writes its own lines to stderr (one per failed TLS handshake, for instance), outside the server's
log format; it reads GRPC_VERBOSITY once, when grpc is first imported, so the default is set here, before any
module of this package imports grpc. Set GRPC_VERBOSITY=ERROR (or INFO) to see those lines again.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
