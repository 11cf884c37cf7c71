"""`sipdrill lab up|down|status|fault|heal` and `sipdrill drill run|validate`."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from sipdrill.errors import ConfigFileError, FaultError, OperationError
from sipdrill.orchestrator.drill import LoadedDrill, load_drill
from sipdrill.orchestrator.engine import DrillEngine, DrillInterrupted, Report, signals_interrupt
from sipdrill.orchestrator.local_runtime import LOCAL_FAULTS, LocalRuntime
from sipdrill.orchestrator.plan import RuntimeKind, lab_plan
from sipdrill.topology_cli import load_or_exit

lab_app = typer.Typer(help="Start, inspect, break and stop a lab.", no_args_is_help=True)
drill_app = typer.Typer(help="Run drills (scenarios) on a lab.", no_args_is_help=True)

DEFAULT_STATE = Path(".lab")


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr)


def _progress(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    _console(stderr=True).print(f"[dim]{stamp}[/dim] {message}", highlight=False)


def _fail(message: str) -> typer.Exit:
    _console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def _runtime(kind: RuntimeKind, lab: str, state_dir: Path) -> LocalRuntime:
    if kind is RuntimeKind.LOCAL:
        return LocalRuntime(lab, state_dir / lab, progress=_progress)
    raise _fail(
        "the docker runtime is not wired into the CLI yet; use --runtime local "
        "(the image and faults are built by `make image`)"
    )


RUNTIME_OPT = typer.Option(RuntimeKind.LOCAL, "--runtime", help="docker or local")
STATE_OPT = typer.Option(DEFAULT_STATE, "--state-dir", help="Where labs keep their state.")


@lab_app.command("up")
def lab_up(
    topology: Path = typer.Argument(..., help="The topology YAML file."),
    runtime: RuntimeKind = RUNTIME_OPT,
    clients: int = typer.Option(0, "--clients", min=0, help="Simulated endpoints to start."),
    clients_processes: int = typer.Option(1, "--clients-processes", min=1),
    state_dir: Path = STATE_OPT,
    timeout: float = typer.Option(90.0, "--timeout", help="Seconds to wait for each service."),
) -> None:
    """Start every service of a topology and wait until each is healthy."""
    t = load_or_exit(topology).topology
    rt = _runtime(runtime, t.name, state_dir)
    specs = lab_plan(
        t,
        runtime,
        topology_path=str(topology.resolve()),
        state_dir=str((state_dir / t.name).resolve()),
        clients=clients,
        clients_processes=clients_processes,
    )
    try:
        rt.up(specs, timeout=timeout)
    except OperationError as exc:
        raise _fail(exc.message) from None
    _print_status(rt.status())


@lab_app.command("down")
def lab_down(
    name: str = typer.Argument(..., help="The lab's name (the topology's `name:`)."),
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Heal every fault and stop everything the lab started."""
    stopped = _runtime(runtime, name, state_dir).down()
    _console().print(f"stopped {len(stopped)} service(s): {', '.join(stopped) or '-'}")


