"""Docker labels and names that mark what a lab created, so that cleanup finds
every container, network and volume of a lab (and nothing else)."""

from __future__ import annotations

#: The lab a container, network or volume belongs to: ``sipdrill.lab=<name>``.
LAB = "sipdrill.lab"
#: The lab role of a container (dns, pool, backup, clients).
ROLE = "sipdrill.role"
#: The lab service name of a container (dns, pool1, backup-pool1, ...).
SERVICE = "sipdrill.service"
#: What made the object when it is not a lab service (``test``, ``probe``).
PURPOSE = "sipdrill.purpose"

#: Prefix of everything a fault creates inside a container's network
#: namespace: iptables chains ``sipdrill-<id>-in``, the delayer's tag.
FAULT_PREFIX = "sipdrill-"


def lab_labels(lab: str, **extra: str) -> dict[str, str]:
    """Labels for an object of ``lab``; ``extra`` maps short keys (role,
    service, purpose) or full label names to values."""
    short = {"role": ROLE, "service": SERVICE, "purpose": PURPOSE}
    labels = {LAB: lab}
    for key, value in extra.items():
        labels[short.get(key, key)] = value
    return labels


def lab_filter(lab: str) -> dict[str, list[str]]:
    """A Docker SDK ``filters=`` argument selecting the objects of ``lab``."""
    return {"label": [f"{LAB}={lab}"]}
