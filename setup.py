"""Builds the generated protobuf modules into the package: `pip install .` works without `make proto`.

Everything else about the package is in pyproject.toml. The generation is the Makefile's: protoc's path
mapping (-Ishared/pb=protos) makes the generated imports read `from shared.pb.pagewire.v1 import ...`.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_PACKAGES = ("shared.pb", "shared.pb.pagewire", "shared.pb.pagewire.v1")


def generate_protos(output_root: Path) -> None:
    """Writes shared/pb/pagewire/v1/*_pb2{,_grpc}.py(i) under `output_root`, with the packages' __init__s."""
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos" / "pagewire" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {ROOT / 'protos'}")
    (output_root / "shared" / "pb" / "pagewire" / "v1").mkdir(parents=True, exist_ok=True)
    include = f"-I{Path('shared') / 'pb'}={ROOT / 'protos'}"
    arguments = [
        "grpc_tools.protoc", include, f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
        f"--python_out={output_root}", f"--pyi_out={output_root}", f"--grpc_python_out={output_root}",
        *(str(Path("shared") / "pb" / p.relative_to(ROOT / "protos")) for p in protos),
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(arguments)}")
    for package in PROTO_PACKAGES:
        (output_root.joinpath(*package.split(".")) / "__init__.py").touch()


class BuildPyWithProtos(build_py):
    """build_py that also generates the protobuf modules: into the build tree, or into the sources for an
    editable install (where the sources are what gets imported)."""

    def run(self) -> None:
        editable = getattr(self, "editable_mode", False)
        for package in PROTO_PACKAGES:
            if package not in self.packages:
                self.packages.append(package)
        if editable:
            generate_protos(ROOT)
            super().run()
            return
        super().run()
        generate_protos(Path(self.build_lib))

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        # The proto packages may not exist in the sources yet: they are generated after the copy.
        if package in PROTO_PACKAGES and not Path(package_dir).is_dir():
            return []
        return super().find_package_modules(package, package_dir)


setup(cmdclass={"build_py": BuildPyWithProtos})
