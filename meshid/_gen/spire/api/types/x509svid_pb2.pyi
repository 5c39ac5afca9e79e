from meshid._gen.spire.api.types import spiffeid_pb2 as _spiffeid_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class X509SVID(_message.Message):
    __slots__ = ("cert_chain", "id", "expires_at", "hint")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    id: _spiffeid_pb2.SPIFFEID
    expires_at: int
    hint: str
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., id: _Optional[_Union[_spiffeid_pb2.SPIFFEID, _Mapping]] = ..., expires_at: _Optional[int] = ..., hint: _Optional[str] = ...) -> None: ...
