"""`sipdrill lab up|down|status|fault|heal` and `sipdrill drill run|validate`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from sipdrill.errors import ConfigFileError, FaultError, OperationError
from sipdrill.orchestrator.compose import (
    DEFAULT_PORT_BASE,
    PROJECT_VARIABLE,
    ComposeOptions,
    docker_plan,
    project_name,
    write_env_file,
)
from sipdrill.orchestrator.compose import command_line as compose_command_line
from sipdrill.orchestrator.compose import generate as generate_compose
from sipdrill.orchestrator.drill import LoadedDrill, load_drill
from sipdrill.orchestrator.engine import DrillInterrupted
from sipdrill.orchestrator.fault_model import RUNTIME_FAULTS, FaultKind, parse_fault_request
from sipdrill.orchestrator.labels import LAB as LAB_LABEL
from sipdrill.orchestrator.local_runtime import LocalRuntime
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec, lab_plan
from sipdrill.orchestrator.report import Report
from sipdrill.orchestrator.runtime import Runtime
from sipdrill.topology import Topology
from sipdrill.topology_cli import load_or_exit

if TYPE_CHECKING:  # imported when used: the docker SDK costs every `sipdrill` command 0.1 s
    from sipdrill.orchestrator.capture import Capture
    from sipdrill.orchestrator.engine import DrillEngine

T = TypeVar("T")

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


def _runtime(
    kind: RuntimeKind,
    lab: str,
    state_dir: Path,
    topology_file: Path | None = None,
    progress: Callable[[str], None] = _progress,
    lease: float | None = None,
) -> Runtime:
    """The runtime of a lab: its state lives in ``<state_dir>/<lab>``. The docker
    and swarm runtimes need the topology file (in their containers) to start a
    lab; ``lease``: how long swarm's fault agents keep a fault unrenewed."""
    if kind is RuntimeKind.LOCAL:
        return LocalRuntime(lab, state_dir / lab, progress=progress)
    if kind is RuntimeKind.SWARM:
        from sipdrill.orchestrator.swarm_lab import SwarmLab

        return SwarmLab(
            lab, state_dir / lab, progress=progress, topology_file=topology_file, lease=lease
        )
    from sipdrill.orchestrator.docker_lab import DockerLab

    return DockerLab(lab, state_dir / lab, progress=progress, topology_file=topology_file)


def _plan(
    kind: RuntimeKind,
    t: Topology,
    topology_file: Path,
    lab_dir: Path,
    clients: int,
    clients_processes: int,
    client_args: tuple[str, ...] = (),
) -> list[ServiceSpec]:
    """The lab plan with the paths its processes see: the host's for the local
    runtime, the containers' for docker (the file is mounted there)."""
    if kind in (RuntimeKind.DOCKER, RuntimeKind.SWARM):
        return docker_plan(
            t, clients=clients, clients_processes=clients_processes, client_args=client_args
        )
    return lab_plan(
        t,
        kind,
        topology_path=str(topology_file.resolve()),
        state_dir=str(lab_dir.resolve()),
        clients=clients,
        clients_processes=clients_processes,
        client_args=client_args,
    )


RUNTIME_OPT = typer.Option(RuntimeKind.LOCAL, "--runtime", help="local, docker or swarm")
STATE_OPT = typer.Option(DEFAULT_STATE, "--state-dir", help="Where labs keep their state.")


@lab_app.command("up")
def lab_up(
    topology: Path = typer.Argument(..., help="The topology YAML file."),
    runtime: RuntimeKind = RUNTIME_OPT,
    clients: int = typer.Option(0, "--clients", min=0, help="Simulated endpoints to start."),
    clients_processes: int = typer.Option(
        1, "--clients-processes", min=1, help="Clients processes the clients are spread over."
    ),
    state_dir: Path = STATE_OPT,
    timeout: float = typer.Option(90.0, "--timeout", help="Seconds to wait for each service."),
) -> None:
    """Start every service of a topology and wait until each is healthy."""
    t = load_or_exit(topology).topology
    rt = _runtime(runtime, t.name, state_dir, topology)
    specs = _plan(runtime, t, topology, state_dir / t.name, clients, clients_processes)
    try:
        rt.up(specs, timeout=timeout)
    except OperationError as exc:
        raise _fail(exc.message) from None
    _print_status(rt.status())


