"""Builders for every event meshid records, shaped as OCSF (see SPEC-EVENTS.md).

Each builder is pure: it takes the facts of the act and the time it happened and returns
an `Event` for the outbox. The caller writes it in the same datastore transaction as the
act. `data` carries the OCSF base fields, an OCSF `certificate` object for X509
issuance, and meshid's own fields under `unmapped`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from issuer.events.cloudevents import rfc3339
from issuer.events.model import Event
from meshid import __version__
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId

OCSF_SCHEMA_VERSION = "1.3.0"

# --- event types (CloudEvents `type`) ------------------------------------------------
X509_ISSUED = "io.meshid.svid.x509.issued"
JWT_ISSUED = "io.meshid.svid.jwt.issued"
SVID_REFUSED = "io.meshid.svid.refused"
NODE_ATTESTED = "io.meshid.node.attested"
NODE_ATTESTATION_FAILED = "io.meshid.node.attestation_failed"
WORKLOAD_ATTESTATION_FAILED = "io.meshid.workload.attestation_failed"
ENTRY_CREATED = "io.meshid.entry.created"
ENTRY_UPDATED = "io.meshid.entry.updated"
ENTRY_DELETED = "io.meshid.entry.deleted"
AGENT_EVICTED = "io.meshid.agent.evicted"
AGENT_BANNED = "io.meshid.agent.banned"
CA_PREPARED = "io.meshid.ca.prepared"
CA_ACTIVATED = "io.meshid.ca.activated"
CA_TAINTED = "io.meshid.ca.tainted"
CA_REVOKED = "io.meshid.ca.revoked"

ISSUED_TYPES = frozenset({X509_ISSUED, JWT_ISSUED})
ROTATION_REASONS = frozenset({"initial", "scheduled", "forced", "tainted", "expired", "entry_changed"})

# --- OCSF enumerations used here ------------------------------------------------------
CATEGORY_IAM = 3
AUTHENTICATION = 3002
ENTITY_MANAGEMENT = 3004
_CLASS_NAMES = {AUTHENTICATION: "Authentication", ENTITY_MANAGEMENT: "Entity Management"}

AUTH_LOGON = 1
AUTH_SERVICE_TICKET = 4  # "issue" in SPEC-EVENTS
AUTH_SERVICE_TICKET_RENEW = 5  # "renew"
_AUTH_ACTIVITIES = {AUTH_LOGON: "Logon", AUTH_SERVICE_TICKET: "Service Ticket Request",
                    AUTH_SERVICE_TICKET_RENEW: "Service Ticket Renew"}

ENTITY_CREATE, ENTITY_UPDATE, ENTITY_DELETE = 1, 3, 4
ENTITY_DISABLE, ENTITY_ACTIVATE, ENTITY_OTHER = 9, 10, 99
_ENTITY_ACTIVITIES = {ENTITY_CREATE: "Create", ENTITY_UPDATE: "Update", ENTITY_DELETE: "Delete",
                      ENTITY_DISABLE: "Disable", ENTITY_ACTIVATE: "Activate", ENTITY_OTHER: "Other"}

STATUS_SUCCESS, STATUS_FAILURE = 1, 2
_FINGERPRINT_SHA256 = 3  # OCSF fingerprint.algorithm_id
_AUTH_PROTOCOL_OTHER = 99


class Severity(IntEnum):
    INFORMATIONAL = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5


IdLike = SpiffeId | str
SelectorsLike = Iterable[Selector | str]


# --- shared pieces ----------------------------------------------------------------------


def _ms(ts: float) -> int:
    return round(ts * 1000)


def _selectors(selectors: SelectorsLike) -> list[str]:
    return sorted(str(s) for s in selectors)


def _trust_domain(spiffe_id: IdLike) -> str:
    if isinstance(spiffe_id, SpiffeId):
        return spiffe_id.trust_domain.name
    # Callers pass validated IDs; slicing is cheaper than parsing on the issuance path.
    prefix, _, rest = spiffe_id.partition("://")
    return rest.split("/", 1)[0] if prefix == "spiffe" else ""


_UID_BATCH = 256
_uid_pool: list[str] = []
# A forked child must not hand out the parent's remaining ids.
os.register_at_fork(after_in_child=_uid_pool.clear)


def _event_uid() -> str:
    """A random (version 4) UUID string. Drawn 256 at a time: one getrandom() per event
    cost ~20 µs on a virtual machine, beside a ~150 µs issuance. list.pop() is atomic
    under the GIL, so two threads never get the same id."""
    while True:
        try:
            return _uid_pool.pop()
        except IndexError:
            raw = os.urandom(16 * _UID_BATCH)
            _uid_pool.extend(str(uuid.UUID(bytes=raw[i:i + 16], version=4))
                             for i in range(0, len(raw), 16))


_PRODUCT = {"name": "meshid", "vendor_name": "meshid", "version": __version__}


@functools.lru_cache(maxsize=128)
def _base_constants(class_uid: int, activity_id: int, severity: Severity, status_id: int) -> dict[str, Any]:
    """The fields of _base that follow from its enumerations (built once per combination)."""
    names = _AUTH_ACTIVITIES if class_uid == AUTHENTICATION else _ENTITY_ACTIVITIES
    activity_name = names.get(activity_id, "Other")
    return {
        "class_uid": class_uid,
        "class_name": _CLASS_NAMES[class_uid],
        "category_uid": CATEGORY_IAM,
        "category_name": "Identity & Access Management",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{_CLASS_NAMES[class_uid]}: {activity_name}",
        "severity_id": int(severity),
        "severity": severity.name.title(),
        "status_id": status_id,
        "status": "Success" if status_id == STATUS_SUCCESS else "Failure",
    }


def _base(class_uid: int, activity_id: int, *, now: float, severity: Severity, status_id: int,
          message: str, status_detail: str = "") -> dict[str, Any]:
    data = dict(_base_constants(class_uid, activity_id, severity, status_id))
    data["time"] = _ms(now)
    data["message"] = message
    data["metadata"] = {
        "product": dict(_PRODUCT),
        "version": OCSF_SCHEMA_VERSION,
        # Fixed when the act happens (stored in the outbox), so re-sends keep it.
        "uid": _event_uid(),
    }
    if status_detail:
        data["status_detail"] = status_detail
    return data


def _unmapped(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _workload_user(spiffe_id: str) -> dict[str, Any]:
    return {"uid": spiffe_id, "name": spiffe_id, "type_id": 99, "type": "Workload"}


def _node_user(agent_id: str) -> dict[str, Any]:
    return {"uid": agent_id, "name": agent_id, "type_id": 99, "type": "Node"}


def _actor(actor: str) -> dict[str, Any] | None:
    return {"user": {"name": actor, "uid": actor}} if actor else None


def _event(type_: str, subject: str, key: str, now: float, data: dict[str, Any]) -> Event:
    return Event(type=type_, subject=subject, partition_key=key or subject, time=now, data=data)


@functools.lru_cache(maxsize=256)
def _name_string(name: x509.Name) -> str:
    # Leaves of one CA share the issuer name: format it once, not per issuance.
    return name.rfc4514_string()


@dataclass(frozen=True, slots=True)
class LeafFacts:
    """What the CA knows of a leaf it just signed (empty subject, SANs from the entry):
    enough for the OCSF certificate object without parsing the certificate back, which
    would cost as much as signing it."""

    der: bytes
    serial: int
    not_before: float
    not_after: float
    issuer: str  # RFC 4514
    spiffe_id: str
    dns_names: tuple[str, ...] = ()


# Validity bounds repeat across a batch (one `now`, one TTL): format each once.
_rfc3339_bound = functools.lru_cache(maxsize=256)(rfc3339)


def _leaf_certificate_object(leaf: LeafFacts) -> dict[str, Any]:
    fingerprint = hashlib.sha256(leaf.der).hexdigest()
    sans = [{"name": leaf.spiffe_id, "type": "URI"}]
    sans += [{"name": d, "type": "DNS"} for d in leaf.dns_names]
    return {
        "version": "3",
        "serial_number": format(leaf.serial, "x"),
        "issuer": leaf.issuer,
        "subject": "",
        "created_time": _ms(leaf.not_before),
        "expiration_time": _ms(leaf.not_after),
        "fingerprints": [{"algorithm": "SHA-256", "algorithm_id": _FINGERPRINT_SHA256, "value": fingerprint}],
        "sans": sans,
        "uid": fingerprint,
    }


def certificate_object(
    cert: x509.Certificate | bytes | LeafFacts, der: bytes | None = None
) -> dict[str, Any]:
    """The OCSF `certificate` object for an X.509 certificate (object, DER or LeafFacts;
    pass `der` too when the caller already has it, to skip re-encoding)."""
    if isinstance(cert, LeafFacts):
        return _leaf_certificate_object(cert)
    if isinstance(cert, bytes):
        der = cert
        cert = x509.load_der_x509_certificate(cert)
    if der is None:
        der = cert.public_bytes(Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest()
    sans: list[dict[str, str]] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += [{"name": u, "type": "URI"} for u in ext.get_values_for_type(x509.UniformResourceIdentifier)]
        sans += [{"name": d, "type": "DNS"} for d in ext.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    return {
        "version": str(cert.version.value + 1),
        "serial_number": format(cert.serial_number, "x"),
        "issuer": _name_string(cert.issuer),
        "subject": _name_string(cert.subject),
        "created_time": _ms(cert.not_valid_before_utc.timestamp()),
        "expiration_time": _ms(cert.not_valid_after_utc.timestamp()),
        "fingerprints": [{"algorithm": "SHA-256", "algorithm_id": _FINGERPRINT_SHA256, "value": fingerprint}],
        "sans": sans,
        "uid": fingerprint,
    }


# --- SVID issuance ------------------------------------------------------------------------


def x509_issued(
    cert: x509.Certificate | bytes | LeafFacts,
    spiffe_id: IdLike,
    entry_id: str,
    entry_revision: int,
    parent_id: IdLike,
    agent_id: IdLike,
    selectors: SelectorsLike,
    ca_key_id: str,
    rotation_reason: str,
    scheduled_rotation_at: float | None,
    now: float,
    renew: bool,
    *,
    node_id: str = "",
    der: bytes | None = None,
) -> Event:
    """An X509-SVID was signed. `renew` picks OCSF activity 5 (renew) over 4 (issue)."""
    if rotation_reason not in ROTATION_REASONS:
        raise ValueError(f"unknown rotation_reason {rotation_reason!r}")
    sid = str(spiffe_id)
    cert_obj = certificate_object(cert, der)
    activity = AUTH_SERVICE_TICKET_RENEW if renew else AUTH_SERVICE_TICKET
    data = _base(AUTHENTICATION, activity, now=now, severity=Severity.INFORMATIONAL,
                 status_id=STATUS_SUCCESS, message=f"X509-SVID {'renewed' if renew else 'issued'} for {sid}")
    data["auth_protocol_id"] = _AUTH_PROTOCOL_OTHER
    data["auth_protocol"] = "SPIFFE X509-SVID"
    data["user"] = _workload_user(sid)
    data["certificate"] = cert_obj
    data["unmapped"] = _unmapped(
        spiffe_id=sid,
        trust_domain=_trust_domain(spiffe_id),
        entry_id=entry_id,
        entry_revision=entry_revision,
        parent_id=str(parent_id),
        agent_id=str(agent_id),
        node_id=node_id or None,
        selectors=_selectors(selectors),
        ca_key_id=ca_key_id,
        serial_number=cert_obj["serial_number"],
        not_before=_rfc3339_bound(cert_obj["created_time"] / 1000),
        not_after=_rfc3339_bound(cert_obj["expiration_time"] / 1000),
        rotation_reason=rotation_reason,
        scheduled_rotation_at=None if scheduled_rotation_at is None else rfc3339(scheduled_rotation_at),
    )
    return _event(X509_ISSUED, sid, sid, now, data)


def jwt_issued(
    spiffe_id: IdLike,
    audience: Iterable[str],
    entry_id: str,
    entry_revision: int,
    parent_id: IdLike,
    agent_id: IdLike,
    selectors: SelectorsLike,
    key_id: str,
    issued_at: float,
    expires_at: float,
    now: float,
    *,
    node_id: str = "",
) -> Event:
    """A JWT-SVID was signed; `key_id` is the JWT signing key (`kid`)."""
    sid = str(spiffe_id)
    data = _base(AUTHENTICATION, AUTH_SERVICE_TICKET, now=now, severity=Severity.INFORMATIONAL,
                 status_id=STATUS_SUCCESS, message=f"JWT-SVID issued for {sid}")
    data["auth_protocol_id"] = _AUTH_PROTOCOL_OTHER
    data["auth_protocol"] = "SPIFFE JWT-SVID"
    data["user"] = _workload_user(sid)
    data["unmapped"] = _unmapped(
        spiffe_id=sid,
        trust_domain=_trust_domain(spiffe_id),
        entry_id=entry_id,
        entry_revision=entry_revision,
        parent_id=str(parent_id),
        agent_id=str(agent_id),
        node_id=node_id or None,
        selectors=_selectors(selectors),
        ca_key_id=key_id,
        audience=sorted(audience),
        not_before=rfc3339(issued_at),
        not_after=rfc3339(expires_at),
    )
    return _event(JWT_ISSUED, sid, sid, now, data)


# Refusal reasons whose volume is expected under load; the rest point at misuse.
_BENIGN_REFUSALS = frozenset({"overloaded", "rate_limited"})


def svid_refused(
    reason: str,
    agent_id: IdLike,
    now: float,
    *,
    spiffe_id: IdLike | None = None,
    kind: str = "x509",
    entry_id: str = "",
    detail: str = "",
    count: int = 1,
) -> Event:
    """A signing request was refused. `reason` is a short code (`not_authorized`,
    `bad_csr`, `overloaded`, `rate_limited`, ...); `detail` is for humans; `count` > 1
    when several refusals are reported as one (overload, which is rate-limited)."""
    aid = str(agent_id)
    sid = str(spiffe_id) if spiffe_id is not None else ""
    severity = Severity.LOW if reason in _BENIGN_REFUSALS else Severity.MEDIUM
    data = _base(AUTHENTICATION, AUTH_SERVICE_TICKET, now=now, severity=severity, status_id=STATUS_FAILURE,
                 message=f"{kind} SVID refused for {sid or aid}: {reason}", status_detail=reason)
    data["user"] = _workload_user(sid) if sid else _node_user(aid)
    data["unmapped"] = _unmapped(
        spiffe_id=sid or None,
        trust_domain=_trust_domain(spiffe_id or agent_id),
        agent_id=aid,
        entry_id=entry_id or None,
        svid_kind=kind,
        reason=reason,
        detail=detail or None,
        count=count if count != 1 else None,
    )
    return _event(SVID_REFUSED, sid or aid, sid or aid, now, data)


# --- attestation ----------------------------------------------------------------------------


def node_attested(
    agent_id: IdLike,
    attestor: str,
    selectors: SelectorsLike,
    now: float,
    *,
    cert: x509.Certificate | bytes | None = None,
    node_id: str = "",
    src_ip: str = "",
    reattest: bool = False,
) -> Event:
    """A node attested; `cert` is the agent SVID signed for it, when there is one."""
    aid = str(agent_id)
    data = _base(AUTHENTICATION, AUTH_LOGON, now=now, severity=Severity.INFORMATIONAL,
                 status_id=STATUS_SUCCESS, message=f"node attested as {aid} ({attestor})")
    data["user"] = _node_user(aid)
    data["auth_protocol_id"] = _AUTH_PROTOCOL_OTHER
    data["auth_protocol"] = attestor
    if src_ip:
        data["src_endpoint"] = {"ip": src_ip}
    unmapped = _unmapped(
        agent_id=aid,
        trust_domain=_trust_domain(agent_id),
        attestor=attestor,
        node_id=node_id or None,
        selectors=_selectors(selectors),
        reattest=reattest,
    )
    if cert is not None:
        data["certificate"] = cert_obj = certificate_object(cert)
        unmapped["not_before"] = rfc3339(cert_obj["created_time"] / 1000)
        unmapped["not_after"] = rfc3339(cert_obj["expiration_time"] / 1000)
        unmapped["serial_number"] = cert_obj["serial_number"]
    data["unmapped"] = unmapped
    return _event(NODE_ATTESTED, aid, aid, now, data)


def node_attestation_failed(
    attestor: str,
    reason: str,
    now: float,
    *,
    agent_id: IdLike | None = None,
    trust_domain: str = "",
    node_id: str = "",
    src_ip: str = "",
) -> Event:
    """Node attestation was refused. The agent ID is often unknown at that point; the
    record key is then the attestor and source address, so one source stays ordered."""
    aid = str(agent_id) if agent_id is not None else ""
    key = aid or f"node-attestation:{attestor}:{src_ip or 'unknown'}"
    data = _base(AUTHENTICATION, AUTH_LOGON, now=now, severity=Severity.MEDIUM, status_id=STATUS_FAILURE,
                 message=f"node attestation failed ({attestor}): {reason}", status_detail=reason)
    if aid:
        data["user"] = _node_user(aid)
    data["auth_protocol_id"] = _AUTH_PROTOCOL_OTHER
    data["auth_protocol"] = attestor
    if src_ip:
        data["src_endpoint"] = {"ip": src_ip}
    data["unmapped"] = _unmapped(
        agent_id=aid or None,
        trust_domain=trust_domain or (_trust_domain(agent_id) if agent_id is not None else None),
        attestor=attestor,
        node_id=node_id or None,
        src_ip=src_ip or None,
        reason=reason,
    )
    return _event(NODE_ATTESTATION_FAILED, aid or key, key, now, data)


def workload_attestation_failed(
    agent_id: IdLike,
    reason: str,
    count: int,
    first_at: float,
    last_at: float,
    now: float,
    *,
    caller_pid: int | None = None,
    caller_uid: int | None = None,
    caller_gid: int | None = None,
    suppressed: int = 0,
    node_id: str = "",
) -> Event:
    """An agent refused Workload API callers. Agents report failures in aggregate (see
    workload_failures.py): `count` failures with this reason and caller uid between
    `first_at` and `last_at`; `suppressed` counts folded in from over-limit groups."""
    aid = str(agent_id)
    severity = Severity.MEDIUM if count >= 10 else Severity.LOW
    data = _base(AUTHENTICATION, AUTH_LOGON, now=now, severity=severity, status_id=STATUS_FAILURE,
                 message=f"{count} Workload API caller(s) refused on {aid}: {reason}", status_detail=reason)
    data["count"] = count
    data["start_time"] = _ms(first_at)
    data["end_time"] = _ms(last_at)
    data["src_endpoint"] = {"uid": aid}
    data["unmapped"] = _unmapped(
        agent_id=aid,
        trust_domain=_trust_domain(agent_id),
        node_id=node_id or None,
        reason=reason,
        count=count,
        suppressed=suppressed or None,
        caller_pid=caller_pid,
        caller_uid=caller_uid,
        caller_gid=caller_gid,
    )
    return _event(WORKLOAD_ATTESTATION_FAILED, aid, aid, now, data)


# --- registration entries and agents -------------------------------------------------------


def _entry_entity(entry: Entry) -> dict[str, Any]:
    return {"uid": entry.id, "name": str(entry.spiffe_id), "type": "Registration Entry",
            "version": str(entry.revision_number), "data": entry.to_json()}


def _entry_event(type_: str, activity: int, verb: str, entry: Entry, now: float, actor: str,
                 previous: Entry | None = None) -> Event:
    sid = str(entry.spiffe_id)
    data = _base(ENTITY_MANAGEMENT, activity, now=now, severity=Severity.INFORMATIONAL,
                 status_id=STATUS_SUCCESS, message=f"registration entry {entry.id} {verb} for {sid}")
    if previous is not None:
        data["entity"] = _entry_entity(previous)
        data["entity_result"] = _entry_entity(entry)
    else:
        data["entity"] = _entry_entity(entry)
    if (a := _actor(actor)) is not None:
        data["actor"] = a
    data["unmapped"] = _unmapped(
        spiffe_id=sid,
        trust_domain=entry.spiffe_id.trust_domain.name,
        entry_id=entry.id,
        entry_revision=entry.revision_number,
        parent_id=str(entry.parent_id),
        selectors=_selectors(entry.selectors),
    )
    return _event(type_, sid, sid, now, data)


def entry_created(entry: Entry, now: float, *, actor: str = "") -> Event:
    return _entry_event(ENTRY_CREATED, ENTITY_CREATE, "created", entry, now, actor)


def entry_updated(entry: Entry, now: float, *, previous: Entry | None = None, actor: str = "") -> Event:
    return _entry_event(ENTRY_UPDATED, ENTITY_UPDATE, "updated", entry, now, actor, previous)


def entry_deleted(entry: Entry, now: float, *, actor: str = "") -> Event:
    return _entry_event(ENTRY_DELETED, ENTITY_DELETE, "deleted", entry, now, actor)


def _agent_event(type_: str, activity: int, verb: str, severity: Severity, agent_id: IdLike, now: float,
                 actor: str, reason: str) -> Event:
    aid = str(agent_id)
    data = _base(ENTITY_MANAGEMENT, activity, now=now, severity=severity, status_id=STATUS_SUCCESS,
                 message=f"agent {aid} {verb}")
    data["entity"] = {"uid": aid, "name": aid, "type": "Agent"}
    if (a := _actor(actor)) is not None:
        data["actor"] = a
    data["unmapped"] = _unmapped(agent_id=aid, trust_domain=_trust_domain(agent_id), reason=reason or None)
    return _event(type_, aid, aid, now, data)


def agent_evicted(agent_id: IdLike, now: float, *, actor: str = "", reason: str = "") -> Event:
    """The agent's record was deleted; it may attest again."""
    return _agent_event(AGENT_EVICTED, ENTITY_DELETE, "evicted", Severity.LOW, agent_id, now, actor, reason)


