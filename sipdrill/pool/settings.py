"""How one pool process runs (``sipdrill serve pool``'s options): its
:class:`PoolSettings`; the topology says everything else."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class PoolSettings(BaseModel):
    """How one pool process runs; the topology says everything else."""

    model_config = ConfigDict(frozen=True)

    pool: str
    front_end: str | None = Field(
        default=None,
        description="The front end this process is (its FQDN or first label); default: the "
        "pool's first. Every front end of a pool shares the pool's state directory (its Back End).",
    )
    front_end_probe_interval: float = Field(
        default=1.0, gt=0, description="How often a front end asks its siblings if they are up."
    )
    front_end_down_after: float = Field(
        default=3.0, gt=0,
        description="A sibling front end silent this long counts as down for the pool's quorum.",
    )
    state_dir: Path
    ca_dir: Path
    loopback: bool = False
    token: SecretStr | None = None
    heartbeat_interval: float | None = Field(
        default=None, gt=0, description="Default: min(5 s, detection interval / 4)."
    )
    heartbeat_timeout: float | None = Field(
        default=None, gt=0,
        description="Default: min(detection / 2, max(2 x interval, 1 s)).",
    )
    forward_timeout: float = Field(
        default=8.0, gt=0, description="How long a relayed request may wait for its answer."
    )
    presence_refresh: float = Field(
        default=60.0, gt=0, description="Refresh of back-end presence subscriptions."
    )
    nudge_grace: float = Field(
        default=30.0, ge=0,
        description="How long a client asked to register again (NOTIFY x-sipdrill-reregister) "
        "has before its flow is closed; 0 closes flows at once.",
    )
    nudge_rate: float = Field(
        default=1000.0, gt=0, description="Nudges sent per second after a mass change."
    )
    nudge_window: int = Field(
        default=500, ge=1, description="Users nudged and not yet registered again, at most."
    )
    housekeeping_interval: float = Field(default=1.0, gt=0)
    pending_retry_interval: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=60_000, ge=16)
    tls_workers: int = Field(
        default=0, ge=0, le=64,
        description="Processes doing the TLS (handshakes, records) in front of the pool's one "
        "SIP process (sipdrill.sip.tls_front); 0: the pool's process does it.",
    )
    sip_t1: float = Field(default=0.5, gt=0)