@lab_app.command("compose")
def lab_compose(
    topology: Path = typer.Argument(..., help="The topology YAML file."),
    clients: int = typer.Option(
        50, "--clients", min=0, help="Simulated endpoints per clients replica."
    ),
    clients_processes: int = typer.Option(
        1, "--clients-processes", min=1, help="Clients replicas (the file's `scale:`)."
    ),
    lab: str | None = typer.Option(
        None, "--lab", help="Label and container-name prefix (default: the topology's name)."
    ),
    port_base: int = typer.Option(
        DEFAULT_PORT_BASE,
        "--port-base",
        min=0,
        max=65000,
        help="Publish control APIs on 127.0.0.1 from this port (0: ephemeral ports).",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        dir_okay=False,
        help="Write the file here, and the project name (COMPOSE_PROJECT_NAME) to the "
        ".env beside it, instead of printing the file.",
    ),
) -> None:
    """Print the Compose file of a topology's lab: `sipdrill lab compose
    topologies/paired-pools.yaml -o compose.yaml` (or `> compose.yaml`), then
    `docker-compose up -d` in that directory. A relative topology path stays
    relative (to the directory of the file)."""
    t = load_or_exit(topology).topology
    source = str(topology)
    if not topology.is_absolute() and not source.startswith("."):
        source = f"./{source}"
    options = ComposeOptions(lab=lab or t.name, topology_source=source, port_base=port_base or None)
    try:
        text = generate_compose(
            t,
            options,
            clients=clients * clients_processes,
            clients_processes=clients_processes,
            command=compose_command_line(t, str(topology), options, clients, clients_processes),
        )
    except OperationError as exc:
        raise _fail(exc.message) from None
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
        env = write_env_file(
            output.parent, {PROJECT_VARIABLE: project_name(options.lab)}
        )
    except OSError as exc:
        raise _fail(f"{output}: {exc.strerror or exc}") from None
    _console(stderr=True).print(
        f"wrote {output} and {env} ({PROJECT_VARIABLE}={project_name(options.lab)})",
        highlight=False,
    )


def _lab_name(given: str | None, state_dir: Path, runtime: RuntimeKind) -> str:
    """The lab a command means: a name, a topology file (its `name:`), or, when
    none is given, the only lab of this runtime with its state in ``state_dir``."""
    if given is not None:
        if given.endswith((".yaml", ".yml")) or Path(given).is_file():
            return load_or_exit(Path(given)).topology.name
        return given
    state_file = {
        RuntimeKind.LOCAL: "lab.json",
        RuntimeKind.DOCKER: "docker-lab.json",
        RuntimeKind.SWARM: "swarm-lab.json",
    }[runtime]
    labs = sorted(d.name for d in state_dir.glob("*") if (d / state_file).is_file())
    where = str(state_dir)
    if not labs and runtime is RuntimeKind.DOCKER:
        labs = sorted(_docker_labs())  # started with docker-compose: no state here
        where = "the Docker engine"
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise _fail(
            f"no {runtime.value} lab has its state in {state_dir}"
            + (" or containers on the Docker engine" if runtime is RuntimeKind.DOCKER else "")
            + ": name one "
            "(or its topology file), or start one with `sipdrill lab up TOPOLOGY`"
            + ("" if runtime is not RuntimeKind.LOCAL else " (a docker lab? add --runtime docker)")
        )
    raise _fail(f"{len(labs)} labs in {where} ({', '.join(labs)}): name the one you mean")


def _docker_labs() -> set[str]:
    """The labs with a container on the Docker engine (none if it does not answer)."""
    from sipdrill.orchestrator.docker_lab_faults import lab_engine

    try:
        with lab_engine() as rt:
            return {
                str(c.labels[LAB_LABEL])
                for c in rt.client.containers.list(all=True, filters={"label": LAB_LABEL})
                if c.labels.get(LAB_LABEL)
            }
    except OperationError:
        return set()


LAB_ARG = typer.Argument(
    None,
    help="The lab: its name (the topology's `name:`) or its topology file; "
    "default: the only lab running from --state-dir.",
    show_default=False,
)


