"""Generate the gRPC code for proto/raee/v1/raee.proto into service/generated/ (with .pyi stubs; not committed).

The one route to generated code: the install step (`make install`, `make proto`, the Dockerfile) runs
`python -m service.protos`; nothing generates on import.

The proto package stays raee.v1; the virtual include path puts the generated modules under
service.generated.raee.v1, so they do not collide with the raee library package.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "raee" / "v1" / "raee.proto"
GENERATED = ROOT / "service" / "generated" / "raee" / "v1"


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{well_known}", f"-Iservice/generated={ROOT / 'proto'}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", str(Path("service/generated/raee/v1/raee.proto"))]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


if __name__ == "__main__":
    generate()
    print(f"generated {sorted(p.name for p in GENERATED.iterdir())}", file=sys.stderr)
