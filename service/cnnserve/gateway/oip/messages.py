"""The OIP messages (``inference.*``), built in a descriptor pool of their own.

tritonclient, MLServer and KServe each register their own copy of these protos in protobuf's default pool,
under the same names (``inference.ModelInferRequest``, ...), and a second definition of a name there fails
the import ("TypeError: Couldn't build proto file into descriptor pool: duplicate symbol"; kserve/kserve#3099,
SeldonIO/MLServer#1730). The gateway takes the file the generator wrote (``cnnserve/oip_api``) into a
private pool instead of importing it, so one process can hold a gateway and tritonclient both: tests do,
and so may a user's model code. :data:`pb` has the generated module's names (messages and enum values);
type checkers see the generated ``.pyi``.
"""

from __future__ import annotations

import ast
import types
from importlib import resources
from typing import TYPE_CHECKING

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["pb", "POOL", "SERVICE_NAME", "reflection_pool"]

_GENERATED = "grpc_service_pb2.py"


def _serialized_file() -> bytes:
    """The serialized FileDescriptorProto the generated module would add to the default pool."""
    source = resources.files("cnnserve.oip_api").joinpath(_GENERATED).read_text()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
        ):
            value = ast.literal_eval(node.args[0])
            if isinstance(value, bytes):
                return value
    raise ImportError(f"cnnserve.oip_api/{_GENERATED} has no serialized descriptor: regenerate it")


POOL = descriptor_pool.DescriptorPool()
_FILE = POOL.AddSerializedFile(_serialized_file())


def _namespace() -> types.SimpleNamespace:
    names: dict[str, object] = {}
    for name, message in _FILE.message_types_by_name.items():
        names[name] = message_factory.GetMessageClass(message)
    for enum in _FILE.enum_types_by_name.values():
        names[enum.name] = enum
        names.update({value.name: value.number for value in enum.values})
    return types.SimpleNamespace(**names)


if TYPE_CHECKING:
    from cnnserve.oip_api import grpc_service_pb2 as pb
else:
    pb = _namespace()

SERVICE_NAME = _FILE.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService


def reflection_pool(service_names: tuple[str, ...]) -> descriptor_pool.DescriptorPool:
    """A pool for the reflection service: the OIP file and the default pool's files of ``service_names``."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: object) -> None:
        assert hasattr(file, "name") and hasattr(file, "dependencies")
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)  # type: ignore[attr-defined]
        pool.Add(proto)
        added.add(file.name)

    default = descriptor_pool.Default()
    for name in service_names:
        if name != SERVICE_NAME:
            add(default.FindServiceByName(name).file)
    add(_FILE)
    return pool