def _on_lab(
    name: str | None, runtime: RuntimeKind, state_dir: Path, action: Callable[[Runtime], T]
) -> tuple[str, T]:
    """``action`` on the lab a command means; a refusal exits 1 with its message."""
    lab = _lab_name(name, state_dir, runtime)
    try:
        return lab, action(_runtime(runtime, lab, state_dir))
    except (FaultError, OperationError) as exc:
        raise _fail(exc.message if isinstance(exc, OperationError) else str(exc)) from None


@lab_app.command("down")
def lab_down(
    name: str | None = LAB_ARG,
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Heal every fault and stop everything the lab started."""
    _, stopped = _on_lab(name, runtime, state_dir, lambda rt: rt.down())
    _console().print(f"stopped {len(stopped)} service(s): {', '.join(stopped) or '-'}")


@lab_app.command("status")
def lab_status(
    name: str | None = LAB_ARG,
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Show each service: role, address, health."""
    lab, rows = _on_lab(name, runtime, state_dir, lambda rt: rt.status())
    if not rows:
        raise _fail(f"no lab {lab!r} is running from {state_dir}")
    _print_status(rows)
    if runtime is RuntimeKind.SWARM:
        _on_lab(lab, runtime, state_dir, lambda rt: _print_nodes(rt.nodes()))  # type: ignore[attr-defined]


def _print_nodes(rows: list[dict[str, Any]]) -> None:
    """The swarm's nodes and what runs on each (the lab's placement)."""
    table = Table(title="nodes")
    for col in rows[0] if rows else ():
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    _console().print(table)


def _print_status(rows: list[dict[str, Any]]) -> None:
    table = Table(title="lab")
    # pid for processes (local runtime), container for docker.
    columns = [
        c
        for c in ("name", "role", "address", "pid", "node", "container", "health")
        if any(c in r for r in rows)
    ]
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    _console().print(table)


@lab_app.command("fault")
def lab_fault(
    name: str = typer.Argument(
        ..., help="The lab: its name (the topology's `name:`) or its topology file."
    ),
    kind: str = typer.Argument(
        ...,
        help=f"local runtime: {', '.join(RUNTIME_FAULTS[RuntimeKind.LOCAL])}; "
        f"docker: {', '.join(FaultKind)}",
    ),
    target: str = typer.Argument(..., help="a service (pool1, dns...) or a site"),
    mode: str | None = typer.Option(None, "--mode", help="dns-outage: drop or servfail"),
    peer: str | None = typer.Option(None, "--peer", help="partition: the other site"),
    delay_ms: int | None = typer.Option(None, "--delay-ms", help="degrade: added latency"),
    jitter_ms: int | None = typer.Option(None, "--jitter-ms", help="degrade: jitter"),
    loss_percent: float | None = typer.Option(None, "--loss-percent", help="degrade: loss"),
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
    lease: float = typer.Option(
        900.0, "--lease", min=1, help="swarm: the fault agents heal it after this many "
        "seconds unless renewed (this command exits; nothing renews it)",
    ),
) -> None:
    """Inject a fault by hand; `sipdrill lab heal` (or `lab down`) undoes it."""
    given = {
        "mode": mode,
        "peer": peer,
        "delay_ms": delay_ms,
        "jitter_ms": jitter_ms,
        "loss_percent": loss_percent,
    }
    params = {k: v for k, v in given.items() if v is not None}
    name = _lab_name(name, state_dir, runtime)
    try:
        request = parse_fault_request(kind, target, params, runtime)
        fault = _runtime(runtime, name, state_dir, lease=lease).apply(request)
    except (FaultError, OperationError) as exc:
        raise _fail(str(exc)) from None
    _console().print(f"fault {fault['id']}: {kind} on {target}")


@lab_app.command("heal")
def lab_heal(
    name: str | None = LAB_ARG,
    runtime: RuntimeKind = RUNTIME_OPT,
    state_dir: Path = STATE_OPT,
) -> None:
    """Undo every fault of the lab."""
    _on_lab(name, runtime, state_dir, lambda rt: rt.heal_all())
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
    report_dir: Path = typer.Option(
        Path("reports"), "--report-dir", help="Where the report folder is made."
    ),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab running after the drill."),
    junit: Path | None = typer.Option(
        None, "--junit", help="Also write the result as JUnit XML (steps and expectations)."
    ),
    capture: bool = typer.Option(
        False,
        "--capture",
        help="Record the lab's traffic (local runtime: loopback, the lab's addresses only) "
        "and check each client's registration events against the 200 OKs on the wire.",
    ),
) -> None:
    """Start the lab, run the drill's steps, heal every fault, write the report,
    and stop the lab. Exit 0 if every step and expectation held, 1 if one did
    not, 2 if the lab could not be run, 130 if interrupted (Ctrl-C, SIGTERM)."""
    loaded = _load_drill_or_exit(scenario)
    kind = runtime or RuntimeKind(loaded.drill.runtime)
    out_dir = report_dir / f"{loaded.drill.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if capture and kind is not RuntimeKind.LOCAL:
        raise _fail("--capture records the local runtime's loopback lab; use --runtime local")
    if kind is RuntimeKind.SWARM:
        from sipdrill.orchestrator.swarm_stack import front_ends_issue

        issue = front_ends_issue(loaded.topology, loaded.topology_path)
        if issue is not None:  # the lab cannot be run: exit 2, before anything starts
            # The issue says "FILE:LINE: error: FIELD: ...", as a bad drill file's do.
            _console(stderr=True).print(f"[red]{issue}[/red]", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    report = run_drill(loaded, kind, clients, state_dir, out_dir, keep=keep, capture=capture)
    if junit is not None:
        from sipdrill.orchestrator.junit import write_junit

        write_junit(report, junit)
    raise typer.Exit(report.exit_code)


@drill_app.command("compare")
def drill_compare(
    reports: list[Path] = typer.Argument(
        ..., help="Report folders (or their report.json); the first is the baseline."
    ),
    html: Path | None = typer.Option(
        None, "--html", help="Also write the comparison as a page with the CDFs overlaid."
    ),
    fail_if_slower: float | None = typer.Option(
        None,
        "--fail-if-slower",
        min=0,
        help="Exit 1 when a time (RTO, a step metric, a per-client p50/p95/max) of a later "
        "report is more than PCT percent above the baseline's.",
        metavar="PCT",
    ),
) -> None:
    """Put drill reports side by side: RTO, RPO, step metrics and per-client
    percentiles, with the change from the first report."""
    from sipdrill.orchestrator.compare import compare, compare_html, load_report

    try:
        loaded = [load_report(p) for p in reports]
    except OperationError as exc:
        raise _fail(exc.message) from None
    result = compare(loaded, fail_if_slower)
    table = Table(box=None, pad_edge=False)
    table.add_column("metric", no_wrap=True)
    for i, label in enumerate(result.labels):
        table.add_column(label if i == 0 else f"{label} (vs first)", justify="right", no_wrap=True)
    for name, values in result.rows:
        base = values[0]
        cells = []
        for i, v in enumerate(values):
            text = "-" if v is None else f"{v:.1f}"
            if i and v is not None and base:
                text += f" ({(v - base) / base * 100:+.0f} %)"
            cells.append(text)
        table.add_row(name, *cells)
    console = _summary_console()
    console.print(table)
    if html is not None:
        html.write_text(compare_html(loaded, result), encoding="utf-8")
        console.print(f"comparison: {html}", highlight=False)
    if result.regressions:
        for r in result.regressions:
            console.print(f"[red]slower:[/red] {r}", highlight=False)
        raise typer.Exit(1)


@drill_app.command("compare-designs")
def drill_compare_designs(
    designs: list[str] = typer.Option(
        [],
        "--design",
        help="Run only these (paired, backup-registrar, budget-dr; repeat the option); "
        "default: all three.",
    ),
    hold: float = typer.Option(
        0.0,
        "--hold",
        min=0,
        max=3600,
        help="Seconds the outage is held before the first recovery (the administrators' "
        "reaction; 0 in the shipped drills).",
    ),
    lync_timers: bool = typer.Option(
        False,
        "--lync-timers",
        help="Lync's default timers (failover detection 120 s, failback 240 s, keep-alive "
        "120 s, sync 120 s) and the zone's DNS TTL instead of the drills' shortened ones: "
        "minutes per design, not seconds.",
    ),
    loopback_network: str | None = typer.Option(
        None,
        "--loopback-network",
        help="The labs' loopback /16 (default: the topologies', 127.77.0.0/16); another one "
        "when a lab of the same topology may be running.",
        metavar="NET",
    ),
    state_dir: Path = STATE_OPT,
    report_dir: Path = typer.Option(
        Path("reports"), "--report-dir", help="Where the comparison folder is made."
    ),
    tables_only: Path | None = typer.Option(
        None,
        "--tables-only",
        help="Run nothing: rebuild the table of a comparison folder from its reports.",
        metavar="DIR",
    ),
) -> None:
    """Run the seeds' three resiliency designs (paired pools with pool
    failover, backup registrar only, budget DR) one after another on the local
    runtime, with calls in every one, and put them in one table: time to
    limited service, to full service, to home, RTO, RPO, calls during the
    outage (designs.md, designs.html, designs.svg beside each design's own
    report). Exit 0 when every design's drill passed, 1 otherwise, 130 if
    interrupted."""
    from sipdrill.orchestrator.designs import design_row as row_of
    from sipdrill.orchestrator.designs import load_results, run_designs, write_tables

    display = _summary_console()

    def progress(message: str) -> None:
        display.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)

    try:
        if tables_only is not None:
            results = load_results(tables_only)
            rows = [row_of(r, f, str(folder)) for r, f, folder in results]
            write_tables(tables_only, rows, [f for _r, f, _ in results])
            out = tables_only
        else:
            out = report_dir / f"designs-{time.strftime('%Y%m%d-%H%M%S')}"
            # The shipped drills: this checkout's, or the one sipdrill runs from.
            repo = Path.cwd()
            if not (repo / "scenarios").is_dir():
                repo = Path(__file__).resolve().parents[2]

            def run_one(loaded: LoadedDrill, folder: Path) -> Report:
                # Each design its own state folder: two designs share a topology.
                lab_state = state_dir / folder.name
                return run_drill(loaded, RuntimeKind.LOCAL, None, lab_state, folder, summary=False)

            rows = run_designs(
                repo,
                out,
                run_one,
                progress,
                keys=designs,
                hold=hold,
                lync_timers=lync_timers,
                loopback_network=loopback_network,
            )
    except ConfigFileError as exc:
        for issue in exc.issues:
            _console(stderr=True).print(f"[red]{issue}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OperationError as exc:
        raise _fail(exc.message) from None
    _print_designs(display, rows)
    display.print(
        f"designs: {out / 'designs.html'}, {out / 'designs.md'}, {out / 'designs.svg'}",
        highlight=False,
    )
    statuses = {r.status for r in rows}
    if "interrupted" in statuses:
        raise typer.Exit(130)
    if statuses != {"passed"}:
        raise typer.Exit(1)


def _print_designs(console: Console, rows: list[Any]) -> None:
    from sipdrill.orchestrator.designs import COLUMNS

    table = Table(box=None, pad_edge=False, show_lines=True)
    table.add_column("design", max_width=28)
    table.add_column("status")
    for _key, heading in COLUMNS:
        table.add_column(heading, max_width=26)
    for r in rows:
        table.add_row(r.title, r.status, *(r.cells[k].text for k, _h in COLUMNS))
    console.print(table)


@drill_app.command("sweep")
def drill_sweep(
    scenario: Path = typer.Argument(..., help="The drill YAML file."),
    sets: list[str] = typer.Option(
        ...,
        "--set",
        help="FIELD=V1,V2,... a field of the drill file and its values, e.g. "
        "timers.failover_detection_interval=30,60,120; repeat --set for a grid.",
        metavar="FIELD=V1,V2",
    ),
    repeat: int = typer.Option(1, "--repeat", min=1, max=100, help="Runs per setting."),
    runtime: RuntimeKind = typer.Option(
        RuntimeKind.LOCAL, "--runtime", help="docker or local (default: local, the fastest)"
    ),
    state_dir: Path = STATE_OPT,
    report_dir: Path = typer.Option(
        Path("reports"), "--report-dir", help="Where the sweep folder is made."
    ),
) -> None:
    """Run a drill once per setting (every combination of the --set values),
    then plot each metric (p50, p95, max and the RTO) against the setting:
    sweep.html, sweep.md and sweep.json beside each run's own report. Exit 0
    when every run passed, 1 otherwise, 130 if interrupted."""
    import yaml

    from sipdrill.orchestrator.sweep import Sweep, apply_settings, parse_set, render_sweep

    try:
        grid = [parse_set(s) for s in sets]
    except OperationError as exc:
        raise _fail(exc.message) from None
    raw = yaml.safe_load(scenario.read_text(encoding="utf-8")) if scenario.exists() else None
    base = _load_drill_or_exit(scenario)
    assert isinstance(raw, dict)  # loaded above: a mapping
    raw["topology"] = base.topology_path  # the variants live in the sweep folder
    sweep = Sweep.plan(base.drill.name, grid, repeat)
    out = report_dir / f"{base.drill.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for i, settings in enumerate(sweep.grid):
        try:
            text = yaml.safe_dump(apply_settings(raw, settings), sort_keys=False)
        except OperationError as exc:
            raise _fail(exc.message) from None
        path = out / f"drill-{i + 1}.yaml"
        path.write_text(text, encoding="utf-8")
        variants.append(_load_drill_or_exit(path))  # a bad value is named here, before any run
    display = _summary_console()

    def progress(message: str) -> None:
        display.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)

    def run_one(i: int, settings: dict[str, Any], r: int) -> tuple[Report, Path]:
        # By position: `--set x=30,30` runs twice, in two folders.
        folder = out / (f"run-{i + 1}" + (f"-{r + 1}" if repeat > 1 else ""))
        report = run_drill(variants[i], runtime, None, state_dir, folder, summary=False)
        return report, folder

    sweep.run(run_one, progress)
    (out / "sweep.json").write_text(json.dumps(sweep.to_json(), indent=2, default=str))
    (out / "sweep.md").write_text(
        f"# Sweep of {base.drill.name}\n\n" + "\n".join(sweep.table()) + "\n"
    )
    (out / "sweep.html").write_text(render_sweep(sweep), encoding="utf-8")
    for line in sweep.table():
        display.print(line, highlight=False, soft_wrap=True)
    display.print(f"sweep: {out / 'sweep.html'}, {out / 'sweep.md'}", highlight=False)
    statuses = {p.status for p in sweep.points}
    if "interrupted" in statuses:
        raise typer.Exit(130)
    if statuses != {"passed"}:
        raise typer.Exit(1)


