"""Administrator operations over pool stores, named after the cmdlets they
mirror.

Each function checks everything it can before its first write, so a refused
operation raises :class:`~sipdrill.errors.OperationError` and leaves every
store as it was. Operations that touch two stores cannot commit both
atomically (two SQLite files); they write the target first, so a crash in
between leaves the user in two places rather than in none, and running the
same cmdlet again finishes the job.

``stores`` maps pool FQDNs to the stores the lab holds for them, including
pools that are down (``down``). The lab sees a down pool's store, which the
administrator could not: a forced move reads it to count what was lost, and
removes the user's stale account from it at once, standing in for the clean-up
a returning pool does of users no longer homed on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sipdrill.control.files import write_atomically
from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState, PoolFailoverStates
from sipdrill.pool.store import StoreCounts, UserRecord, UserStore

ExportFormat = Literal["xml", "json"]

#: Bumped when the export layout changes; imports refuse other versions.
#: 2: meetings, the header (pool, domain, seq, created, counts) and a digest.
EXPORT_VERSION = 2


# --- Move-CsUser --------------------------------------------------------------


@dataclass(frozen=True)
class MoveResult:
    """What Move-CsUser did. With ``force``, ``contacts_lost`` and
    ``conferences_lost`` count what the user had and will not get back."""

    user: str
    source_pool: str
    target_pool: str
    force: bool
    contacts_moved: int
    conferences_moved: int
    contacts_lost: int
    conferences_lost: int


def _norm(pool: str) -> str:
    return pool.lower()


def _find_home_record(
    identity: str, stores: Mapping[str, UserStore], target: str
) -> tuple[UserRecord, UserStore | None, UserStore]:
    """The user's account, the store of their home pool if the lab has one
    with the account, and the store the account was read from.

    Prefer the record a pool holds for a user it homes over a Backup Service
    replica. Two such records mean an interrupted move: the one that is not
    on the target is the move's unfinished source.
    """
    homed: list[tuple[UserRecord, UserStore]] = []
    replica: tuple[UserRecord, UserStore] | None = None
    for store in stores.values():
        rec = store.get_user(identity)
        if rec is None:
            continue
        if rec.home_pool == store.pool_fqdn:
            homed.append((rec, store))
        elif replica is None:
            replica = (rec, store)
    if homed:
        homed.sort(key=lambda pair: pair[1].pool_fqdn == target)
        rec, store = homed[0]
        return rec, store, store
    if replica is not None:
        return replica[0], None, replica[1]
    raise OperationError("unknown-user", f"no pool has an account for {identity}", 404)


def move_cs_user(
    identity: str,
    target_pool: str,
    *,
    stores: Mapping[str, UserStore],
    down: Collection[str] = (),
    force: bool = False,
) -> MoveResult:
    """Move-CsUser -Identity ``identity`` -Target ``target_pool`` [-Force].

    Without ``force`` both pools must be up, and the contact list and
    meetings go along. With ``force`` (the source pool is gone) the account
    is re-homed without them: the target starts the user with no contacts
    and no meetings, even if it held a Backup Service replica, and the
    result counts what was lost. A forced move to a down target is allowed,
    as in Lync: the account is re-homed in the directory and the pool picks
    it up when it returns.
    """
    target = _norm(target_pool)
    down_pools = {_norm(p) for p in down}
    if target not in stores:
        raise OperationError("unknown-pool", f"target pool {target} is not a pool of this lab", 404)
    record, source_store, holder = _find_home_record(identity, stores, target)
    source = record.home_pool
    target_store = stores[target]
    if source == target:
        raise OperationError("same-pool", f"{identity} is already homed on {target}", 409)
    if not force:
        for pool, role in ((target, "target"), (source, "source")):
            if pool in down_pools:
                raise OperationError(
                    "pool-down",
                    f"the {role} pool {pool} is down; only Move-CsUser -Force can move "
                    f"{identity}, and their contacts and meetings are then lost",
                    503,
                )
        if source_store is None:
            raise OperationError(
                "unknown-user",
                f"{identity}'s home pool {source} has no account for them (only a Backup "
                "Service replica exists); use Move-CsUser -Force",
                404,
            )
    for store in (target_store, source_store):
        if store is not None and store.read_only:
            raise OperationError(
                "read-only",
                f"the user store of {store.pool_fqdn} is read-only (pool failover); "
                f"fail the pool back before moving {identity}",
                409,
            )
    # Without the home pool's store, count from the Backup Service replica:
    # it may lag by up to a sync interval, as the real loss would.
    contacts = holder.contacts(identity)
    conferences = holder.conferences(identity)

    with target_store.batch():
        if target_store.get_user(identity) is not None:
            target_store.delete_user(identity)
        target_store.upsert_user(identity, home_pool=target, settings=record.settings)
        if not force:
            target_store.replace_contacts(identity, contacts)
            for conf in conferences:
                target_store.schedule_conference(
                    identity, conf.conf_id, subject=conf.subject, content=conf.content
                )
    if source_store is not None and source_store is not target_store:
        source_store.delete_user(identity)
    moved_contacts, moved_confs = (0, 0) if force else (len(contacts), len(conferences))
    lost_contacts, lost_confs = (len(contacts), len(conferences)) if force else (0, 0)
    return MoveResult(
        identity, source, target, force, moved_contacts, moved_confs, lost_contacts, lost_confs
    )


# --- Export-CsUserData / Import-CsUserData (dbimpexp) -------------------------


@dataclass(frozen=True)
class ExportedMeeting:
    conf_id: str
    subject: str
    content: bytes = b""


@dataclass(frozen=True)
class ExportedUser:
    uri: str
    home_pool: str
    settings: Mapping[str, Any]
    contacts: tuple[str, ...]
    meetings: tuple[ExportedMeeting, ...] = ()


@dataclass(frozen=True)
class ExportHeader:
    """What an export says about itself. ``seq`` is the pool's change-feed
    high-water mark the export is current to: an acknowledged write with a
    higher seq is not in it (what a restore from it loses, counted exactly)."""

    pool: str
    domain: str
    seq: int
    created: float
    users: int
    contacts: int
    meetings: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    pool: str
    users: int
    contacts: int
    meetings: int = 0
    seq: int = 0
    created: float = 0.0


@dataclass(frozen=True)
class ImportResult:
    users_restored: int
    contacts_restored: int
    #: Users of the export that were not restored, with why (not homed here...).
    skipped: tuple[str, ...] = field(default=())
    meetings_restored: int = 0
    reasons: Mapping[str, str] = field(default_factory=dict)
    export: ExportHeader | None = None


def _format_of(path: Path, fmt: ExportFormat | None) -> ExportFormat:
    if fmt is not None:
        return fmt
    return "json" if path.suffix.lower() == ".json" else "xml"


def _canonical(header: ExportHeader, users: Iterable[ExportedUser]) -> dict[str, Any]:
    return {
        "version": EXPORT_VERSION,
        "header": header.to_json(),
        "users": [
            {
                "uri": u.uri,
                "home_pool": u.home_pool,
                "settings": dict(u.settings),
                "contacts": list(u.contacts),
                "meetings": [
                    {
                        "id": m.conf_id,
                        "subject": m.subject,
                        "content": base64.b64encode(m.content).decode("ascii"),
                    }
                    for m in u.meetings
                ],
            }
            for u in users
        ],
    }


def export_digest(header: ExportHeader, users: Iterable[ExportedUser]) -> str:
    """sha256 of the export's content, whatever its format: a file that was
    cut short, edited or damaged in transit no longer matches it."""
    text = json.dumps(_canonical(header, users), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _render_xml(header: ExportHeader, users: list[ExportedUser], digest: str) -> bytes:
    attrs = {k: str(v) for k, v in header.to_json().items()}
    root = ET.Element("UserData", {"version": str(EXPORT_VERSION), **attrs, "digest": digest})
    for u in users:
        el = ET.SubElement(root, "User", {"uri": u.uri, "homePool": u.home_pool})
        ET.SubElement(el, "Settings").text = json.dumps(dict(u.settings), sort_keys=True)
        contacts = ET.SubElement(el, "Contacts")
        for c in u.contacts:
            ET.SubElement(contacts, "Contact", {"uri": c})
        meetings = ET.SubElement(el, "Meetings")
        for m in u.meetings:
            ET.SubElement(meetings, "Meeting", {"id": m.conf_id, "subject": m.subject}).text = (
                base64.b64encode(m.content).decode("ascii")
            )
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _render_json(header: ExportHeader, users: list[ExportedUser], digest: str) -> bytes:
    doc = _canonical(header, users) | {"digest": digest}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def export_cs_user_data(
    store: UserStore,
    path: str | Path,
    *,
    fmt: ExportFormat | None = None,
    domain: str = "",
    created: float | None = None,
) -> ExportResult:
    """Export-CsUserData (Lync 2010: ``dbimpexp /hrxmlfile``): the accounts,
    settings, contact lists and meetings of the users homed on the store's
    pool, at one point in time (the header's ``seq``), to an XML file (or
    JSON: ``fmt="json"`` or a ``.json`` path). ``domain``: the SIP domain, so
    that an import into another lab knows the file is foreign.
    """
    out = Path(path)
    pool = store.pool_fqdn
    hwm, records, contacts, meetings = store.homed_view(pool)
    users = [
        ExportedUser(
            u.uri,
            u.home_pool,
            u.settings,
            tuple(contacts[u.uri]),
            tuple(ExportedMeeting(m.conf_id, m.subject, m.content) for m in meetings[u.uri]),
        )
        for u in records
    ]
    header = ExportHeader(
        pool=pool,
        domain=domain.lower(),
        seq=hwm,
        created=round(time.time() if created is None else created, 6),
        users=len(users),
        contacts=sum(len(u.contacts) for u in users),
        meetings=sum(len(u.meetings) for u in users),
    )
    render = _render_json if _format_of(out, fmt) == "json" else _render_xml
    # The nightly export is what the budget design restores from: a crash
    # while writing must leave the previous night's file, not half of one.
    write_atomically(out, render(header, users, export_digest(header, users)))
    return ExportResult(
        out, pool, header.users, header.contacts, header.meetings, header.seq, header.created
    )


def _bad(path: Path | str, why: str, code: str = "bad-export") -> OperationError:
    # Where in the file, never what it holds: the control API answers this
    # for an uploaded file.
    return OperationError(code, f"{path}: {why}", 400)


def _header(path: Path | str, fields: Mapping[str, Any]) -> ExportHeader:
    try:
        return ExportHeader(
            pool=str(fields["pool"]).lower(),
            domain=str(fields["domain"]).lower(),
            seq=int(fields["seq"]),
            created=float(fields["created"]),
            users=int(fields["users"]),
            contacts=int(fields["contacts"]),
            meetings=int(fields["meetings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"the export's header lacks or garbles {e}") from None


def _parse_xml(path: Path | str, data: bytes) -> tuple[ExportHeader, list[ExportedUser], str]:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise _bad(path, f"not well-formed XML ({e}): cut short or damaged?") from None
    if root.tag != "UserData" or root.get("version") != str(EXPORT_VERSION):
        raise _bad(path, f"not a version {EXPORT_VERSION} UserData export")
    header = _header(path, root.attrib)
    users = []
    for n, el in enumerate(root.findall("User"), 1):
        uri, home = el.get("uri"), el.get("homePool")
        if not uri or not home:
            raise _bad(path, f"User {n} lacks uri or homePool")
        settings_el = el.find("Settings")
        try:
            settings = json.loads(settings_el.text or "{}") if settings_el is not None else {}
        except json.JSONDecodeError:
            raise _bad(path, f"the Settings of User {n} are not JSON") from None
        contacts = []
        for c in el.findall("Contacts/Contact"):
            c_uri = c.get("uri")
            if not c_uri:
                raise _bad(path, f"a Contact of User {n} lacks its uri")
            contacts.append(c_uri)
        meetings = []
        for m in el.findall("Meetings/Meeting"):
            conf_id = m.get("id")
            if not conf_id:
                raise _bad(path, f"a Meeting of User {n} lacks its id")
            try:
                content = base64.b64decode(m.text or "", validate=True)
            except ValueError:
                raise _bad(path, f"the content of a Meeting of User {n} is damaged") from None
            meetings.append(ExportedMeeting(conf_id, m.get("subject") or "", content))
        users.append(ExportedUser(uri, home, settings, tuple(contacts), tuple(meetings)))
    return header, users, root.get("digest") or ""


def _parse_json(path: Path | str, data: bytes) -> tuple[ExportHeader, list[ExportedUser], str]:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != EXPORT_VERSION:
            raise _bad(path, f"not a version {EXPORT_VERSION} export")
        header = _header(path, doc["header"])
        users = [
            ExportedUser(
                str(u["uri"]),
                str(u["home_pool"]),
                dict(u["settings"]),
                tuple(str(c) for c in u["contacts"]),
                tuple(
                    ExportedMeeting(
                        str(m["id"]),
                        str(m["subject"]),
                        base64.b64decode(m["content"], validate=True),
                    )
                    for m in u["meetings"]
                ),
            )
            for u in doc["users"]
        ]
        return header, users, str(doc.get("digest") or "")
    except OperationError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(path, f"not a sipdrill JSON export ({e!r}): cut short or damaged?") from None


def read_export(
    data: bytes,
    name: Path | str = "export",
    *,
    domain: str | None = None,
    pools: Collection[str] | None = None,
) -> tuple[ExportHeader, list[ExportedUser]]:
    """Parse and check an export (XML or JSON, sniffed, not taken from the
    name) before anything is written: well-formed, its counts and digest
    match (``bad-export``: cut short, edited or damaged), and, given the lab's
    ``domain`` and ``pools``, from this lab (``foreign-export``)."""
    # Sniff rather than trust the suffix: an export renamed by hand still imports.
    is_json = data.lstrip()[:1] == b"{"
    header, users, digest = (_parse_json if is_json else _parse_xml)(name, data)
    counted = (
        len(users),
        sum(len(u.contacts) for u in users),
        sum(len(u.meetings) for u in users),
    )
    if counted != (header.users, header.contacts, header.meetings):
        raise _bad(
            name,
            f"the header promises {header.users} users, {header.contacts} contacts and "
            f"{header.meetings} meetings, the file holds {counted[0]}, {counted[1]} and "
            f"{counted[2]}: it was cut short or edited; use an intact export",
        )
    if digest != export_digest(header, users):
        raise _bad(name, "its content does not match its digest: damaged; use an intact export")
    uris = [u.uri.lower() for u in users]
    if len(set(uris)) != len(uris):
        raise _bad(name, "a user appears twice")
    if domain is not None and header.domain != domain.lower():
        raise _bad(
            name,
            f"an export of domain {header.domain or '(none)'!r}, not this lab's {domain!r}: "
            "a foreign export; import one written by this lab's pools",
            "foreign-export",
        )
    if pools is not None and header.pool not in {p.lower() for p in pools}:
        raise _bad(
            name,
            f"an export of pool {header.pool}, which is not a pool of this lab "
            f"({', '.join(sorted(pools))}): a foreign export",
            "foreign-export",
        )
    suffix = "@" + header.domain
    strangers = [u.uri for u in users if header.domain and not u.uri.lower().endswith(suffix)]
    if strangers:
        raise _bad(
            name,
            f"{len(strangers)} user(s) outside domain {header.domain} (first {strangers[0]}): "
            "a foreign or damaged export",
            "foreign-export",
        )
    return header, users


def import_cs_user_data(
    store: UserStore,
    path: str | Path,
    *,
    domain: str | None = None,
    pools: Collection[str] | None = None,
) -> ImportResult:
    """Import-CsUserData (``dbimpexp /import``): restore the settings,
    contact lists and meetings of the exported users that have an account
    homed on the store's pool (after a forced move, their new pool). Each
    restored list becomes exactly the exported one. Users without such an
    account are skipped and listed with why, as dbimpexp skips users not
    homed on the pool.

    The whole file is read and checked (:func:`read_export`) before anything
    is written, and the restore is one transaction: a bad file changes nothing.
    """
    src = Path(path)
    try:
        data = src.read_bytes()
    except OSError as e:
        raise OperationError("bad-export", f"cannot read {src}: {e.strerror}", 400) from None
    return import_export_data(store, data, src, domain=domain, pools=pools)


def import_export_data(
    store: UserStore,
    data: bytes,
    name: Path | str = "export",
    *,
    domain: str | None = None,
    pools: Collection[str] | None = None,
) -> ImportResult:
    """:func:`import_cs_user_data` of an export's bytes."""
    header, users = read_export(data, name, domain=domain, pools=pools)
    store.require_writable()
    restored: list[ExportedUser] = []
    reasons: dict[str, str] = {}
    for u in users:
        rec = store.get_user(u.uri)
        if rec is None:
            reasons[u.uri] = f"no account on {store.pool_fqdn}"
        elif rec.home_pool != store.pool_fqdn:
            reasons[u.uri] = f"homed on {rec.home_pool}, not {store.pool_fqdn}: move them first"
        else:
            restored.append(u)
    with store.batch():
        for u in restored:
            rec = store.get_user(u.uri)
            assert rec is not None
            if rec.settings != u.settings:
                store.update_settings(u.uri, u.settings)
            store.replace_contacts(u.uri, u.contacts)
            have = {c.conf_id: c for c in store.conferences(u.uri)}
            wanted = {m.conf_id for m in u.meetings}
            for conf_id in sorted(set(have) - wanted):
                store.cancel_conference(u.uri, conf_id)
            for m in u.meetings:
                old = have.get(m.conf_id)
                if old is None or (old.subject, old.content) != (m.subject, m.content):
                    store.schedule_conference(
                        u.uri, m.conf_id, subject=m.subject, content=m.content
                    )
    return ImportResult(
        len(restored),
        sum(len(u.contacts) for u in restored),
        tuple(reasons),
        sum(len(u.meetings) for u in restored),
        reasons,
        header,
    )


# --- pool status ---------------------------------------------------------------


@dataclass(frozen=True)
class PoolStatus:
    """What an administrator checks on a pool before and after a drill."""

    pool: str
    read_only: bool
    counts: StoreCounts
    high_water_mark: int
    #: Last change applied from each partner's feed (the Backup Service's import).
    replicated_from: Mapping[str, int]
    failover_state: FailoverState | None
    backup_pool: str | None


def get_pool_status(store: UserStore, failover: PoolFailoverStates | None = None) -> PoolStatus:
    backup: str | None = None
    state: FailoverState | None = None
    if failover is not None:
        state = failover.state(store.pool_fqdn)
        try:
            backup = failover.backup_of(store.pool_fqdn)
        except OperationError:
            backup = None
    return PoolStatus(
        store.pool_fqdn,
        store.read_only,
        store.counts(),
        store.high_water_mark(),
        store.replication_positions(),
        state,
        backup,
    )
