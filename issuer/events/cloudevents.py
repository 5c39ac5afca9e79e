"""CloudEvents 1.0 envelope for outbox events, and its two Kafka encodings.

Structured mode (the default) puts the whole event as JSON in the record value with
`content-type: application/cloudevents+json; charset=UTF-8`; binary mode puts the
attributes in `ce_*` headers and only `data` in the value (CloudEvents Kafka binding).

The `id` is a UUIDv5 of the source and the outbox sequence, so a row re-sent after a
broker error carries the same id and consumers can deduplicate on `source` + `id`.
Serialisation is canonical (sorted keys, no spaces) so a re-sent row is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from issuer.events.model import OutboxRow, StoredEvent

SPECVERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"
DATA_CONTENT_TYPE = "application/json"
# Fixed namespace: ids must stay stable across releases, so never change this value.
ID_NAMESPACE = uuid.UUID("5b0c2d8e-6f1a-5d4e-9a53-6d657368696f")

Mode = Literal["structured", "binary"]
Headers = list[tuple[str, bytes]]

_ATTRS = ("specversion", "id", "source", "type", "subject", "time", "partitionkey", "datacontenttype")


class CloudEventError(ValueError):
    """A Kafka record or JSON document is not a CloudEvent this code can read."""


def server_source(trust_domain: str, server_id: str) -> str:
    return f"meshid://{trust_domain}/server/{server_id}"


def event_id(source: str, seq: int) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{source}#{seq}"))


def rfc3339(ts: float) -> str:
    """UTC with microseconds and a `Z`, e.g. 2025-01-02T03:04:05.123456Z."""
    # isoformat is several times faster than strftime; the format is the same.
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_rfc3339(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()
    except (ValueError, AttributeError) as exc:
        raise CloudEventError(f"not an RFC 3339 time: {text!r}") from exc


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class CloudEvent:
    id: str
    source: str
    type: str
    subject: str
    time: str  # RFC 3339, when the act happened
    partitionkey: str
    data: dict[str, Any] = field(default_factory=dict)
    datacontenttype: str = DATA_CONTENT_TYPE
    specversion: str = SPECVERSION

    @property
    def timestamp(self) -> float:
        return parse_rfc3339(self.time)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {a: getattr(self, a) for a in _ATTRS}
        out["data"] = self.data
        return out

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Any) -> CloudEvent:
        if not isinstance(doc, dict):
            raise CloudEventError("a CloudEvent must be a JSON object")
        if doc.get("specversion") != SPECVERSION:
            raise CloudEventError(f"unsupported specversion {doc.get('specversion')!r}")
        missing = [a for a in ("id", "source", "type") if not isinstance(doc.get(a), str) or not doc[a]]
        if missing:
            raise CloudEventError(f"CloudEvent lacks {', '.join(missing)}")
        data = doc.get("data", {})
        if not isinstance(data, dict):
            raise CloudEventError("CloudEvent data must be a JSON object")
        return cls(
            id=doc["id"],
            source=doc["source"],
            type=doc["type"],
            subject=str(doc.get("subject", "")),
            time=str(doc.get("time", "")),
            partitionkey=str(doc.get("partitionkey", "")),
            data=data,
            datacontenttype=str(doc.get("datacontenttype", DATA_CONTENT_TYPE)),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> CloudEvent:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: arrays nested past the interpreter's limit (one 1 MB record).
            raise CloudEventError(f"not JSON: {exc}") from None
        return cls.from_dict(doc)


def from_outbox(row: OutboxRow, source: str) -> CloudEvent:
    ev = row.event
    return CloudEvent(
        id=event_id(source, row.seq),
        source=source,
        type=ev.type,
        subject=ev.subject,
        time=rfc3339(ev.time),
        partitionkey=ev.partition_key,
        data=ev.data,
    )


def to_kafka(ce: CloudEvent, mode: Mode = "structured") -> tuple[bytes, bytes, Headers]:
    """(record key, record value, headers) for one event."""
    key = ce.partitionkey.encode()
    if mode == "structured":
        return key, ce.to_json(), [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
    if mode != "binary":
        raise ValueError(f"unknown CloudEvents mode {mode!r}")
    headers: Headers = [("content-type", ce.datacontenttype.encode())]
    for attr in _ATTRS:
        if attr == "datacontenttype":
            continue  # carried by content-type in binary mode
        value = getattr(ce, attr)
        if value:
            headers.append((f"ce_{attr}", value.encode()))
    return key, canonical_json(ce.data), headers


class StoredEncoder:
    """The relay's encoder: `encode(row)` equals `to_kafka(from_outbox(row.decode(), source),
    mode)` but splices the stored data JSON in instead of decoding and re-encoding it,
    which is most of the relay's CPU per event. SQLite stores data canonically (sorted
    keys, no spaces), so the bytes match too unless data has non-ASCII text (escaped in
    store, equal once parsed); PostgreSQL's JSONB text is valid JSON in its own order."""

    def __init__(self, source: str, mode: Mode = "structured") -> None:
        if mode not in ("structured", "binary"):
            raise ValueError(f"unknown CloudEvents mode {mode!r}")
        self.source = source
        self.mode = mode
        # uuid5(ID_NAMESPACE, f"{source}#{seq}") is SHA-1 over this prefix plus the seq.
        self._id_prefix = hashlib.sha1(ID_NAMESPACE.bytes + f"{source}#".encode(), usedforsecurity=False)
        self._source_json = _json_str(source)
        self._source_bytes = source.encode()
        self._time: tuple[float, str] = (float("nan"), "")  # a signing batch shares one time
        self._type_json: dict[str, str] = {}  # a handful of event types

    def event_id(self, seq: int) -> str:
        h = self._id_prefix.copy()
        h.update(b"%d" % seq)
        x = h.hexdigest()  # the UUID is the first 16 bytes, with version 5 and the RFC 4122 variant
        return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"

    def _rfc3339(self, ts: float) -> str:
        if self._time[0] != ts:
            self._time = (ts, rfc3339(ts))
        return self._time[1]

    def encode(self, row: StoredEvent) -> tuple[bytes, bytes, Headers]:
        """(record key, record value, headers) for one stored event."""
        seq, type_, subject, partition_key, ts, data_json = row
        eid = self.event_id(seq)
        time = self._rfc3339(ts)
        if self.mode == "structured":
            # canonical_json's key order: data, datacontenttype, id, partitionkey, source,
            # specversion, subject, time, type. The subject is usually the key.
            type_json = self._type_json.get(type_)
            if type_json is None:
                type_json = self._type_json[type_] = _json_str(type_)
            key = _json_str(partition_key)
            subject_json = key if subject == partition_key else _json_str(subject)
            value = (f'{{"data":{data_json},"datacontenttype":"{DATA_CONTENT_TYPE}","id":"{eid}",'
                     f'"partitionkey":{key},"source":{self._source_json},'
                     f'"specversion":"{SPECVERSION}","subject":{subject_json},"time":"{time}",'
                     f'"type":{type_json}}}').encode()
            return partition_key.encode(), value, [("content-type", _STRUCTURED_CT)]
        headers: Headers = [("content-type", _DATA_CT), ("ce_specversion", _SPECVERSION_B),
                            ("ce_id", eid.encode()), ("ce_source", self._source_bytes)]
        for name, val in (("ce_type", type_), ("ce_subject", subject), ("ce_time", time),
                          ("ce_partitionkey", partition_key)):
            if val:
                headers.append((name, val.encode()))
        return partition_key.encode(), data_json.encode(), headers


# json's own string encoder as canonical_json uses it (ensure_ascii=False).
_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]
_STRUCTURED_CT = STRUCTURED_CONTENT_TYPE.encode()
_DATA_CT = DATA_CONTENT_TYPE.encode()
_SPECVERSION_B = SPECVERSION.encode()
# The UUID variant nibble (10xx) from the digest's nibble at that place.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def from_kafka(value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> CloudEvent:
    """Decode a record in either mode (chosen by its headers, as the binding says)."""
    hdr = {k.lower(): v for k, v in headers}
    if "ce_specversion" not in hdr:
        if value is None:
            raise CloudEventError("empty record")
        return CloudEvent.from_json(value)
    doc: dict[str, Any] = {}
    for name, raw in hdr.items():
        if name.startswith("ce_") or name == "content-type":
            if raw is None:  # Kafka allows a null header value; the binding has none
                raise CloudEventError(f"header {name} has no value")
            doc["datacontenttype" if name == "content-type" else name[3:]] = raw.decode(errors="replace")
    try:
        doc["data"] = json.loads(value) if value else {}
    except (ValueError, RecursionError) as exc:
        raise CloudEventError(f"binary-mode data is not JSON: {exc}") from None
    return CloudEvent.from_dict(doc)
