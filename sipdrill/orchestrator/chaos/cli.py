"""`sipdrill chaos run|check|plan`."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from sipdrill.errors import OperationError, TopologyError
from sipdrill.orchestrator.chaos.checker import Verdict, check
from sipdrill.orchestrator.chaos.history import History, load_history
from sipdrill.orchestrator.chaos.nemesis import LabShape, NemesisConfig, fault_kinds, schedule
from sipdrill.orchestrator.chaos.runner import ChaosResult, ChaosRunner, ChaosSettings
from sipdrill.orchestrator.cli import STATE_OPT, _plan, _progress, _runtime
from sipdrill.orchestrator.fault_model import FaultKind
from sipdrill.orchestrator.plan import RuntimeKind
from sipdrill.topology import LoadedTopology, parse_topology

chaos_app = typer.Typer(
    help="Randomised faults while clients write, then a checker over the history.",
    no_args_is_help=True,
)

#: Timers a chaos run uses unless --topology-timers: Microsoft's 120 s detection
#: and 240 s failback leave room for a handful of faults in ten minutes.
CHAOS_TIMERS: dict[str, float] = {
    "failover_detection_interval": 6,
    "failback_interval": 6,
    "keepalive_interval": 5,
    "keepalive_pong_timeout": 3,
    "sync_interval": 5,
}


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _range(text: str, name: str) -> tuple[float, float]:
    try:
        lo, _, hi = text.partition(",")
        low = float(lo)
        return low, float(hi) if hi else low
    except ValueError:
        raise _fail(f"{name}: give LOW,HIGH in seconds (e.g. 5,20), not {text!r}", 1) from None


def _kinds(text: str | None, runtime: RuntimeKind) -> tuple[FaultKind, ...]:
    wanted: list[FaultKind] = []
    for name in (text or "").split(","):
        if not name.strip():
            continue
        try:
            wanted.append(FaultKind(name.strip()))
        except ValueError:
            raise _fail(
                f"--kinds: unknown fault kind {name.strip()!r}; kinds: "
                f"{', '.join(k.value for k in FaultKind)}", 1
            ) from None
    try:
        return fault_kinds(runtime, wanted)
    except ValueError as exc:
        raise _fail(f"--kinds: {exc}", 1) from None


def _load_topology(path: Path, timers: dict[str, float]) -> tuple[LoadedTopology, str]:
    """The topology with ``timers`` over its own, and its YAML for the lab."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}", 1) from None
    except yaml.YAMLError as exc:
        raise _fail(f"{path}: not YAML: {exc}", 1) from None
    if not isinstance(raw, dict):
        raise _fail(f"{path}: not a topology (start the file with `name:`)", 1)
    if timers:
        current = raw.setdefault("timers", {})
        if isinstance(current, dict):
            current.update(timers)
    text = yaml.safe_dump(raw, sort_keys=False)
    try:
        return parse_topology(text, f"{path} (with the chaos timers)"), text
    except TopologyError as exc:
        for issue in exc.issues:
            Console(stderr=True).print(f"[red]{issue}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _config(
    duration: float, faults: int | None, kinds: tuple[FaultKind, ...], max_concurrent: int,
    gap: str, hold: str,
) -> NemesisConfig:
    try:
        return NemesisConfig(
            duration=duration, max_faults=faults, kinds=kinds, max_concurrent=max_concurrent,
            gap=_range(gap, "--gap"), hold=_range(hold, "--hold"),
        )
    except ValueError as exc:
        raise _fail(str(exc), 1) from None