@lab_app.command("status")
def lab_status(
    name: str = typer.Argument(..., help="The lab's name."),
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Show each service: role, address, health."""
    rows = _runtime(runtime, name, state_dir).status()
    if not rows:
        raise _fail(f"no lab {name!r} is running from {state_dir}")
    _print_status(rows)


def _print_status(rows: list[dict[str, Any]]) -> None:
    table = Table(title="lab")
    for col in ("name", "role", "address", "pid", "health"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in ("name", "role", "address", "pid", "health")))
    _console().print(table)


@lab_app.command("fault")
def lab_fault(
    name: str = typer.Argument(..., help="The lab's name."),
    kind: str = typer.Argument(..., help=f"one of: {', '.join(LOCAL_FAULTS)} (local runtime)"),
    target: str = typer.Argument(..., help="a service (pool1, dns...) or a site"),
    mode: str | None = typer.Option(None, "--mode", help="dns-outage: drop or servfail"),
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Inject a fault by hand; `sipdrill lab heal` (or `lab down`) undoes it."""
    params = {"mode": mode} if mode else {}
    try:
        fault = _runtime(runtime, name, state_dir).inject(kind, target, **params)
    except (FaultError, OperationError) as exc:
        raise _fail(str(exc)) from None
    _console().print(f"fault {fault['id']}: {kind} on {target}")


@lab_app.command("heal")
def lab_heal(
    name: str = typer.Argument(..., help="The lab's name."),
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Undo every fault of the lab."""
    _runtime(runtime, name, state_dir).heal_all()
    _console().print("every fault healed")


def _load_drill_or_exit(path: Path) -> LoadedDrill:
    try:
        return load_drill(path)
    except ConfigFileError as exc:
        for issue in exc.issues:
            _console(stderr=True).print(f"[red]{issue}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@drill_app.command("validate")
def drill_validate(scenario: Path = typer.Argument(..., help="The drill YAML file.")) -> None:
    """Check a drill file (and its topology with the drill's timers)."""
    loaded = _load_drill_or_exit(scenario)
    _console().print(
        f"[green]{scenario}: valid[/green] — {len(loaded.drill.steps)} step(s) on "
        f"{loaded.topology.name}, {loaded.drill.clients.count} client(s)",
        highlight=False,
    )


@drill_app.command("run")
def drill_run(
    scenario: Path = typer.Argument(..., help="The drill YAML file."),
    runtime: RuntimeKind | None = typer.Option(
        None, "--runtime", help="Override the drill's runtime."
    ),
    clients: int | None = typer.Option(None, "--clients", help="Override the client count."),
    state_dir: Path = STATE_OPT,
    report_dir: Path = typer.Option(Path("reports"), "--report-dir"),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab running after the drill."),
) -> None:
    """Start the lab, run the drill's steps, heal every fault, write the report,
    and stop the lab. Exit 0 if the drill passed, 1 otherwise."""
    from sipdrill.orchestrator.live import LiveLab

    loaded = _load_drill_or_exit(scenario)
    d = loaded.drill
    kind = runtime or RuntimeKind(d.runtime)
    t = loaded.topology
    lab_dir = (state_dir / t.name).resolve()
    lab_dir.mkdir(parents=True, exist_ok=True)
    topo_file = lab_dir / "topology.yaml"  # the topology with the drill's timers
    topo_file.write_text(loaded.topology_yaml)
    rt = _runtime(kind, t.name, state_dir)
    n_clients = d.clients.count if clients is None else clients
    specs = lab_plan(
        t,
        kind,
        topology_path=str(topo_file),
        state_dir=str(lab_dir),
        clients=n_clients,
        clients_processes=d.clients.processes,
    )
    out_dir = report_dir / f"{d.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    report: Report | None = None
    with signals_interrupt():
        try:
            _progress(f"starting lab {t.name} ({kind.value} runtime, {len(specs)} services)")
            try:
                rt.up(specs)
            except OperationError as exc:
                # No lab, no drill: still leave a report that says why.
                report = Report(
                    d.name,
                    loaded.topology_path,
                    kind.value,
                    time.time(),
                    status="failed",
                    error=f"the lab did not start: {exc.message}",
                    healed=True,
                )
                raise
            live = LiveLab(
                rt,
                t,
                specs,
                rt.token,
                loopback=kind is RuntimeKind.LOCAL,
                topology_path=str(topo_file),
            )
            try:
                report = DrillEngine(loaded, live, progress=_progress).run()
            finally:
                live.close()
        except DrillInterrupted as exc:
            raise _fail(f"drill interrupted ({exc}); every fault healed") from None
        except OperationError as exc:
            raise _fail(exc.message) from None
        finally:
            if not keep:
                with contextlib.suppress(Exception):
                    rt.down()
            if report is not None:
                j, m = report.write(out_dir)
                _console().print(report.to_markdown())
                _console().print(f"report: {m} and {j}")
    if report is None or report.status != "passed":
        raise typer.Exit(1)
