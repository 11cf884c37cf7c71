"""The Central Management Store: the lab's configuration, one active master,
its standby on the partner pool, and a read-only replica in every other pool.

- :mod:`.store`: the document and a pool's replica of it, with its routes
  (mounted by the pool process);
- :mod:`.operations`: over HTTP: changes through the master, replication,
  Get-CsManagementStoreReplicationStatus, Invoke-CsManagementServerFailover.
"""
