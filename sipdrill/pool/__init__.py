"""The Front End pool: ``sipdrill serve pool``.

- :mod:`.service`: the pool process as one object (:class:`~.service.PoolService`):
  failover state, Move-CsUser, replication, the CMS replica, status;
- :mod:`.sip_side`: its SIP side (home and backup registrar, resiliency
  mode, presence, IM, conferences, heartbeats with the partner pool), over
  :mod:`.sip_endpoint`, in parts that see the pool through
  :mod:`.sip_context`: :mod:`.sip_registrar`, :mod:`.sip_partner`,
  :mod:`.sip_presence`, :mod:`.sip_contacts`, :mod:`.sip_relay`,
  :mod:`.sip_focus`; :mod:`.sip_ua` is a user agent for tests and benchmarks;
- :mod:`.api`: its HTTP control API; :mod:`.client`: the clients of that API;
- :mod:`.store`: the durable user store and its change feed (what the
  Backup Service replicates from);
- :mod:`.state`: pool failover states and the backup registrar's view of
  its partner pool (sans-IO, injected clock);
- :mod:`.policy`: the registrar's per-user decision and the resiliency-mode
  feature matrix; :mod:`.presence`, :mod:`.conference`: their sans-IO parts;
- :mod:`.userdata`: Move-CsUser and Export/Import-CsUserData over stores;
- :mod:`.metrics`, :mod:`.cli` (``sipdrill serve pool``).

:mod:`.service` and the ``sip_*`` modules carry SIP (:mod:`sipdrill.sip`);
the other parts do not, and this module imports nothing, so importing a part
stays cheap (the crash-safety test starts a child process that only needs
:mod:`.store`).
"""
