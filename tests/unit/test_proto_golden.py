"""Wire facts of our .proto files.

- Golden bytes of SPIRE API messages (shared/testdata/spire-api-golden.json, made from
  the upstream spire-api-sdk definitions) decode to their protobuf JSON and re-encode
  byte for byte.
- Field numbers and types match the tables in SPEC-PROTOCOLS.md.
- The Workload API descriptors match py-spiffe's copy, messages cross between the two
  in both directions, and a py-spiffe (grpcio) stub talks to our grpclib service.
- The grpclib mappings (generated and the hand-written SDS one) use the right method
  paths and cardinalities.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream
from spiffe._proto import workload_pb2 as spiffe_workload_pb2
from spiffe._proto import workload_pb2_grpc as spiffe_workload_grpc

from issuer._gen.spire.api.server.entry.v1 import entry_grpc, entry_pb2
from meshid._gen.spire.api.types import (
    entry_pb2 as types_entry_pb2,
)
from meshid._gen.spire.api.types import (
    federateswith_pb2,
    jwtsvid_pb2,
    selector_pb2,
    spiffeid_pb2,
    status_pb2,
    x509svid_pb2,
)
from workload_api import sds_service
from workload_api._gen import workload_grpc, workload_pb2
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_grpc,
    delegatedidentity_pb2,
)

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "spire-api-golden.json"
_GOLDEN_MISSING = f"golden file not found at {GOLDEN} (shared/testdata beside the repo checkout)"

PB2_MODULES: list[ModuleType] = [
    workload_pb2,
    delegatedidentity_pb2,
    entry_pb2,
    types_entry_pb2,
    federateswith_pb2,
    jwtsvid_pb2,
    selector_pb2,
    spiffeid_pb2,
    status_pb2,
    x509svid_pb2,
]


def _classes() -> dict[str, type[Message]]:
    """Every top-level message class we generate, by full proto name."""
    out: dict[str, type[Message]] = {}
    for mod in PB2_MODULES:
        for name in mod.DESCRIPTOR.message_types_by_name:
            cls = getattr(mod, name)
            out[cls.DESCRIPTOR.full_name] = cls
    return out


CLASSES = _classes()


# --- golden bytes -------------------------------------------------------------------


def _golden_cases() -> list[Any]:
    if not GOLDEN.is_file():
        # Under CI (shared/ beside the clone) the missing file is a failure, not a skip.
        marks = [] if os.environ.get("CI") else [pytest.mark.skip(reason=_GOLDEN_MISSING)]
        return [pytest.param(None, marks=marks, id="golden-missing")]
    messages = json.loads(GOLDEN.read_text())["messages"]
    return [pytest.param(m, id=f"{m['message'].rsplit('.', 1)[1]}[{m['case']}]") for m in messages]


@pytest.mark.parametrize("case", _golden_cases())
def test_golden_decode_and_encode(case: dict[str, Any] | None) -> None:
    if case is None:
        pytest.fail(_GOLDEN_MISSING)
    cls = CLASSES.get(case["message"])
    assert cls is not None, f"no class for {case['message']}"
    wire = bytes.fromhex(case["hex"])

    decoded = cls.FromString(wire)
    assert json_format.MessageToDict(decoded, preserving_proto_field_name=True) == case["json"]
    assert decoded.SerializeToString(deterministic=True) == wire

    parsed = json_format.ParseDict(case["json"], cls())
    assert parsed.SerializeToString(deterministic=True) == wire


def test_golden_file_complete() -> None:
    if not GOLDEN.is_file():
        if os.environ.get("CI"):
            pytest.fail(_GOLDEN_MISSING)
        pytest.skip(_GOLDEN_MISSING)
    messages = json.loads(GOLDEN.read_text())["messages"]
    assert len(messages) == 19
    assert {m["message"] for m in messages} <= CLASSES.keys()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field, encoded by hand."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


@pytest.mark.parametrize(
    ("cls", "field_name", "number"),
    [
        (delegatedidentity_pb2.SubscribeToX509BundlesResponse, "ca_certificates", 1),
        (delegatedidentity_pb2.SubscribeToJWTBundlesResponse, "bundles", 1),
        (workload_pb2.X509SVIDResponse, "federated_bundles", 3),
        (workload_pb2.X509BundlesResponse, "bundles", 2),
        (workload_pb2.JWTBundlesResponse, "bundles", 1),
    ],
)
def test_deterministic_map_serialization_sorts_keys(cls: type[Message], field_name: str, number: int) -> None:
    bundles = {
        "spiffe://zeta.org": b"z" * 3,
        "spiffe://alpha.org": b"a",
        "spiffe://mid.example": b"m" * 200,  # a length that needs a two-byte varint
    }
    msg = cls()
    for key in reversed(list(bundles)):
        getattr(msg, field_name)[key] = bundles[key]
    expected = b"".join(
        _ld(number, _ld(1, key.encode()) + _ld(2, value)) for key, value in sorted(bundles.items())
    )
    assert msg.SerializeToString(deterministic=True) == expected
    assert dict(cls.FromString(expected).ListFields()[0][1]) == bundles


# --- SPEC-PROTOCOLS.md field tables ---------------------------------------------------

T = FieldDescriptor
REP = "repeated"

# full name -> {field: (number, type[, "repeated"])}; type is a FieldDescriptor type or a
# message/enum full name. Only what the SPEC tables say; the goldens cover the rest.
SPEC_FIELDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "X509SVIDRequest": {},
    "X509SVIDResponse": {
        "svids": (1, "X509SVID", REP),
        "crl": (2, T.TYPE_BYTES, REP),
        "federated_bundles": (3, "X509SVIDResponse.FederatedBundlesEntry", REP),
    },
    "X509SVID": {
        "spiffe_id": (1, T.TYPE_STRING),
        "x509_svid": (2, T.TYPE_BYTES),
        "x509_svid_key": (3, T.TYPE_BYTES),
        "bundle": (4, T.TYPE_BYTES),
        "hint": (5, T.TYPE_STRING),
    },
    "X509BundlesRequest": {},
    "X509BundlesResponse": {
        "crl": (1, T.TYPE_BYTES, REP),
        "bundles": (2, "X509BundlesResponse.BundlesEntry", REP),
    },
    "JWTSVIDRequest": {"audience": (1, T.TYPE_STRING, REP), "spiffe_id": (2, T.TYPE_STRING)},
    "JWTSVIDResponse": {"svids": (1, "JWTSVID", REP)},
    "JWTSVID": {"spiffe_id": (1, T.TYPE_STRING), "svid": (2, T.TYPE_STRING), "hint": (3, T.TYPE_STRING)},
    "JWTBundlesRequest": {},
    "JWTBundlesResponse": {"bundles": (1, "JWTBundlesResponse.BundlesEntry", REP)},
    "ValidateJWTSVIDRequest": {"audience": (1, T.TYPE_STRING), "svid": (2, T.TYPE_STRING)},
    "ValidateJWTSVIDResponse": {"spiffe_id": (1, T.TYPE_STRING), "claims": (2, "google.protobuf.Struct")},
    "spire.api.types.Selector": {"type": (1, T.TYPE_STRING), "value": (2, T.TYPE_STRING)},
    "spire.api.types.SelectorMatch": {
        "selectors": (1, "spire.api.types.Selector", REP),
        "match": (2, "spire.api.types.SelectorMatch.MatchBehavior"),
    },
    "spire.api.types.SPIFFEID": {"trust_domain": (1, T.TYPE_STRING), "path": (2, T.TYPE_STRING)},
    "spire.api.types.X509SVID": {
        "cert_chain": (1, T.TYPE_BYTES, REP),
        "id": (2, "spire.api.types.SPIFFEID"),
        "expires_at": (3, T.TYPE_INT64),
        "hint": (4, T.TYPE_STRING),
    },
    "spire.api.types.JWTSVID": {
        "token": (1, T.TYPE_STRING),
        "id": (2, "spire.api.types.SPIFFEID"),
        "expires_at": (3, T.TYPE_INT64),
        "issued_at": (4, T.TYPE_INT64),
        "hint": (5, T.TYPE_STRING),
    },
    "spire.api.types.Entry": {
        "id": (1, T.TYPE_STRING),
        "spiffe_id": (2, "spire.api.types.SPIFFEID"),
        "parent_id": (3, "spire.api.types.SPIFFEID"),
        "selectors": (4, "spire.api.types.Selector", REP),
        "x509_svid_ttl": (5, T.TYPE_INT32),
        "federates_with": (6, T.TYPE_STRING, REP),
        "admin": (7, T.TYPE_BOOL),
        "downstream": (8, T.TYPE_BOOL),
        "expires_at": (9, T.TYPE_INT64),
        "dns_names": (10, T.TYPE_STRING, REP),
        "revision_number": (11, T.TYPE_INT64),
        "store_svid": (12, T.TYPE_BOOL),
        "jwt_svid_ttl": (13, T.TYPE_INT32),
        "hint": (14, T.TYPE_STRING),
        "created_at": (15, T.TYPE_INT64),
        "additional_attributes": (16, "spire.api.types.AdditionalAttributes"),
    },
    "spire.api.types.AdditionalAttributes": {
        "disable_x509_svid_prefetch": (1, T.TYPE_BOOL),
        "jwt_svid_include_jti": (2, T.TYPE_BOOL),
    },
    "spire.api.types.EntryMask": {
        name: (number, T.TYPE_BOOL)
        for number, name in enumerate(
            [
                "spiffe_id",
                "parent_id",
                "selectors",
                "x509_svid_ttl",
                "federates_with",
                "admin",
                "downstream",
                "expires_at",
                "dns_names",
                "revision_number",
                "store_svid",
                "jwt_svid_ttl",
                "hint",
                "created_at",
                "additional_attributes",
            ],
            start=2,
        )
    },
    "spire.api.types.FederatesWithMatch": {
        "trust_domains": (1, T.TYPE_STRING, REP),
        "match": (2, "spire.api.types.FederatesWithMatch.MatchBehavior"),
    },
    "spire.api.types.Status": {"code": (1, T.TYPE_INT32), "message": (2, T.TYPE_STRING)},
    "spire.api.agent.delegatedidentity.v1.SubscribeToX509SVIDsRequest": {
        "selectors": (1, "spire.api.types.Selector", REP),
        "pid": (2, T.TYPE_INT32),
    },
    "spire.api.agent.delegatedidentity.v1.SubscribeToX509SVIDsResponse": {
        "x509_svids": (1, "spire.api.agent.delegatedidentity.v1.X509SVIDWithKey", REP),
        "federates_with": (2, T.TYPE_STRING, REP),
    },
    "spire.api.agent.delegatedidentity.v1.X509SVIDWithKey": {
        "x509_svid": (1, "spire.api.types.X509SVID"),
        "x509_svid_key": (2, T.TYPE_BYTES),
    },
    "spire.api.agent.delegatedidentity.v1.SubscribeToX509BundlesRequest": {},
    "spire.api.agent.delegatedidentity.v1.SubscribeToX509BundlesResponse": {
        "ca_certificates": (
            1,
            "spire.api.agent.delegatedidentity.v1.SubscribeToX509BundlesResponse.CaCertificatesEntry",
            REP,
        ),
    },
    "spire.api.agent.delegatedidentity.v1.FetchJWTSVIDsRequest": {
        "audience": (1, T.TYPE_STRING, REP),
        "selectors": (2, "spire.api.types.Selector", REP),
        "pid": (3, T.TYPE_INT32),
    },
    "spire.api.agent.delegatedidentity.v1.FetchJWTSVIDsResponse": {
        "svids": (1, "spire.api.types.JWTSVID", REP),
    },
    "spire.api.agent.delegatedidentity.v1.SubscribeToJWTBundlesRequest": {},
    "spire.api.agent.delegatedidentity.v1.SubscribeToJWTBundlesResponse": {
        "bundles": (
            1,
            "spire.api.agent.delegatedidentity.v1.SubscribeToJWTBundlesResponse.BundlesEntry",
            REP,
        ),
    },
    "spire.api.server.entry.v1.ListEntriesRequest": {
        "filter": (1, "spire.api.server.entry.v1.ListEntriesRequest.Filter"),
        "output_mask": (2, "spire.api.types.EntryMask"),
        "page_size": (3, T.TYPE_INT32),
        "page_token": (4, T.TYPE_STRING),
    },
    "spire.api.server.entry.v1.CountEntriesRequest": {
        "filter": (1, "spire.api.server.entry.v1.CountEntriesRequest.Filter"),
    },
    "spire.api.server.entry.v1.CountEntriesResponse": {"count": (1, T.TYPE_INT32)},
    "spire.api.server.entry.v1.GetEntryRequest": {
        "id": (1, T.TYPE_STRING),
        "output_mask": (2, "spire.api.types.EntryMask"),
    },
    "spire.api.server.entry.v1.ListEntriesResponse": {
        "entries": (1, "spire.api.types.Entry", REP),
        "next_page_token": (2, T.TYPE_STRING),
    },
    "spire.api.server.entry.v1.BatchCreateEntryRequest": {
        "entries": (1, "spire.api.types.Entry", REP),
        "output_mask": (2, "spire.api.types.EntryMask"),
    },
    "spire.api.server.entry.v1.BatchCreateEntryResponse": {
        "results": (1, "spire.api.server.entry.v1.BatchCreateEntryResponse.Result", REP),
    },
    "spire.api.server.entry.v1.BatchUpdateEntryRequest": {
        "entries": (1, "spire.api.types.Entry", REP),
        "input_mask": (2, "spire.api.types.EntryMask"),
        "output_mask": (3, "spire.api.types.EntryMask"),
    },
    "spire.api.server.entry.v1.BatchUpdateEntryResponse": {
        "results": (1, "spire.api.server.entry.v1.BatchUpdateEntryResponse.Result", REP),
    },
    "spire.api.server.entry.v1.BatchDeleteEntryRequest": {"ids": (1, T.TYPE_STRING, REP)},
    "spire.api.server.entry.v1.BatchDeleteEntryResponse": {
        "results": (1, "spire.api.server.entry.v1.BatchDeleteEntryResponse.Result", REP),
    },
}
_FILTER = {
    "by_spiffe_id": (1, "spire.api.types.SPIFFEID"),
    "by_parent_id": (2, "spire.api.types.SPIFFEID"),
    "by_selectors": (3, "spire.api.types.SelectorMatch"),
    "by_federates_with": (4, "spire.api.types.FederatesWithMatch"),
    "by_hint": (5, "google.protobuf.StringValue"),
    "by_downstream": (6, "google.protobuf.BoolValue"),
}
_STATUS = (1, "spire.api.types.Status")
SPEC_NESTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "spire.api.server.entry.v1.ListEntriesRequest.Filter": _FILTER,
    "spire.api.server.entry.v1.CountEntriesRequest.Filter": _FILTER,
    "spire.api.server.entry.v1.BatchCreateEntryResponse.Result": {
        "status": _STATUS,
        "entry": (2, "spire.api.types.Entry"),
    },
    "spire.api.server.entry.v1.BatchUpdateEntryResponse.Result": {
        "status": _STATUS,
        "entry": (2, "spire.api.types.Entry"),
    },
    "spire.api.server.entry.v1.BatchDeleteEntryResponse.Result": {
        "status": _STATUS,
        "id": (2, T.TYPE_STRING),
    },
}


def _field_facts(desc: Descriptor) -> dict[str, tuple[Any, ...]]:
    facts: dict[str, tuple[Any, ...]] = {}
    for f in desc.fields:
        kind: Any = f.type
        if f.message_type is not None:
            kind = f.message_type.full_name
        elif f.enum_type is not None:
            kind = f.enum_type.full_name
        facts[f.name] = (f.number, kind, REP) if f.is_repeated else (f.number, kind)
    return facts


def _descriptor(full_name: str) -> Descriptor:
    for suffix in (".Filter", ".Result"):
        if full_name.endswith(suffix):
            parent = CLASSES[full_name.removesuffix(suffix)].DESCRIPTOR
            return parent.nested_types_by_name[suffix[1:]]
    return CLASSES[full_name].DESCRIPTOR


@pytest.mark.parametrize("full_name", [*SPEC_FIELDS, *SPEC_NESTED])
def test_fields_match_spec(full_name: str) -> None:
    expected = {**SPEC_FIELDS, **SPEC_NESTED}[full_name]
    assert _field_facts(_descriptor(full_name)) == expected


def test_match_behavior_enums() -> None:
    values = {"MATCH_EXACT": 0, "MATCH_SUBSET": 1, "MATCH_SUPERSET": 2, "MATCH_ANY": 3}
    for cls in (selector_pb2.SelectorMatch, federateswith_pb2.FederatesWithMatch):
        enum = cls.DESCRIPTOR.enum_types_by_name["MatchBehavior"]
        assert {v.name: v.number for v in enum.values} == values


def test_packages() -> None:
    assert workload_pb2.DESCRIPTOR.package == ""
    assert delegatedidentity_pb2.DESCRIPTOR.package == "spire.api.agent.delegatedidentity.v1"
    assert entry_pb2.DESCRIPTOR.package == "spire.api.server.entry.v1"
    for mod in (types_entry_pb2, federateswith_pb2, jwtsvid_pb2, selector_pb2, spiffeid_pb2, status_pb2):
        assert mod.DESCRIPTOR.package == "spire.api.types"


# --- grpclib service mappings ---------------------------------------------------------


def _instance(base: Any) -> Any:
    """A concrete subclass of a grpclib Base whose handlers do nothing."""

    async def noop(self: Any, stream: Any) -> None:
        return None

    return type(f"Fake{base.__name__}", (base,), dict.fromkeys(base.__abstractmethods__, noop))()


def _cardinality(client_streaming: bool, server_streaming: bool) -> Cardinality:
    return {
        (False, False): Cardinality.UNARY_UNARY,
        (False, True): Cardinality.UNARY_STREAM,
        (True, False): Cardinality.STREAM_UNARY,
        (True, True): Cardinality.STREAM_STREAM,
    }[(client_streaming, server_streaming)]


EXPECTED_METHODS = {
    "SpiffeWorkloadAPI": {
        "FetchX509SVID": Cardinality.UNARY_STREAM,
        "FetchX509Bundles": Cardinality.UNARY_STREAM,
        "FetchJWTSVID": Cardinality.UNARY_UNARY,
        "FetchJWTBundles": Cardinality.UNARY_STREAM,
        "ValidateJWTSVID": Cardinality.UNARY_UNARY,
    },
    "spire.api.agent.delegatedidentity.v1.DelegatedIdentity": {
        "SubscribeToX509SVIDs": Cardinality.UNARY_STREAM,
        "SubscribeToX509Bundles": Cardinality.UNARY_STREAM,
        "FetchJWTSVIDs": Cardinality.UNARY_UNARY,
        "SubscribeToJWTBundles": Cardinality.UNARY_STREAM,
    },
    "spire.api.server.entry.v1.Entry": dict.fromkeys(
        [
            "CountEntries",
            "ListEntries",
            "GetEntry",
            "BatchCreateEntry",
            "BatchUpdateEntry",
            "BatchDeleteEntry",
        ],
        Cardinality.UNARY_UNARY,
    ),
    "envoy.service.secret.v3.SecretDiscoveryService": {
        "StreamSecrets": Cardinality.STREAM_STREAM,
        "FetchSecrets": Cardinality.UNARY_UNARY,
        "DeltaSecrets": Cardinality.STREAM_STREAM,
    },
}


@pytest.mark.parametrize(
    ("service", "base", "file_descriptor"),
    [
        ("SpiffeWorkloadAPI", workload_grpc.SpiffeWorkloadAPIBase, workload_pb2.DESCRIPTOR),
        (
            "spire.api.agent.delegatedidentity.v1.DelegatedIdentity",
            delegatedidentity_grpc.DelegatedIdentityBase,
            delegatedidentity_pb2.DESCRIPTOR,
        ),
        ("spire.api.server.entry.v1.Entry", entry_grpc.EntryBase, entry_pb2.DESCRIPTOR),
        (
            "envoy.service.secret.v3.SecretDiscoveryService",
            sds_service.SecretDiscoveryServiceBase,
            sds_service.sds_pb2.DESCRIPTOR,
        ),
    ],
)
def test_service_mapping(service: str, base: type, file_descriptor: Any) -> None:
    mapping = _instance(base).__mapping__()
    expected = EXPECTED_METHODS[service]
    assert set(mapping) == {f"/{service}/{name}" for name in expected}

    svc = next(s for s in file_descriptor.services_by_name.values() if s.full_name == service)
    assert {m.name for m in svc.methods} == set(expected)
    for method in svc.methods:
        handler = mapping[f"/{service}/{method.name}"]
        assert handler.cardinality == expected[method.name]
        assert handler.cardinality == _cardinality(method.client_streaming, method.server_streaming)
        assert handler.request_type.DESCRIPTOR.full_name == method.input_type.full_name
        assert handler.reply_type.DESCRIPTOR.full_name == method.output_type.full_name


# --- py-spiffe's copy of workload.proto ----------------------------------------------


def _sample(field: FieldDescriptor, i: int) -> Any:
    if field.type == T.TYPE_BYTES:
        return f"{field.name}-{i}".encode() + bytes([0, 255, i])
    if field.type == T.TYPE_STRING:
        return f"{field.name}-{i}-é"
    raise AssertionError(f"no sample for {field.full_name}")


def _fill(msg: Message) -> Message:
    """Sets every field (two items in repeated and map fields)."""
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        mtype = field.message_type
        if mtype is not None and mtype.GetOptions().map_entry:
            for i in range(2):
                value[f"spiffe://td{i}.example"] = _sample(mtype.fields_by_name["value"], i)
        elif mtype is not None and mtype.full_name == "google.protobuf.Struct":
            value.update({"sub": "spiffe://td.example/w", "aud": ["a", "b"], "exp": 1763800300})
        elif mtype is not None:
            for item in [value.add(), value.add()] if field.is_repeated else [value]:
                _fill(item)
        elif field.is_repeated:
            value.extend([_sample(field, 0), _sample(field, 1)])
        else:
            setattr(msg, field.name, _sample(field, 0))
    return msg


WORKLOAD_MESSAGES = sorted(spiffe_workload_pb2.DESCRIPTOR.message_types_by_name)


def test_workload_descriptors_match_py_spiffe() -> None:
    theirs, ours = spiffe_workload_pb2.DESCRIPTOR, workload_pb2.DESCRIPTOR
    assert set(ours.message_types_by_name) == set(theirs.message_types_by_name)
    for name, their_msg in theirs.message_types_by_name.items():
        our_msg = ours.message_types_by_name[name]
        assert _field_facts(our_msg) == _field_facts(their_msg), name
        for nested_name, nested in their_msg.nested_types_by_name.items():
            assert _field_facts(our_msg.nested_types_by_name[nested_name]) == _field_facts(nested)
    their_svc = theirs.services_by_name["SpiffeWorkloadAPI"]
    our_svc = ours.services_by_name["SpiffeWorkloadAPI"]
    assert our_svc.full_name == their_svc.full_name == "SpiffeWorkloadAPI"

    def method_facts(svc: Any) -> list[tuple[Any, ...]]:
        return [
            (m.name, m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in svc.methods
        ]

    assert method_facts(our_svc) == method_facts(their_svc)


@pytest.mark.parametrize("name", WORKLOAD_MESSAGES)
def test_workload_wire_compatible_with_py_spiffe(name: str) -> None:
    theirs_cls, ours_cls = getattr(spiffe_workload_pb2, name), getattr(workload_pb2, name)

    theirs = _fill(theirs_cls())
    wire = theirs.SerializeToString(deterministic=True)
    ours = ours_cls.FromString(wire)
    assert json_format.MessageToDict(ours) == json_format.MessageToDict(theirs)
    assert ours.SerializeToString(deterministic=True) == wire

    ours = _fill(ours_cls())
    wire = ours.SerializeToString(deterministic=True)
    back = theirs_cls.FromString(wire)
    assert json_format.MessageToDict(back) == json_format.MessageToDict(ours)
    assert back.SerializeToString(deterministic=True) == wire


@pytest.mark.parametrize(
    "order",
    [
        ["workload_api._gen.workload_pb2", "spiffe._proto.workload_pb2"],
        ["spiffe._proto.workload_pb2", "workload_api._gen.workload_pb2"],
    ],
)
def test_workload_pb2_coexists_with_py_spiffe(order: list[str]) -> None:
    # workload.proto has no package: both copies define top-level X509SVIDRequest & co.
    # Ours lives in a private descriptor pool, so neither import order may clash.
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_validate_response_claims_struct() -> None:
    resp = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://td.example/w")
    resp.claims.update({"sub": "spiffe://td.example/w", "aud": ["x"], "exp": 1763800300})
    wire = resp.SerializeToString(deterministic=True)
    theirs = spiffe_workload_pb2.ValidateJWTSVIDResponse.FromString(wire)
    assert json_format.MessageToDict(theirs.claims) == {
        "sub": "spiffe://td.example/w",
        "aud": ["x"],
        "exp": 1763800300,
    }


# --- over a socket: py-spiffe's grpcio stub -> our grpclib service; SDS stub ---------


class _WorkloadAPI(workload_grpc.SpiffeWorkloadAPIBase):
    async def FetchX509SVID(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        svid = workload_pb2.X509SVID(spiffe_id="spiffe://td.example/w", x509_svid=b"\x30\x82", hint="h")
        await stream.send_message(workload_pb2.X509SVIDResponse(svids=[svid]))

    async def FetchX509Bundles(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        bundles = {"spiffe://td.example": b"\x30\x82\x01", "spiffe://other.example": b"\x30"}
        for _ in range(2):
            await stream.send_message(workload_pb2.X509BundlesResponse(bundles=bundles))

    async def FetchJWTSVID(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        svids = [workload_pb2.JWTSVID(spiffe_id=request.spiffe_id, svid=".".join(request.audience))]
        await stream.send_message(workload_pb2.JWTSVIDResponse(svids=svids))

    async def FetchJWTBundles(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    async def ValidateJWTSVID(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        resp = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://td.example/w")
        resp.claims.update({"aud": [request.audience], "n": 1})
        await stream.send_message(resp)


async def test_py_spiffe_stub_against_grpclib_service(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    server = Server([_WorkloadAPI()])
    await server.start(path=path)

    def client() -> tuple[Any, ...]:
        md = [("workload.spiffe.io", "true")]
        with grpc.insecure_channel(f"unix://{path}") as channel:
            stub = spiffe_workload_grpc.SpiffeWorkloadAPIStub(channel)
            pb = spiffe_workload_pb2
            x509 = list(stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=md))
            bundles = list(stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=md))
            jwt = stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["a", "b"], spiffe_id="s"), metadata=md)
            valid = stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="a", svid="t"), metadata=md)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=md))
            return x509, bundles, jwt, valid, err.value.code()

    try:
        x509, bundles, jwt, valid, code = await asyncio.to_thread(client)
    finally:
        server.close()
        await server.wait_closed()

    assert [s.spiffe_id for s in x509[0].svids] == ["spiffe://td.example/w"]
    assert x509[0].svids[0].hint == "h"
    assert len(bundles) == 2
    assert dict(bundles[1].bundles)["spiffe://td.example"] == b"\x30\x82\x01"
    assert [(s.spiffe_id, s.svid) for s in jwt.svids] == [("s", "a.b")]
    assert json_format.MessageToDict(valid.claims) == {"aud": ["a"], "n": 1}
    assert code == grpc.StatusCode.UNIMPLEMENTED


class _SDS(sds_service.SecretDiscoveryServiceBase):
    async def StreamSecrets(self, stream: Stream[Any, Any]) -> None:
        async for request in stream:
            await stream.send_message(
                sds_service.DiscoveryResponse(version_info="1", nonce=f"n-{','.join(request.resource_names)}")
            )

    async def FetchSecrets(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(sds_service.DiscoveryResponse(version_info="7", type_url=request.type_url))


async def test_sds_mapping_over_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "sds.sock")
    server = Server([_SDS()])
    await server.start(path=path)
    channel = Channel(path=path)
    try:
        stub = sds_service.SecretDiscoveryServiceStub(channel)
        type_url = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

        reply = await stub.FetchSecrets(sds_service.DiscoveryRequest(type_url=type_url))
        assert (reply.version_info, reply.type_url) == ("7", type_url)

        async with stub.StreamSecrets.open() as stream:
            await stream.send_message(sds_service.DiscoveryRequest(resource_names=["default"]))
            first = await stream.recv_message()
            await stream.send_message(sds_service.DiscoveryRequest(resource_names=["ROOTCA"]), end=True)
            second = await stream.recv_message()
        assert first is not None and first.nonce == "n-default"
        assert second is not None and second.nonce == "n-ROOTCA"

        with pytest.raises(GRPCError) as err:
            async with stub.DeltaSecrets.open() as stream:
                await stream.send_message(sds_service.DeltaDiscoveryRequest(), end=True)
                await stream.recv_message()
        assert err.value.status == Status.UNIMPLEMENTED
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
