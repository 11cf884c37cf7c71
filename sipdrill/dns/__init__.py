"""The lab's authoritative DNS server (issue 4)."""