TOPOLOGY_ARG = typer.Argument(..., help="The topology YAML file.")
SEED_OPT = typer.Option(
    None, "--seed", help="Seed of the nemesis and the writers (default: a random one, printed)."
)
DURATION_OPT = typer.Option(
    600.0, "--duration", min=1, help="Seconds during which faults are injected."
)
FAULTS_OPT = typer.Option(
    None, "--faults", min=1, help="Stop after this many faults (default: as the duration allows)."
)
KINDS_OPT = typer.Option(
    None, "--kinds", help="Comma-separated fault kinds (default: every kind the runtime can do)."
)
CONCURRENT_OPT = typer.Option(2, "--max-concurrent", min=1, help="Faults in force at once.")
GAP_OPT = typer.Option("3,15", "--gap", help="LOW,HIGH seconds from one injection to the next.")
HOLD_OPT = typer.Option("5,25", "--hold", help="LOW,HIGH seconds a fault stays in force.")
RUNTIME_OPT = typer.Option(RuntimeKind.LOCAL, "--runtime", help="docker or local")


@chaos_app.command("plan")
def chaos_plan(
    topology: Path = TOPOLOGY_ARG,
    seed: int = typer.Option(..., "--seed", help="Seed of the nemesis."),
    duration: float = DURATION_OPT,
    faults: int | None = FAULTS_OPT,
    kinds: str | None = KINDS_OPT,
    max_concurrent: int = CONCURRENT_OPT,
    gap: str = GAP_OPT,
    hold: str = HOLD_OPT,
    runtime: RuntimeKind = RUNTIME_OPT,
) -> None:
    """Print the nemesis's schedule for a seed, without a lab (what `chaos run`
    with the same options will do)."""
    loaded, _ = _load_topology(topology, {})
    config = _config(duration, faults, _kinds(kinds, runtime), max_concurrent, gap, hold)
    for op in schedule(seed, LabShape.from_topology(loaded.topology), config, runtime):
        typer.echo(f"{op.at:8.1f}  {op.describe()}")


