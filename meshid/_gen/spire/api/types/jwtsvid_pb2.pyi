from meshid._gen.spire.api.types import spiffeid_pb2 as _spiffeid_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JWTSVID(_message.Message):
    __slots__ = ("token", "id", "expires_at", "issued_at", "hint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    id: _spiffeid_pb2.SPIFFEID
    expires_at: int
    issued_at: int
    hint: str
    def __init__(self, token: _Optional[str] = ..., id: _Optional[_Union[_spiffeid_pb2.SPIFFEID, _Mapping]] = ..., expires_at: _Optional[int] = ..., issued_at: _Optional[int] = ..., hint: _Optional[str] = ...) -> None: ...
