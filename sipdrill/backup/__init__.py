"""The Backup Service: ``sipdrill serve backup``, one per paired pool.

- :mod:`.service`: the replication of a pool's change feed to its partner
  (the direction's state machine, one sync cycle, the asyncio service);
- :mod:`.reconcile`: what it tells a pool that missed a failover state
  change while it was down;
- :mod:`.api`: its control API and process; :mod:`.cli`: ``sipdrill serve backup``;
- :mod:`.client`: the clients of its API, and of the whole lab (:class:`~.client.LabClients`).
"""