def agent_banned(agent_id: IdLike, now: float, *, actor: str = "", reason: str = "") -> Event:
    """The agent may not attest again until unbanned."""
    return _agent_event(AGENT_BANNED, ENTITY_DISABLE, "banned", Severity.MEDIUM, agent_id, now, actor, reason)


# --- CA key lifecycle ---------------------------------------------------------------------------

_CA_ACTS: Mapping[str, tuple[str, int, Severity]] = {
    "prepared": (CA_PREPARED, ENTITY_CREATE, Severity.INFORMATIONAL),
    "activated": (CA_ACTIVATED, ENTITY_ACTIVATE, Severity.INFORMATIONAL),
    "tainted": (CA_TAINTED, ENTITY_OTHER, Severity.HIGH),  # OCSF has no "taint"; 99 Other
    "revoked": (CA_REVOKED, ENTITY_DELETE, Severity.MEDIUM),  # removed from the bundle
}


def _ca_event(act: str, key_id: str, kind: str, now: float, trust_domain: str, *,
              cert: x509.Certificate | bytes | None, not_before: float | None, not_after: float | None,
              upstream: bool, server_id: str, actor: str) -> Event:
    type_, activity, severity = _CA_ACTS[act]
    data = _base(ENTITY_MANAGEMENT, activity, now=now, severity=severity, status_id=STATUS_SUCCESS,
                 message=f"{kind} CA key {key_id} {act}")
    if activity == ENTITY_OTHER:
        data["activity_name"] = act.title()
        data["type_name"] = f"Entity Management: {act.title()}"
    data["entity"] = {"uid": key_id, "name": key_id, "type": f"{kind} CA key"}
    if (a := _actor(actor)) is not None:
        data["actor"] = a
    unmapped = _unmapped(
        ca_key_id=key_id,
        ca_kind=kind,
        trust_domain=trust_domain,
        server_id=server_id or None,
        upstream_signed=upstream or None,
        not_before=None if not_before is None else rfc3339(not_before),
        not_after=None if not_after is None else rfc3339(not_after),
    )
    if cert is not None:
        data["certificate"] = cert_obj = certificate_object(cert)
        unmapped.setdefault("not_before", rfc3339(cert_obj["created_time"] / 1000))
        unmapped.setdefault("not_after", rfc3339(cert_obj["expiration_time"] / 1000))
    data["unmapped"] = unmapped
    return _event(type_, key_id, key_id, now, data)


def _ca_builder(act: str, doc: str) -> Callable[..., Event]:
    def build(key_id: str, kind: str, now: float, trust_domain: str, *,
              cert: x509.Certificate | bytes | None = None, not_before: float | None = None,
              not_after: float | None = None, upstream: bool = False, server_id: str = "",
              actor: str = "") -> Event:
        return _ca_event(act, key_id, kind, now, trust_domain, cert=cert, not_before=not_before,
                         not_after=not_after, upstream=upstream, server_id=server_id, actor=actor)

    build.__name__ = build.__qualname__ = f"ca_{act}"
    build.__doc__ = doc
    return build


# One builder per CA act; for an X509 CA `cert` is the CA certificate (upstream-signed when
# `upstream`).
ca_prepared = _ca_builder("prepared", "A new key was prepared (published in the bundle before it signs).")
ca_activated = _ca_builder("activated", "A prepared key became the active signing key.")
ca_tainted = _ca_builder("tainted", "An old key was tainted: agents re-issue what it signed.")
ca_revoked = _ca_builder("revoked", "A key was removed from the bundle.")
