"""Randomised chaos with a checker (Jepsen-style): ``sipdrill chaos run``.

* :mod:`.nemesis`: the seeded schedule of faults, heals, CMS and pool
  failovers and failbacks (pure: the same seed gives the same schedule);
* :mod:`.history`: the history file, one JSON line per operation
  (invoke, then ok, fail or info);
* :mod:`.checker`: the verdict over a history (pure), every violation named;
* :mod:`.runner`: applies the schedule to a running lab while writers add
  contacts, then reads the final state and probes for leftover faults.

See docs/chaos.md.
"""
