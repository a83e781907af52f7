"""kube-apiserver's ExternalJWTSigner API (``k8s.io/externaljwt``, ``apis/v1``), from its facts.

No ``.proto`` file and no generated code: the messages are described here field by
field (name, number, type), as the API defines them, and turned into message
classes by the protobuf runtime; the service is a gRPC generic handler at the same
full method names (``/v1.ExternalJWTSigner/Sign``, ``FetchKeys``, ``Metadata``). The
wire format is fixed by the field numbers and types alone; the names match the API
so that errors and reflection read the same as kube-apiserver's.

The descriptors live in a private descriptor pool, so that nothing another library
registers in protobuf's default pool (python3-etcd3 registers its own) can clash.

The API, as kube-apiserver uses it (``pkg/serviceaccount/externaljwt/plugin``):

- ``Sign(SignJWTRequest{claims})``: ``claims`` is the base64url payload exactly as
  the token's second segment; the answer is the token's first and third segments,
  ``header`` (base64url JSON holding exactly ``alg``, ``kid`` and ``typ: JWT``) and
  ``signature`` (base64url), and kube-apiserver joins the three.
- ``FetchKeys()``: ``keys`` (``key_id`` 1-1024 characters, ``key`` PKIX DER,
  ``exclude_from_oidc_discovery``), ``data_timestamp`` (must be a valid Timestamp)
  and ``refresh_hint_seconds`` (must be > 0); an answer with no keys is an error.
- ``Metadata()``: ``max_token_expiration_seconds`` (at least 600).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

PACKAGE = "v1"
SERVICE = f"{PACKAGE}.ExternalJWTSigner"
SIGN, FETCH_KEYS, METADATA = "Sign", "FetchKeys", "Metadata"
# kube-apiserver's limits on what FetchKeys and Sign return.
MAX_KEY_ID_LENGTH = 1024
MIN_TOKEN_EXPIRATION_SECONDS = 600
ALGORITHMS = ("RS256", "ES256", "ES384", "ES512")

_F = descriptor_pb2.FieldDescriptorProto
_TIMESTAMP = ".google.protobuf.Timestamp"
# message -> its fields: (name, number, type, repeated, message type)
_MESSAGES: dict[str, tuple[tuple[str, int, int, bool, str | None], ...]] = {
    "SignJWTRequest": (("claims", 1, _F.TYPE_STRING, False, None),),
    "SignJWTResponse": (
        ("header", 1, _F.TYPE_STRING, False, None),
        ("signature", 2, _F.TYPE_STRING, False, None),
    ),
    "FetchKeysRequest": (),
    "FetchKeysResponse": (
        ("keys", 1, _F.TYPE_MESSAGE, True, f".{PACKAGE}.Key"),
        ("data_timestamp", 2, _F.TYPE_MESSAGE, False, _TIMESTAMP),
        ("refresh_hint_seconds", 3, _F.TYPE_INT64, False, None),
    ),
    "Key": (
        ("key_id", 1, _F.TYPE_STRING, False, None),
        ("key", 2, _F.TYPE_BYTES, False, None),
        ("exclude_from_oidc_discovery", 3, _F.TYPE_BOOL, False, None),
    ),
    "MetadataRequest": (),
    "MetadataResponse": (("max_token_expiration_seconds", 1, _F.TYPE_INT64, False, None),),
}
# method -> (request, response)
METHODS = {
    SIGN: ("SignJWTRequest", "SignJWTResponse"),
    FETCH_KEYS: ("FetchKeysRequest", "FetchKeysResponse"),
    METADATA: ("MetadataRequest", "MetadataResponse"),
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="sakeystate/externaljwt/v1.proto",  # ours: the pool is private
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field_name, number, kind, repeated, type_name in fields:
            field = message.field.add(
                name=field_name,
                number=number,
                type=kind,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if type_name is not None:
                field.type_name = type_name
    service = proto.service.add(name=SERVICE.rsplit(".", 1)[1])
    for method, (request, response) in METHODS.items():
        service.method.add(
            name=method, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}"
        )
    return proto


def _classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool.Add(timestamp)
    pool.Add(_file())
    names = [*_MESSAGES, "google.protobuf.Timestamp"]
    return {
        name.rsplit(".", 1)[-1]: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(name if "." in name else f"{PACKAGE}.{name}")
        )
        for name in names
    }


_CLASSES = _classes()
SignJWTRequest: Any = _CLASSES["SignJWTRequest"]
SignJWTResponse: Any = _CLASSES["SignJWTResponse"]
FetchKeysRequest: Any = _CLASSES["FetchKeysRequest"]
FetchKeysResponse: Any = _CLASSES["FetchKeysResponse"]
Key: Any = _CLASSES["Key"]
MetadataRequest: Any = _CLASSES["MetadataRequest"]
MetadataResponse: Any = _CLASSES["MetadataResponse"]
Timestamp: Any = _CLASSES["Timestamp"]


def full_method(method: str) -> str:
    """The gRPC path kube-apiserver calls, e.g. ``/v1.ExternalJWTSigner/Sign``."""
    return f"/{SERVICE}/{method}"


Handler = Callable[[Any, Any], Any]  # (request message, grpc context) -> response message


def generic_handler(handlers: dict[str, Handler]) -> Any:
    """The service for ``grpc.Server.add_generic_rpc_handlers``: ``handlers`` maps each
    method name (Sign, FetchKeys, Metadata) to its implementation."""
    import grpc

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            method: grpc.unary_unary_rpc_method_handler(
                handlers[method],
                request_deserializer=_CLASSES[request].FromString,
                response_serializer=_CLASSES[response].SerializeToString,
            )
            for method, (request, response) in METHODS.items()
        },
    )


def client(channel: Any) -> dict[str, Callable[..., Any]]:
    """Callables for each method over ``channel`` (a ``grpc.Channel``): what a client of
    the socket (``sakeystate`` tests, a health check) calls, exactly as kube-apiserver does."""
    return {
        method: channel.unary_unary(
            full_method(method),
            request_serializer=_CLASSES[request].SerializeToString,
            response_deserializer=_CLASSES[response].FromString,
        )
        for method, (request, response) in METHODS.items()
    }
