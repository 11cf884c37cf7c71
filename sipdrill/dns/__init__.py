"""The lab's authoritative DNS server."""
