"""Administrator operations over the running lab, named after the Lync cmdlets
they mirror (docs/cmdlets.md): ``sipdrill admin ...``.

- :mod:`.failover`: Invoke-CsPoolFailOver / Invoke-CsPoolFailBack and the
  RPO losses they count, over the pools' and Backup Services' control APIs;
- :mod:`.pool_cli`: user moves, Export/Import-CsUserData and pool status,
  over one pool's control API;
- :mod:`.lab_cli`: Backup Service sync and status, CMS failover and status,
  pool failover and failback;
- :mod:`.cli`: the ``admin`` command group.
"""
