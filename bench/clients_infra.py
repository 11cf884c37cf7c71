#!/usr/bin/env python3
"""Processes bench/clients_scale runs beside the simulator, each on 127.0.0.1 only.

    clients_infra.py registrar [--host 127.0.0.1] --port P --tls-dir DIR --name pool1.lab.local
        sipdrill's generic RFC 3261 registrar (sipdrill.sip.server.build_registrar_service,
        the code behind `sipdrill sip registrar`) on TLS, with the connection limit
        raised to 60,000 and RLIMIT_NOFILE raised to the hard limit: the CLI keeps the
        transport's default of 1,024 connections per worker.
    clients_infra.py pool --topology FILE --pool FQDN --state-dir DIR --ca DIR
        a sipdrill Front End pool: the code behind `sipdrill serve pool` (PoolService:
        registrar and backup registrar, partner heartbeats, presence, user store,
        control API), run as that command runs it, on the front end's own address
        (no --loopback: the bench's topology puts the sites in 127.0.0.0/24), with
        RLIMIT_NOFILE raised to the hard limit (the command keeps the shell's);
        --tls-workers N as `sipdrill serve pool --tls-workers N`.
    clients_infra.py dns --topology FILE
        the lab DNS server (sipdrill.dns) for the topology; every front end at its own
        address if that is a loopback address, else at 127.0.0.1.

Each prints ``ready <port>`` on stdout once it serves, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def registrar(host: str, port: int, tls_dir: str, name: str, flow_timer: int | None) -> None:
    from sipdrill.sip.server import ListenSpec, RegistrarConfig, build_registrar_service
    from sipdrill.sip.tls import ensure_server_cert, server_context
    from sipdrill.sip.transport import Kind, TransportLimits

    listen = ListenSpec(Kind.TLS, host, port)
    config = RegistrarConfig(domain="lab.local", listens=[listen])
    service = build_registrar_service(
        config, limits=TransportLimits(max_connections=60_000, idle_timeout=600.0)
    )
    if flow_timer is not None and service.registrar is not None:
        service.registrar.flow_timer = flow_timer
    short = name.split(".")[0]
    cert = ensure_server_cert(tls_dir, short, dns_names=[name, f"fe1.{name}"], ip_addresses=[host])
    bound = await service.start([listen], ssl_context=server_context(cert))
    print(f"ready {bound[0][1][1]}", flush=True)
    try:
        await _until_stopped()
    finally:
        await service.close()


async def pool(
    topology_path: str, fqdn: str, state_dir: str, ca_dir: str, tls_workers: int = 0
) -> None:
    import logging
    from pathlib import Path

    from sipdrill.pool.service import PoolService, PoolSettings
    from sipdrill.sip.server import tune_gc
    from sipdrill.topology import load_topology

    logging.basicConfig(  # as `sipdrill serve pool` sets it up
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    topology = load_topology(topology_path).topology
    settings = PoolSettings(
        pool=fqdn, state_dir=Path(state_dir), ca_dir=Path(ca_dir), tls_workers=tls_workers
    )
    async with PoolService(topology, settings) as service:
        tune_gc()  # as `sipdrill serve pool` does once the pool has started
        tls = dict(service.sip_addresses)["tls"]
        print(f"ready {tls[1]}", flush=True)
        profile = os.environ.get("SIPDRILL_BENCH_PROFILE")
        if not profile:
            await _until_stopped()
            return
        # The SIP process's own CPU (what its thread runs), for where a storm's
        # time goes: `python -m pstats FILE`.
        import cProfile
        import time

        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        try:
            await _until_stopped()
        finally:
            profiler.disable()
            profiler.dump_stats(f"{profile}.{os.getpid()}")


async def dns(topology_path: str) -> None:
    from sipdrill.dns.core import DnsCore
    from sipdrill.dns.server import DnsServer
    from sipdrill.dns.zone import ZoneStore
    from sipdrill.topology import load_topology

    topology = load_topology(topology_path).topology
    amap = {str(a): "127.0.0.1" for a in [topology.dns.address]} | {
        str(fe.address): str(fe.address) if fe.address.is_loopback else "127.0.0.1"
        for p in topology.pools
        for fe in p.front_ends
    }
    store = ZoneStore(topology, address_map=amap)
    async with DnsServer(DnsCore(store), [("127.0.0.1", 0)]) as server:
        print(f"ready {server.addresses[0][1]}", flush=True)
        await _until_stopped()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    reg = sub.add_parser("registrar")
    reg.add_argument("--host", default="127.0.0.1")
    reg.add_argument("--port", type=int, required=True)
    reg.add_argument("--tls-dir", required=True)
    reg.add_argument("--name", required=True)
    reg.add_argument("--flow-timer", type=int, default=None)
    pl = sub.add_parser("pool")
    pl.add_argument("--topology", required=True)
    pl.add_argument("--pool", required=True)
    pl.add_argument("--state-dir", required=True)
    pl.add_argument("--ca", required=True)
    pl.add_argument("--tls-workers", type=int, default=0)
    d = sub.add_parser("dns")
    d.add_argument("--topology", required=True)
    args = parser.parse_args()
    _raise_nofile()
    if args.what == "registrar":
        asyncio.run(registrar(args.host, args.port, args.tls_dir, args.name, args.flow_timer))
    elif args.what == "pool":
        asyncio.run(pool(args.topology, args.pool, args.state_dir, args.ca, args.tls_workers))
    else:
        asyncio.run(dns(args.topology))
    sys.exit(0)


if __name__ == "__main__":
    main()