def _check_capture(
    recorder: Capture,
    engine: DrillEngine,
    specs: list[ServiceSpec],
    report: Report,
    log: Callable[[str], None],
) -> None:
    """The wire against the events: the report's ``fidelity`` section."""
    from sipdrill.orchestrator.capture import fidelity

    try:
        log(f"reading the capture ({recorder.pcap.stat().st_size // 1024} KiB) with tshark")
        oks = recorder.register_oks()
        clients = [s.address for s in specs if s.role is Role.CLIENTS]
        # Up to the drill's end: the events cover the clients from their start,
        # and a clients process being stopped asks DNS again, unrecorded.
        dns = recorder.dns_queries(clients, 0.0, report.started_wall + report.duration)
        report.measurements["fidelity"] = fidelity(engine.timeline, oks, dns)
    except Exception as exc:  # the report is still written, saying why
        report.measurements["fidelity"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _summary_console() -> Console:
    from sipdrill.orchestrator.terminal import summary_console

    return summary_console()


def _docker_running(rt: Runtime) -> bool:
    from sipdrill.orchestrator.docker_lab import DockerLab

    return isinstance(rt, DockerLab) and rt.running()


def _attach(rt: Runtime, t: Topology, clients: int) -> list[str]:
    from sipdrill.orchestrator.docker_lab import DockerLab

    assert isinstance(rt, DockerLab)
    return rt.attach(t, clients)


def run_drill(
    loaded: LoadedDrill,
    kind: RuntimeKind,
    clients: int | None,
    state_dir: Path,
    out_dir: Path,
    *,
    keep: bool = False,
    summary: bool = True,
    capture: bool = False,
) -> Report:
    """One drill, start to end, with its report written to ``out_dir``. Never
    raises for a drill that failed or a lab that did not start: the report
    says so (status ``error`` when the lab could not be run)."""
    from sipdrill.orchestrator.engine import (
        INTERRUPTS,
        DrillEngine,
        deferred_interrupts,
        signals_interrupt,
    )
    from sipdrill.orchestrator.live import LiveLab
    from sipdrill.orchestrator.terminal import DrillDisplay, print_summary

    d = loaded.drill
    t = loaded.topology
    lab_dir = (state_dir / t.name).resolve()
    lab_dir.mkdir(parents=True, exist_ok=True)
    # The topology with the drill's timers; written when the drill starts a lab
    # (a running docker lab may mount this very file).
    topo_file = lab_dir / "topology.yaml"
    display = DrillDisplay()
    rt = _runtime(kind, t.name, state_dir, topo_file, progress=display.log)
    n_clients = d.clients.count if clients is None else clients
    specs = _plan(
        kind, t, topo_file, lab_dir, n_clients, d.clients.processes, d.clients.process_args()
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(d.name, loaded.topology_path, kind.value, time.time())
    recorder = None
    engine: DrillEngine | None = None
    ours = True  # the drill started the lab (else it attached to a running one)
    lab_info: dict[str, Any] = {"attached": False, "notes": []}
    if capture:
        from sipdrill.orchestrator.capture import Capture

        try:
            recorder = Capture(out_dir / "capture", str(t.lab.loopback_network))
        except OperationError as exc:
            report.status, report.error, report.healed = "error", exc.message, True
            report.write(out_dir)
            if summary:
                print_summary(report, out_dir)
            return report
        keys = ("SSLKEYLOGFILE", str(recorder.keylog.resolve()))
        specs = [
            dataclasses.replace(s, env=(*s.env, keys)) if s.role is Role.CLIENTS else s
            for s in specs
        ]
    with (
        signals_interrupt(display.log),
        (out_dir / "events.jsonl").open("w", encoding="utf-8") as events,
    ):
        try:
            try:
                # A docker lab already running (docker-compose up, a drill run with
                # --keep) is the drill's lab; one it did not start, it leaves up.
                if kind is RuntimeKind.DOCKER and _docker_running(rt):
                    ours = False
                    display.log(f"lab {t.name} is already up: the drill runs on it")
                    lab_info = {"attached": True, "notes": _attach(rt, t, n_clients)}
                    for note in lab_info["notes"]:
                        display.log(note)
                else:
                    topo_file.write_text(loaded.topology_yaml)
                    display.log(
                        f"starting lab {t.name} ({kind.value} runtime, {len(specs)} services)"
                    )
                    if recorder is not None:
                        recorder.start()
                        display.log(f"capturing the lab's traffic to {recorder.pcap}")
                    rt.up(specs)
            except OperationError as exc:
                # No lab, no drill: still leave a report that says why.
                report.status, report.healed = "error", True
                report.error = (
                    f"the lab did not start: {exc.message}"
                    if ours
                    else f"the running lab cannot run this drill: {exc.message}"
                )
                raise
            live = LiveLab(
                rt,
                t,
                rt.live_specs(specs),
                rt.token,
                loopback=kind is RuntimeKind.LOCAL,
                topology_path=str(topo_file),
            )
            try:
                with display:
                    engine = DrillEngine(
                        loaded,
                        live,
                        progress=display.log,
                        runtime=kind.value,
                        events=events,
                        background_events=True,
                        on_tick=display.tick,
                        chaos_dir=out_dir,
                    )
                    report = engine.run()
            finally:
                live.close()
        except DrillInterrupted as exc:
            report.status, report.error, report.healed = "interrupted", str(exc), True
        except OperationError as exc:
            if report.status != "error":
                report.status, report.error = "error", exc.message
        except Exception as exc:  # a bug or an OS error: still a report, exit 2
            report.status, report.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            with deferred_interrupts():
                if not ours:
                    display.log(f"lab {t.name} stays up: it was running before the drill")
                elif not keep:
                    display.log("stopping the lab")
                    with contextlib.suppress(Exception):
                        rt.down()
                try:
                    if recorder is not None:
                        recorder.stop()
                        if engine is not None:
                            _check_capture(recorder, engine, specs, report, display.log)
                finally:
                    report.lab = lab_info
                    if INTERRUPTS.pending is not None and report.status != "interrupted":
                        report.status = "interrupted"
                        report.error = f"interrupted by signal {INTERRUPTS.pending}"
                    report.write(out_dir)
    if summary:
        print_summary(report, out_dir)
    return report
