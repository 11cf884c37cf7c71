"""The Front End pool's non-SIP foundations.

- :mod:`.store`: the pool's durable user store and its change feed (what the
  Backup Service replicates from).
- :mod:`.pool_state`: pool failover states and the backup registrar's view of
  its partner pool (sans-IO, injected clock).
- :mod:`.policy`: the registrar's per-user decision and the resiliency-mode
  feature matrix.
- :mod:`.admin`: administrator operations over stores (Move-CsUser,
  Export/Import-CsUserData, pool status).

Nothing here imports :mod:`sipdrill.sip`: these parts must be right whatever
carries them, and importing this package stays cheap (the crash-safety test
starts a child process that only needs :mod:`.store`).
"""
