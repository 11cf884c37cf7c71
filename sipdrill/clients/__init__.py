"""Simulated Lync 2013 clients: thousands of endpoints in one process.

- :mod:`.endpoint`: the sans-IO endpoint (discovery in the Lync lookup order,
  RFC 2782/3263 target selection, REGISTER and refresh, RFC 5626 keep-alives
  and backoff, 301 handling, resiliency mode, workload), driven with an
  injected clock and RNG;
- :mod:`.events`: the frozen event records every state change and workload
  result becomes (JSONL);
- :mod:`.dnscache` and :mod:`.resolver`: the TTL cache and the asyncio
  resolver that asks the lab DNS server only;
- :mod:`.runner`: the asyncio adapter that runs many endpoints over one
  :class:`~sipdrill.sip.transport.SipTransport`;
- :mod:`.api` and :mod:`.cli`: the control API and ``sipdrill serve clients``.

Importing this package is cheap: it pulls in neither asyncio adapters nor FastAPI.
"""
