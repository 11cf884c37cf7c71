"""The topology model: one YAML file that describes a lab, and the one source
of truth that DNS records, pools, clients and compose files are derived from.

Loading is two passes. Pydantic checks types, ranges and unknown fields; then
:func:`_semantic_issues` checks what a Lync topology administrator would check
(pairing, editions, homing, addresses). Both passes report a
:class:`~sipdrill.errors.TopologyIssue` that names the file, the line, the
field and the fix, so a user never has to read a traceback.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sipdrill.errors import TopologyError, TopologyIssue
from sipdrill.yamlfile import Lines, dotted, load_model

# --- Microsoft's defaults and ranges (docs/reference.md) -----------------

#: Topology Builder's default; the planning guide says 300 s. Below 120 s
#: Microsoft says failover "may not work as expected" (a warning, not an error:
#: seed 003 (docs/sources.md) runs a lab at 30 s).
DEFAULT_FAILOVER_DETECTION_INTERVAL = 120.0
RECOMMENDED_MIN_FAILOVER_DETECTION_INTERVAL = 120.0
DEFAULT_FAILBACK_INTERVAL = 240.0
#: Backup Service SyncInterval: default 2 min, global, 5 s to 3 h.
DEFAULT_SYNC_INTERVAL = 120.0
MIN_SYNC_INTERVAL = 5.0
MAX_SYNC_INTERVAL = 3 * 3600.0
#: Registration expiry: default 600 s, min 300 s, max 900 s; each settable 300-900.
REGISTRATION_EXPIRY_FLOOR = 300
REGISTRATION_EXPIRY_CEILING = 900
#: RFC 5626 Flow-Timer the registrar returns; clients ping at 80-100 % of it.
DEFAULT_KEEPALIVE_INTERVAL = 120.0
#: RFC 5626: no pong within 10 s means the flow has failed.
DEFAULT_KEEPALIVE_PONG_TIMEOUT = 10.0
#: BackupStoreUnavailableThreshold: then users go to survivable mode.
DEFAULT_BACKUP_STORE_UNAVAILABLE_THRESHOLD = 1800.0
#: An Enterprise Edition pool holds up to 12 Front End servers.
MAX_ENTERPRISE_FRONT_ENDS = 12

#: The Lync 2013 client's DNS lookup order (docs/reference.md, "DNS").
LYNC_LOOKUP_ORDER: tuple[tuple[str, str], ...] = (
    ("lyncdiscoverinternal", "A"),
    ("lyncdiscover", "A"),
    ("_sipinternaltls._tcp", "SRV"),
    ("_sipinternal._tcp", "SRV"),
    ("_sip._tls", "SRV"),
    ("sipinternal", "A"),
    ("sip", "A"),
    ("sipexternal", "A"),
)

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_FQDN_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")
_SIP_URI_RE = re.compile(r"^sip:(?P<user>[A-Za-z0-9._+%-]+)@(?P<host>[A-Za-z0-9.-]+)$")


class Edition(StrEnum):
    STANDARD = "Standard"
    ENTERPRISE = "Enterprise"


class _Model(BaseModel):
    # Unknown fields are errors: a typo such as `bakup:` must not pass silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(gt=0)]


def _dotted_text(value: Any) -> Any:
    # YAML turns `yes`, `1` and `off` into bools and ints, which ipaddress would
    # silently accept as 32-bit numbers: only text is an address here.
    if not isinstance(value, str):
        raise ValueError("expected a dotted IPv4 address or network written as text")
    return value


IPv4Addr = Annotated[ipaddress.IPv4Address, BeforeValidator(_dotted_text)]
IPv4Net = Annotated[ipaddress.IPv4Network, BeforeValidator(_dotted_text)]


class FrontEnd(_Model):
    fqdn: str = Field(description="The Front End server's FQDN, in the SIP domain.")
    address: IPv4Addr = Field(description="Its address in the site's subnet.")


class SrvPreference(_Model):
    priority: int = Field(ge=0, le=65535)
    weight: int = Field(ge=0, le=65535)


#: dbimpexp's schedule in seed 001: "backing up the contact lists of your users daily".
DEFAULT_USER_DATA_EXPORT_INTERVAL = 86400.0


class UserDataExport(_Model):
    """The scheduled Export-CsUserData (Lync 2010: ``dbimpexp /hrxmlfile``) of
    a pool's users, every ``timers.user_data_export_interval``, copied to a
    pool in another site (seed 001: "move these xml files across to your DR
    site for safe keeping")."""

    copy_to: str | None = Field(
        default=None,
        description="The pool whose site keeps the copies (the DR pool); none: kept here only.",
    )
    keep: int = Field(default=7, ge=1, le=366, description="Exports kept here and at the copy.")
    format: Literal["xml", "json"] = "xml"


class Pool(_Model):
    fqdn: str
    site: str
    edition: Edition
    front_ends: list[FrontEnd] = Field(min_length=1)
    backup: str | None = Field(
        default=None, description="FQDN of the paired backup pool (1:1, symmetric)."
    )
    srv: SrvPreference | None = Field(
        default=None,
        description="Priority and weight of this pool's SRV records in the default DNS view; "
        "by default 0/10 for pools in the first site and 10/10 elsewhere.",
    )
    publish_srv: bool = Field(
        default=True,
        description="Whether the lookup-order SRV records name this pool; a budget-DR "
        "standby stays out until the drill repoints DNS.",
    )
    sip_tls_port: int = Field(default=5061, ge=1, le=65535)
    sip_tcp_port: int = Field(default=5060, ge=1, le=65535)
    sip_udp_port: int = Field(default=5060, ge=1, le=65535)
    control_port: int = Field(default=8080, ge=1, le=65535)
    user_data_export: UserDataExport | None = Field(
        default=None, description="A scheduled export of this pool's user data (budget DR)."
    )


class Site(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    subnet: IPv4Net = Field(description="The site's network (a /24 or smaller).")
    description: str = ""
    client_subnet: IPv4Net | None = Field(
        default=None,
        description="Where this site's users sit; DNS queries from it get the site's view "
        "(its own pools first).",
    )


class Cms(_Model):
    active: str = Field(description="FQDN of the pool that hosts the active CMS master.")


class RegistrationExpiry(_Model):
    default: int = Field(default=600, ge=REGISTRATION_EXPIRY_FLOOR, le=REGISTRATION_EXPIRY_CEILING)
    min: int = Field(default=300, ge=REGISTRATION_EXPIRY_FLOOR, le=REGISTRATION_EXPIRY_CEILING)
    max: int = Field(default=900, ge=REGISTRATION_EXPIRY_FLOOR, le=REGISTRATION_EXPIRY_CEILING)


class Timers(_Model):
    failover_detection_interval: Seconds = Field(
        default=DEFAULT_FAILOVER_DETECTION_INTERVAL, le=3600
    )
    failback_interval: Seconds = Field(default=DEFAULT_FAILBACK_INTERVAL, le=3600)
    sync_interval: float = Field(
        default=DEFAULT_SYNC_INTERVAL, ge=MIN_SYNC_INTERVAL, le=MAX_SYNC_INTERVAL
    )
    registration_expiry: RegistrationExpiry = RegistrationExpiry()
    keepalive_interval: float = Field(default=DEFAULT_KEEPALIVE_INTERVAL, ge=1, le=3600)
    keepalive_pong_timeout: float = Field(default=DEFAULT_KEEPALIVE_PONG_TIMEOUT, gt=0, le=60)
    backup_store_unavailable_threshold: Seconds = Field(
        default=DEFAULT_BACKUP_STORE_UNAVAILABLE_THRESHOLD, le=86400
    )
    user_data_export_interval: float = Field(
        default=DEFAULT_USER_DATA_EXPORT_INTERVAL, ge=5, le=7 * 86400
    )


class Conference(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    subject: str = ""


class User(_Model):
    uri: str
    home_pool: str
    contacts: list[str] = []
    conferences: list[Conference] = []


class UserGroup(_Model):
    """Generates ``count`` users homed on one pool, named ``<prefix><n>``."""

    home_pool: str
    prefix: str = Field(pattern=r"^[a-z][a-z0-9._-]{0,40}$")
    count: int = Field(ge=1, le=200_000)
    contacts_per_user: int = Field(default=0, ge=0, le=1000)
    conferences_per_user: int = Field(default=0, ge=0, le=100)


class ExtraRecord(_Model):
    name: str = Field(description="Owner name, relative to the domain or absolute with a dot.")
    type: Literal["A", "AAAA", "CNAME", "SRV", "TXT", "MX"]
    value: str = Field(description="Record data in zone-file form.")
    ttl: int | None = Field(default=None, ge=0, le=604800)


class DnsSettings(_Model):
    address: IPv4Addr = Field(description="The lab DNS server's address (core network).")
    ttl: int = Field(default=300, ge=0, le=604800)
    negative_ttl: int = Field(default=60, ge=0, le=86400)
    publish: list[str] = Field(
        default_factory=lambda: [name for name, _ in LYNC_LOOKUP_ORDER],
        description="Which Lync lookup-order names the zone publishes.",
    )
    extra_records: list[ExtraRecord] = []


class LabSettings(_Model):
    core_subnet: IPv4Net = Field(
        default=ipaddress.IPv4Network("172.30.0.0/24"),
        description="The network of the DNS server and the clients, outside every site.",
    )
    loopback_network: IPv4Net = Field(
        default=ipaddress.IPv4Network("127.77.0.0/16"),
        description="The local runtime maps network k (core=0, sites 1..n) to <base>.k.0/24.",
    )


class Topology(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")
    description: str = ""
    domain: str
    sites: list[Site] = Field(min_length=1)
    pools: list[Pool] = Field(min_length=1)
    cms: Cms
    dns: DnsSettings
    timers: Timers = Timers()
    lab: LabSettings = LabSettings()
    users: list[User] = []
    user_groups: list[UserGroup] = []

    # --- lookups ---------------------------------------------------------

    def pool(self, fqdn: str) -> Pool:
        fqdn = fqdn.lower()
        for p in self.pools:
            if p.fqdn == fqdn:
                return p
        raise KeyError(fqdn)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def backup_of(self, pool_fqdn: str) -> Pool | None:
        backup = self.pool(pool_fqdn).backup
        return self.pool(backup) if backup else None

    def pairs(self) -> list[tuple[Pool, Pool]]:
        """Each backup pairing once, in file order."""
        seen: set[str] = set()
        out: list[tuple[Pool, Pool]] = []
        for p in self.pools:
            if p.backup and p.fqdn not in seen:
                out.append((p, self.pool(p.backup)))
                seen.update({p.fqdn, p.backup})
        return out

    @property
    def cms_standby(self) -> str | None:
        """The standby CMS lives on the active pool's partner, if it has one."""
        return self.pool(self.cms.active).backup

    def all_users(self) -> list[User]:
        """Explicit users, then generated ones, in a stable order."""
        users = list(self.users)
        for group in self.user_groups:
            users.extend(_generate_group(group, self.domain))
        return users

    def users_by_pool(self) -> dict[str, int]:
        counts = {p.fqdn: 0 for p in self.pools}
        for u in self.all_users():
            counts[u.home_pool] = counts.get(u.home_pool, 0) + 1
        return counts

    # --- addresses -------------------------------------------------------

    def network_index(self, address: ipaddress.IPv4Address) -> int | None:
        """0 for the core network, 1..n for the sites, None if in none."""
        if address in self.lab.core_subnet:
            return 0
        for i, s in enumerate(self.sites, start=1):
            if address in s.subnet:
                return i
        return None

    def loopback_address(self, address: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        """The 127.x address the local runtime uses in place of ``address``."""
        k = self.network_index(address)
        if k is None:
            raise KeyError(f"{address} is in no network of topology {self.name!r}")
        net = self.lab.core_subnet if k == 0 else self.sites[k - 1].subnet
        offset = int(address) - int(net.network_address)
        return self.lab.loopback_network.network_address + (k * 256 + offset)

    def loopback_map(self) -> dict[str, str]:
        """Every address the topology names, mapped to its loopback stand-in."""
        addrs = [self.dns.address] + [fe.address for p in self.pools for fe in p.front_ends]
        return {str(a): str(self.loopback_address(a)) for a in addrs}

    # --- DNS -------------------------------------------------------------

    @property
    def nameserver_fqdn(self) -> str:
        return f"ns.{self.domain}"

    def dns_views(self) -> list[str | None]:
        """``None`` (the default view) and each site that declares a client subnet."""
        return [None] + [s.name for s in self.sites if s.client_subnet is not None]

    def view_for_client(self, address: ipaddress.IPv4Address) -> str | None:
        for s in self.sites:
            if s.client_subnet is not None and address in s.client_subnet:
                return s.name
        return None

    def srv_preference(self, pool: Pool, view: str | None) -> SrvPreference:
        if view is not None:
            return SrvPreference(priority=0 if pool.site == view else 10, weight=10)
        if pool.srv is not None:
            return pool.srv
        return SrvPreference(priority=0 if pool.site == self.sites[0].name else 10, weight=10)

    def dns_records(
        self, view: str | None = None, address_map: Mapping[str, str] | None = None
    ) -> list[DnsRecord]:
        """The records the lab zone holds for clients in ``view`` (a site name,
        or None for everyone else). SOA and NS are the DNS server's own.

        ``address_map`` rewrites A-record addresses (the local runtime passes
        :meth:`loopback_map`).
        """
        amap = address_map or {}
        ttl = self.dns.ttl
        d = self.domain

        def a(addr: ipaddress.IPv4Address) -> str:
            return amap.get(str(addr), str(addr))

        records: list[DnsRecord] = [DnsRecord(self.nameserver_fqdn, "A", ttl, a(self.dns.address))]
        for p in self.pools:
            for fe in p.front_ends:
                records.append(DnsRecord(fe.fqdn, "A", ttl, a(fe.address)))
            # An Enterprise pool's FQDN resolves to every front end: DNS load balancing.
            for fe in p.front_ends:
                records.append(DnsRecord(p.fqdn, "A", ttl, a(fe.address)))

        published = [p for p in self.pools if p.publish_srv]
        ordered = sorted(published, key=lambda p: self.srv_preference(p, view).priority)
        preferred = ordered[0] if ordered else None
        publish = set(self.dns.publish)
        for label, rtype in LYNC_LOOKUP_ORDER:
            if label not in publish:
                continue
            name = f"{label}.{d}"
            if rtype == "A":
                for fe in preferred.front_ends if preferred else ():
                    records.append(DnsRecord(name, "A", ttl, a(fe.address)))
                continue
            for p in published:
                pref = self.srv_preference(p, view)
                port = p.sip_tcp_port if label == "_sipinternal._tcp" else p.sip_tls_port
                records.append(
                    DnsRecord(name, "SRV", ttl, f"{pref.priority} {pref.weight} {port} {p.fqdn}.")
                )
        for extra in self.dns.extra_records:
            name = extra.name[:-1] if extra.name.endswith(".") else f"{extra.name}.{d}"
            records.append(DnsRecord(name.lower(), extra.type, extra.ttl or ttl, extra.value))
        return records


@dataclass(frozen=True)
class DnsRecord:
    """One resource record: ``name`` is absolute without the trailing dot,
    ``data`` is in zone-file presentation form (``"0 10 5061 pool1.lab.local."``)."""

    name: str
    rtype: str
    ttl: int
    data: str


def _generate_group(group: UserGroup, domain: str) -> list[User]:
    width = len(str(group.count))
    uris = [f"sip:{group.prefix}{n:0{width}d}@{domain}" for n in range(1, group.count + 1)]
    users = []
    for i, uri in enumerate(uris):
        # Contacts are the next users of the same group, so lists are
        # deterministic and every contact exists.
        k = min(group.contacts_per_user, group.count - 1)
        contacts = [uris[(i + j) % group.count] for j in range(1, k + 1)]
        local = uri[4:].split("@")[0]
        confs = [
            Conference(id=f"{local}-m{c + 1}", subject=f"{local} meeting {c + 1}")
            for c in range(group.conferences_per_user)
        ]
        users.append(User(uri=uri, home_pool=group.home_pool, contacts=contacts, conferences=confs))
    return users


# --- loading -----------------------------------------------------------------


@dataclass(frozen=True)
class LoadedTopology:
    topology: Topology
    warnings: list[TopologyIssue]
    path: str


def load_topology(path: str | Path) -> LoadedTopology:
    """Load, validate and return a topology; raise :class:`TopologyError` listing
    every error (and warning) with file, line, field and fix."""
    fname = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(
            fname,
            [
                TopologyIssue(
                    fname, None, "(file)", f"cannot read: {exc.strerror}", "check the path"
                )
            ],
        ) from None
    return parse_topology(text, fname)


def parse_topology(text: str, fname: str = "<string>") -> LoadedTopology:
    topo, lines = load_model(
        text, fname, Topology, TopologyError, "start the file with `name:`, `domain:`, `sites:` ..."
    )
    found = _semantic_issues(topo, fname, lines)
    errors = [i for i in found if i.severity == "error"]
    if errors:
        raise TopologyError(fname, found)
    return LoadedTopology(topo, [i for i in found if i.severity == "warning"], fname)


def _semantic_issues(t: Topology, fname: str, lines: Lines) -> list[TopologyIssue]:
    issues: list[TopologyIssue] = []

    def err(path: Sequence[str | int], message: str, fix: str, severity: str = "error") -> None:
        issues.append(TopologyIssue(fname, lines.line(path), dotted(path), message, fix, severity))

    d = t.domain
    if not _FQDN_RE.match(d):
        err(["domain"], f"{d!r} is not a lower-case DNS domain", "write a domain such as lab.local")

    def in_domain(name: str) -> bool:
        return name.endswith("." + d) and bool(_FQDN_RE.match(name))

    # Sites: unique names, /24 or smaller, no overlaps (with each other or the core).
    site_names: dict[str, int] = {}
    nets: list[tuple[str, ipaddress.IPv4Network, list[str | int]]] = [
        ("lab.core_subnet", t.lab.core_subnet, ["lab", "core_subnet"])
    ]
    for i, s in enumerate(t.sites):
        if s.name in site_names:
            err(
                ["sites", i, "name"],
                f"site {s.name!r} is defined twice",
                "give each site its own name",
            )
        site_names[s.name] = i
        if s.subnet.prefixlen < 24:
            err(
                ["sites", i, "subnet"],
                f"subnet {s.subnet} is larger than a /24",
                "use a /24 or smaller subnet (the local runtime maps each network to a /24)",
            )
        nets.append((f"site {s.name}", s.subnet, ["sites", i, "subnet"]))
    for a_i, (a_name, a_net, _) in enumerate(nets):
        for b_name, b_net, b_path in nets[a_i + 1 :]:
            if a_net.overlaps(b_net):
                err(
                    b_path,
                    f"{b_name} subnet {b_net} overlaps {a_name} ({a_net})",
                    "give every site and the core network its own subnet",
                )

    # Pools.
    pool_index: dict[str, int] = {}
    for i, p in enumerate(t.pools):
        if p.fqdn in pool_index:
            err(
                ["pools", i, "fqdn"],
                f"pool {p.fqdn!r} is defined twice",
                "give each pool its own FQDN",
            )
        pool_index[p.fqdn] = i
        if not in_domain(p.fqdn):
            err(
                ["pools", i, "fqdn"],
                f"{p.fqdn!r} is not a lower-case name in the SIP domain {d!r}",
                f"SRV targets must be A records in the same domain: use a name ending in .{d}",
            )
        if p.site not in site_names:
            err(
                ["pools", i, "site"],
                f"pool {p.fqdn} is in unknown site {p.site!r}",
                f"use one of the sites: {sorted(site_names)}",
            )
        n_fe = len(p.front_ends)
        if p.edition is Edition.STANDARD and n_fe != 1:
            err(
                ["pools", i, "front_ends"],
                f"a Standard Edition pool has exactly one front end, not {n_fe}",
                "list one front end, or make the pool Enterprise",
            )
        if p.edition is Edition.ENTERPRISE and n_fe > MAX_ENTERPRISE_FRONT_ENDS:
            err(
                ["pools", i, "front_ends"],
                f"an Enterprise pool has at most {MAX_ENTERPRISE_FRONT_ENDS} front ends, "
                f"not {n_fe}",
                f"list at most {MAX_ENTERPRISE_FRONT_ENDS} front ends, or split the users "
                "between two pools",
            )
        if p.edition is Edition.ENTERPRISE and n_fe == 2:
            err(
                ["pools", i, "front_ends"],
                "a two-front-end pool stays up on one server only because the Back End "
                "breaks the tie; Microsoft recommends at least three",
                "add a third front end, or use two paired Standard Edition pools",
                severity="warning",
            )
    # Addresses and FQDNs: no collisions anywhere.
    seen_addr: dict[ipaddress.IPv4Address, str] = {t.dns.address: "dns.address"}
    seen_fqdn: dict[str, str] = {p.fqdn: f"pool {p.fqdn}" for p in t.pools}
    if t.dns.address not in t.lab.core_subnet:
        err(
            ["dns", "address"],
            f"{t.dns.address} is outside the core network {t.lab.core_subnet}",
            "pick an address in lab.core_subnet",
        )
    for i, p in enumerate(t.pools):
        site = t.sites[site_names[p.site]] if p.site in site_names else None
        for j, fe in enumerate(p.front_ends):
            path: list[str | int] = ["pools", i, "front_ends", j]
            if fe.address in seen_addr:
                err(
                    [*path, "address"],
                    f"address {fe.address} is already used by {seen_addr[fe.address]}",
                    "give every front end and the DNS server its own address",
                )
            seen_addr[fe.address] = f"front end {fe.fqdn}"
            if fe.fqdn in seen_fqdn:
                err(
                    [*path, "fqdn"],
                    f"{fe.fqdn!r} is already used by {seen_fqdn[fe.fqdn]}",
                    "give every front end its own FQDN",
                )
            seen_fqdn[fe.fqdn] = f"front end of {p.fqdn}"
            if not in_domain(fe.fqdn):
                err(
                    [*path, "fqdn"],
                    f"{fe.fqdn!r} is not a lower-case name in the domain {d!r}",
                    f"use a name ending in .{d}",
                )
            if site is not None and fe.address not in site.subnet:
                err(
                    [*path, "address"],
                    f"{fe.address} is outside site {site.name}'s subnet {site.subnet}",
                    f"pick an address in {site.subnet}",
                )
            if (
                fe.address in (site.subnet.network_address, site.subnet.broadcast_address)
                if site
                else False
            ):
                err(
                    [*path, "address"],
                    f"{fe.address} is the subnet's network or broadcast address",
                    "pick a host address",
                )

    # Backup pairing: 1:1, symmetric, same edition, not self; same site warns.
    for i, p in enumerate(t.pools):
        if p.backup is None:
            continue
        path = ["pools", i, "backup"]
        if p.backup == p.fqdn:
            err(path, f"pool {p.fqdn} is paired with itself", "pair it with a pool in another site")
            continue
        if p.backup not in pool_index:
            err(
                path, f"backup pool {p.backup!r} does not exist", f"use one of {sorted(pool_index)}"
            )
            continue
        partner = t.pools[pool_index[p.backup]]
        if partner.backup != p.fqdn:
            err(
                path,
                f"pairing is not symmetric: {p.fqdn} -> {p.backup}, "
                f"but {p.backup} -> {partner.backup}",
                f"set `backup: {p.fqdn}` on pool {p.backup} (pairing is 1:1 and symmetric)",
            )
        if partner.edition != p.edition:
            err(
                path,
                f"{p.fqdn} ({p.edition}) cannot pair with {partner.fqdn} ({partner.edition})",
                "pair Enterprise with Enterprise and Standard with Standard",
            )
        if partner.site == p.site and partner.backup == p.fqdn and i < pool_index[p.backup]:
            err(
                path,
                f"{p.fqdn} and {partner.fqdn} are paired within site {p.site}",
                "pair pools in different sites, or a site loss takes both",
                severity="warning",
            )

    # Scheduled user-data exports: copied to another pool, preferably in another site.
    for i, p in enumerate(t.pools):
        export = p.user_data_export
        if export is None or export.copy_to is None:
            continue
        path = ["pools", i, "user_data_export", "copy_to"]
        if export.copy_to == p.fqdn:
            err(path, f"pool {p.fqdn} copies its exports to itself", "name the DR pool")
        elif export.copy_to not in pool_index:
            err(
                path,
                f"pool {export.copy_to!r} does not exist",
                f"use one of {sorted(pool_index)}",
            )
        elif t.pools[pool_index[export.copy_to]].site == p.site:
            err(
                path,
                f"{p.fqdn} copies its exports to {export.copy_to} in its own site {p.site}",
                "copy them to a pool in another site, or a site loss takes both",
                severity="warning",
            )

    # CMS.
    if t.cms.active not in pool_index:
        err(
            ["cms", "active"],
            f"the CMS pool {t.cms.active!r} does not exist",
            f"use one of {sorted(pool_index)}",
        )
    elif t.pool(t.cms.active).backup is None:
        err(
            ["cms", "active"],
            f"the CMS pool {t.cms.active} has no backup pool, so the CMS has no standby",
            "pair the pool, or accept that no CMS failover is possible",
            severity="warning",
        )

    # Timers: ranges are in the model; cross-field and advisory checks here.
    tm = t.timers
    re_ = tm.registration_expiry
    if not re_.min <= re_.default <= re_.max:
        err(
            ["timers", "registration_expiry"],
            f"need min <= default <= max, got {re_.min} / {re_.default} / {re_.max}",
            "order the three values (each 300-900 s)",
        )
    if tm.failover_detection_interval < RECOMMENDED_MIN_FAILOVER_DETECTION_INTERVAL:
        err(
            ["timers", "failover_detection_interval"],
            f"{tm.failover_detection_interval:g} s is below 120 s, where Microsoft says failover "
            "may not work as expected",
            "use 120 s or more outside a lab",
            severity="warning",
        )

    # Users.
    user_uris: dict[str, int] = {}
    for i, u in enumerate(t.users):
        m = _SIP_URI_RE.match(u.uri)
        if m is None or m.group("host").lower() != d:
            err(
                ["users", i, "uri"],
                f"{u.uri!r} is not a SIP URI in the domain {d!r}",
                f"write sip:name@{d}",
            )
        if u.uri in user_uris:
            err(["users", i, "uri"], f"user {u.uri} is defined twice", "remove the duplicate")
        user_uris[u.uri] = i
        if u.home_pool not in pool_index:
            err(
                ["users", i, "home_pool"],
                f"home pool {u.home_pool!r} does not exist",
                f"use one of {sorted(pool_index)}",
            )
        conf_ids = [c.id for c in u.conferences]
        if len(set(conf_ids)) != len(conf_ids):
            err(
                ["users", i, "conferences"],
                "a conference id is used twice",
                "give each conference its own id",
            )
    for g_i, g in enumerate(t.user_groups):
        if g.home_pool not in pool_index:
            err(
                ["user_groups", g_i, "home_pool"],
                f"home pool {g.home_pool!r} does not exist",
                f"use one of {sorted(pool_index)}",
            )
    generated = [u for g in t.user_groups for u in _generate_group(g, d)]
    all_uris = set(user_uris)
    for u in generated:
        if u.uri in all_uris:
            err(
                ["user_groups"],
                f"generated user {u.uri} collides with another user",
                "change the group's prefix",
            )
            break
        all_uris.add(u.uri)
    for i, u in enumerate(t.users):
        for j, c in enumerate(u.contacts):
            m = _SIP_URI_RE.match(c)
            if m is None:
                err(["users", i, "contacts", j], f"{c!r} is not a SIP URI", "write sip:name@domain")
            elif c == u.uri:
                err(["users", i, "contacts", j], "a user cannot be their own contact", "remove it")
            elif m.group("host").lower() == d and c not in all_uris:
                err(
                    ["users", i, "contacts", j],
                    f"contact {c} is not a user of this lab",
                    "add the user, or remove the contact",
                )

    # DNS.
    known = {name for name, _ in LYNC_LOOKUP_ORDER}
    for i, name in enumerate(t.dns.publish):
        if name not in known:
            err(
                ["dns", "publish", i],
                f"{name!r} is not a Lync lookup-order name",
                f"use some of {[n for n, _ in LYNC_LOOKUP_ORDER]}",
            )
    for i, s in enumerate(t.sites):
        if s.client_subnet is not None and s.client_subnet.overlaps(s.subnet):
            err(
                ["sites", i, "client_subnet"],
                "the client subnet overlaps the site's server subnet",
                "give the site's users a subnet of their own",
            )
    return issues


def iter_issue_lines(issues: Iterable[TopologyIssue]) -> Iterable[str]:
    for issue in issues:
        yield str(issue)
