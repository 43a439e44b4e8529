"""Regenerate the checked-in gRPC stubs in ``protocols/generated/`` from ``protocols/proto/``.

Run ``python -m potluck.protocols.generate`` after editing a ``.proto`` file and commit the result;
``tests/test_generated_stubs.py`` fails while the checked-in stubs differ from what this writes.

protoc names the Python modules after the proto package (``potluck.v1``), which is not an importable
package here; the stubs are flattened into ``potluck.protocols.generated`` and their imports rewritten.
The output depends on the grpcio-tools version (it stamps it into the files), which is why
``pyproject.toml`` pins grpcio-tools exactly: bump the pin and regenerate together.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent / "proto"
GENERATED_DIR = Path(__file__).resolve().parent / "generated"
GENERATED_PACKAGE = "potluck.protocols.generated"
PROTO_FILES = ("potluck/v1/coordinator.proto",)

_INIT = '''"""gRPC stubs generated from ``protocols/proto/`` by ``python -m potluck.protocols.generate``.

Do not edit: regenerate instead (``tests/test_generated_stubs.py`` checks they are up to date).
"""
'''


def _rewrite(text: str, old: str, new: str, file_name: str) -> str:
    # Exactly one occurrence, or a new grpcio-tools changed its output and the rewrite must be revisited.
    count = text.count(old)
    if count != 1:
        raise RuntimeError(f"{file_name}: expected one {old!r} to rewrite, found {count}")
    return text.replace(old, new)


def _fix_imports(text: str, proto_file: str, file_name: str) -> str:
    proto_module = proto_file.removesuffix(".proto").replace("/", ".")  # potluck.v1.coordinator
    proto_package, module = proto_module.rsplit(".", 1)
    if file_name.endswith("_pb2_grpc.py"):
        return _rewrite(
            text,
            f"from {proto_package} import {module}_pb2 ",
            f"from {GENERATED_PACKAGE} import {module}_pb2 ",
            file_name,
        )
    if file_name.endswith("_pb2.py"):
        # The module name protobuf gives the message classes (their __module__, used by pickle and repr).
        return _rewrite(text, f"'{proto_module}_pb2'", f"'{GENERATED_PACKAGE}.{module}_pb2'", file_name)
    return text


def generate(out_dir: Path = GENERATED_DIR) -> list[Path]:
    """Write the stubs (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) and ``__init__.py`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        well_known_protos = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known_protos}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)} (its errors are above)")
        for proto_file in PROTO_FILES:
            produced = sorted((Path(tmp) / proto_file).parent.glob(Path(proto_file).stem + "_pb2*"))
            if not produced:
                raise RuntimeError(f"protoc wrote nothing for {proto_file}")
            for source in produced:
                target = out_dir / source.name
                target.write_text(_fix_imports(source.read_text(), proto_file, source.name))
                written.append(target)
    init = out_dir / "__init__.py"
    init.write_text(_INIT)
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m potluck.protocols.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=GENERATED_DIR, help="output folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.out.resolve() == GENERATED_DIR:
        # Start clean so stubs of a deleted .proto do not linger.
        shutil.rmtree(GENERATED_DIR, ignore_errors=True)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