@chaos_app.command("run")
def chaos_run(
    topology: Path = TOPOLOGY_ARG,
    seed: int | None = SEED_OPT,
    duration: float = DURATION_OPT,
    faults: int | None = FAULTS_OPT,
    kinds: str | None = KINDS_OPT,
    max_concurrent: int = CONCURRENT_OPT,
    gap: str = GAP_OPT,
    hold: str = HOLD_OPT,
    runtime: RuntimeKind = RUNTIME_OPT,
    clients: int = typer.Option(20, "--clients", min=1, help="Simulated endpoints."),
    home_bound: float = typer.Option(
        180.0, "--home-bound", min=1,
        help="Seconds from the end of the nemesis within which every client must be home "
        "in full service.",
    ),
    write_interval: float = typer.Option(
        0.2, "--write-interval", min=0, help="Pause between one writer's writes (seconds)."
    ),
    topology_timers: bool = typer.Option(
        False, "--topology-timers",
        help="Keep the topology's timers (default: short ones, docs/chaos.md).",
    ),
    state_dir: Path = STATE_OPT,
    out: Path | None = typer.Option(
        None, "--out", help="The run's folder (default: reports/chaos-<seed>-<time>)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab running afterwards."),
) -> None:
    """Start the lab, inject random faults on random targets at random times
    while writers add contacts, fail pools over and back by the ordering rule,
    heal everything, and check the history: history.jsonl and verdict.json in
    the run's folder. Exit 0 valid, 1 violations, 2 the lab could not be run,
    130 interrupted (every fault healed and the lab stopped on every path)."""
    from sipdrill.orchestrator.engine import (
        INTERRUPTS,
        DrillInterrupted,
        deferred_interrupts,
        signals_interrupt,
    )
    from sipdrill.orchestrator.live import LiveLab

    seed = seed if seed is not None else secrets.randbelow(1_000_000)
    loaded, text = _load_topology(topology, {} if topology_timers else CHAOS_TIMERS)
    t = loaded.topology
    config = _config(duration, faults, _kinds(kinds, runtime), max_concurrent, gap, hold)
    settings = ChaosSettings(
        seed=seed, nemesis=config, write_interval=write_interval, home_bound=home_bound
    )
    folder = out or Path("reports") / f"chaos-{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    lab_dir = (state_dir / t.name).resolve()
    lab_dir.mkdir(parents=True, exist_ok=True)
    topo_file = lab_dir / "topology.yaml"
    topo_file.write_text(text)
    _progress(
        f"chaos seed {seed}: {len(schedule(seed, LabShape.from_topology(t), config, runtime))} "
        f"operations in {duration:g} s on {t.name} ({runtime.value} runtime); "
        f"history: {folder / 'history.jsonl'}"
    )
    rt = _runtime(runtime, t.name, state_dir, topo_file)
    specs = _plan(runtime, t, topo_file, lab_dir, clients, 1)
    result: ChaosResult | None = None
    error: str | None = None
    status = "error"
    start = time.monotonic()
    with signals_interrupt(_progress), (folder / "history.jsonl").open("w") as stream:
        history = History(stream, lambda: time.monotonic() - start, time.time)
        try:
            try:
                rt.up(specs)
            except OperationError as exc:
                raise OperationError(exc.code, f"the lab did not start: {exc.message}") from None
            live = LiveLab(
                rt, t, rt.live_specs(specs), rt.token,
                loopback=runtime is RuntimeKind.LOCAL, topology_path=str(topo_file),
            )
            try:
                result = ChaosRunner(live, t, runtime, settings, history, _progress).run()
                status, error = result.status, result.error
            finally:
                live.close()
        except DrillInterrupted as exc:
            status, error = "interrupted", str(exc)
        except OperationError as exc:
            status, error = "error", exc.message
        except Exception as exc:  # a bug or an OS error: still healed, still exit 2
            status, error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            with deferred_interrupts():
                if not keep:
                    _progress("stopping the lab")
                    with contextlib.suppress(Exception):
                        rt.down()
                if INTERRUPTS.pending is not None and status != "interrupted":
                    status, error = "interrupted", f"interrupted by signal {INTERRUPTS.pending}"
    verdict = result.verdict if result is not None else None
    doc: dict[str, Any] = {
        "status": status, "error": error, "seed": seed, "runtime": runtime.value,
        "topology": str(topology), "duration": duration,
        "verdict": verdict.to_json() if verdict is not None else None,
    }
    (folder / "verdict.json").write_text(json.dumps(doc, indent=2) + "\n")
    if verdict is not None:
        _print_verdict(verdict)
    console = Console()
    console.print(
        f"chaos seed {seed}: {status.upper()}" + (f" ({error})" if error else "")
        + f"  history: {folder / 'history.jsonl'}  verdict: {folder / 'verdict.json'}",
        highlight=False, soft_wrap=True,
    )
    raise typer.Exit({"valid": 0, "invalid": 1, "interrupted": 130}.get(status, 2))


@chaos_app.command("check")
def chaos_check(
    history: Path = typer.Argument(..., help="A chaos run's history.jsonl."),
    home_bound: float | None = typer.Option(
        None, "--home-bound", help="Override the run's bound on the clients' way home."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
) -> None:
    """Check a history again (the checker is a pure function of the file).
    Exit 0 valid, 1 violations, 2 an unreadable file."""
    try:
        ops = load_history(history)
    except OperationError as exc:
        raise _fail(exc.message) from None
    verdict = check(ops, home_bound=home_bound)
    if as_json:
        typer.echo(json.dumps(verdict.to_json(), indent=2))
    else:
        _print_verdict(verdict)
    raise typer.Exit(0 if verdict.valid else 1)


def _print_verdict(verdict: Verdict) -> None:
    console = Console()
    table = Table(box=None, pad_edge=False, title="chaos figures", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in verdict.to_json()["figures"].items():
        table.add_row(name.replace("_", " "), "-" if value is None else f"{value:g}")
    console.print(table)
    for v in verdict.violations:
        console.print(f"[red]{v.rule.value}[/red]: {v.message}", highlight=False, soft_wrap=True)
    for note in verdict.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(
        "[green]valid[/green]: no violation" if verdict.valid
        else f"[red]invalid[/red]: {len(verdict.violations)} violation(s)",
        highlight=False,
    )
