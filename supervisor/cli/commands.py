"""The `qlora-watch` command. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

try:
    from supervisor import __version__
except ImportError:  # another package's supervisor/__init__.py (supervisord): main() says so
    __version__ = ""

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


def _load(recipe: str, sets: list[str] | None):
    from supervisor.catalog import resolve
    from supervisor.recipe import RecipeError, load_recipe

    try:
        return load_recipe(resolve(recipe), sets or [])
    except RecipeError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _runs_dir() -> Path:
    from supervisor import paths

    return paths.runs_dir()


def _find(ref: str | None):
    from supervisor.store import RunNotFound, find_run

    try:
        return find_run(_runs_dir(), ref)
    except RunNotFound as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


# ------------------------------------------------------------------------------ commands


def cmd_preflight(args: argparse.Namespace) -> int:
    recipe = _load(args.recipe, args.set)
    if recipe.model is None:
        print(f"qlora-watch: {args.recipe}: preflight needs [model] (a [trainer]-only recipe runs a "
              "command whose model qlora-watch does not know)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from supervisor.preflight.check import run_preflight

    text, code = run_preflight(recipe, args.gpu_mem, args.host_ram, args.json)
    print(text)
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = _load(args.recipe, args.set)
    if recipe.data is None:
        print(f"{args.recipe}: ok ({recipe.name}, your command: {' '.join(recipe.trainer.command or [])})")
        return 0
    from supervisor.runner.data import DataError, check_records

    if not Path(recipe.data.path).exists():  # a template (the shipped recipes): start says it too
        print(f"{args.recipe}: ok ({recipe.name}, {recipe.model.name if recipe.model else '?'}); "
              f"note: data.path {recipe.data.path} does not exist yet, so its lines were not checked "
              "(--set data.path=/path/to/train.jsonl)")
        return 0
    try:  # every line: JSON, and the format's fields (streamed: no tokenizer, no model)
        n, fmt = check_records(recipe.data.path, recipe.data.format)
    except DataError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.recipe}: ok ({recipe.name}, {recipe.model.name if recipe.model else '?'}; "
          f"{n} records, format {fmt})")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    recipe = _load(args.recipe, args.set)
    from supervisor.catalog import resolve
    from supervisor.extras import require_for_run

    require_for_run(recipe)
    if recipe.foreign:  # a [trainer]-only recipe: the same as `qlora-watch run`
        return _create_and_launch(args, recipe, resolve(args.recipe), None, None)
    from supervisor.preflight.advice import margin_line
    from supervisor.preflight.check import estimate, render_table

    if not Path(recipe.data.path).is_file():
        print(f"qlora-watch: {args.recipe}: data.path {recipe.data.path} does not exist "
              "(set it with --set data.path=/path/to/train.jsonl)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from supervisor.runner.backends import unsloth_missing

    if missing := unsloth_missing(recipe):  # said now, not as three crashed attempts
        print(f"qlora-watch: {args.recipe}: {missing}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.geteuid() == 0:  # rented GPU boxes often only offer root; say it, don't refuse
        print("qlora-watch: note: running as root; the run's files and socket are root-only (0600)",
              file=sys.stderr)
    from supervisor import ladder

    report = estimate(recipe)
    start_rung = None
    if not report.fits:
        if args.auto_fit and report.first_fitting_rung is not None:
            start_rung = report.first_fitting_rung
            print(f"qlora-watch: --auto-fit: starting at ladder {ladder.label(start_rung)} "
                  f"({report.first_fitting_rung_desc})")
        elif not args.force:
            print(render_table(report))
            print("\nqlora-watch: not started: the estimate does not fit (use --force to try anyway)",
                  file=sys.stderr)
            return EXIT_DOES_NOT_FIT
    elif report.tight:  # started: a tight fit may well run, and the OOM ladder backs it
        print(f"qlora-watch: note: the estimate is tight ({margin_line(report)}); "
              + "; ".join(x.removeprefix("- ") for x in report.suggestions[1:]), file=sys.stderr)
    return _create_and_launch(args, recipe, resolve(args.recipe), report, start_rung)


def _create_and_launch(args: argparse.Namespace, recipe: Any, recipe_path: str | None,
                       report: Any, start_rung: int | None) -> int:
    from supervisor.control import runs

    try:
        store = runs.create(recipe_path, recipe, report, start_rung=start_rung)
    except runs.StartError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from supervisor.control import logind

    state = logind.check()  # does logout end the run? (KillUserProcesses without linger)
    if note := state.note(scoped=logind.scope_argv([], state)[1]):
        print(f"qlora-watch: {note}", file=sys.stderr)
    return _launched(store, args, "started")


def _launched(store: Any, args: argparse.Namespace, what: str, spawn: bool = True) -> int:
    """Spawn the supervisor (unless already), then print the run id or open the dashboard;
    a run that fails at once is reported with its reason and a non-zero exit."""
    from supervisor.control import runs

    if spawn:
        runs.spawn_supervisor(store)
    if not runs.wait_started(store, timeout=20):
        print(f"qlora-watch: the supervisor did not start; see {store.path / 'supervisor.out'}",
              file=sys.stderr)
        return 1
    failed = runs.start_failure(store)
    if failed:
        print(f"qlora-watch: run {store.run_id} failed at once: {runs._clean(failed)}", file=sys.stderr)
        return 1
    interactive = sys.stdout.isatty() and sys.stdin.isatty() and not args.detach
    if not interactive:
        print(store.run_id)
        return 0
    print(f"run {store.run_id} {what}; detach with d, the run goes on")
    return _attach(store, args)


def cmd_run(args: argparse.Namespace) -> int:
    """Supervise any training command: `qlora-watch run --output-dir D -- python train.py`."""
    from supervisor.cli.foreign import FOREIGN_ERRORS, recipe_for_command

    try:
        recipe = recipe_for_command(args)
    except FOREIGN_ERRORS as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _create_and_launch(args, recipe, None, None, None)


def cmd_resume(args: argparse.Namespace) -> int:
    from supervisor.control.resume import ResumeError, resume_run

    store = _find(args.run)
    from supervisor.slurm.meta import is_slurm

    if is_slurm(store):  # a new job of the same script; it resumes the run on its node
        from supervisor.slurm.runs import resubmit

        return resubmit(store, from_ckpt=args.from_ckpt, overrides=args.set)
    try:
        plan = resume_run(store, from_ckpt=args.from_ckpt, overrides=args.set)
    except ResumeError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(plan.describe(), file=sys.stderr)
    return _launched(store, args, "resumed", spawn=False)


def cmd_submit(args: argparse.Namespace) -> int:
    """`qlora-watch submit RECIPE`: the run as a Slurm batch job (supervisor/slurm/, docs/slurm.md)."""
    recipe = _load(args.recipe, args.set)
    from supervisor.catalog import resolve
    from supervisor.slurm.runs import submit
    from supervisor.slurm.script import SubmitOptions

    if not recipe.foreign and not Path(recipe.data.path).is_file():
        print(f"qlora-watch: {args.recipe}: data.path {recipe.data.path} does not exist "
              "(set it with --set data.path=/path/to/train.jsonl)", file=sys.stderr)
        return EXIT_BAD_INPUT
    opts = SubmitOptions(partition=args.partition, gpus=args.gpus, time=args.time,
                         sbatch_args=list(args.sbatch_arg or []), job_name=args.job_name)
    return submit(resolve(args.recipe), recipe, opts, dry_run=args.dry_run)


def cmd_slurm_job(args: argparse.Namespace) -> int:
    from supervisor.slurm.job import main as job_main

    return job_main(args.run_dir)


def cmd_recipes(args: argparse.Namespace) -> int:
    from supervisor import catalog

    try:
        if args.action == "cp":
            out = catalog.copy(args.name, args.dest, force=args.force)
            print(f"copied {args.name} to {out}; edit it, then `qlora-watch start {out}`")
        elif args.action == "schema":
            sys.stdout.write(catalog.schema_text())
        else:
            entries = [catalog.entry(catalog.find(n)) for n in catalog.names()]
            print(json.dumps([e.to_dict() for e in entries], indent=1) if args.json
                  else catalog.render(entries))
    except catalog.CatalogError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from supervisor.preflight import doctor

    return doctor.main(args.json)


def cmd_completion(args: argparse.Namespace) -> int:
    from supervisor import catalog
    from supervisor.cli import completion

    sys.stdout.write(completion.script(args.shell, build_parser(), catalog.names()))
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    from supervisor import paths
    from supervisor.daemon.core import run_supervisor

    run_dir = Path(args.run_dir)
    sock = paths.socket_path(run_dir.name)
    return run_supervisor(run_dir, socket_path=sock, with_telemetry=not args.no_telemetry)


def cmd_ls(args: argparse.Namespace) -> int:
    from supervisor import ladder
    from supervisor.control import runs

    stores = runs.all_runs()
    rows = [runs.summary(s) for s in stores]
    from supervisor.slurm.runs import annotate

    note = annotate(stores, rows)  # Slurm runs: job id, PENDING (reason) / RUNNING on NODE
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    if not rows:
        print("no runs yet: start one with `qlora-watch start RECIPE`")
        return 0
    job_col = any("job" in r for r in rows)
    print(f"{'RUN':<22} {'RECIPE':<18} {'STATE':<10} {'STEP':>11} {'LOSS':>8} {'RUNG':<7} "
          f"{'CHECKPOINT':<16} {'WALL':>9}  " + (f"{'STARTED':<16}  SLURM JOB" if job_col else "STARTED"))
    for r in rows:
        step = f"{r.get('step') or 0}/{r.get('max_steps') or '?'}"
        loss = r.get("last_loss")
        loss_s = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        ckpt = Path(r["last_checkpoint"]).name if r.get("last_checkpoint") else "-"
        print(f"{r['run_id']:<22} {str(r.get('recipe'))[:18]:<18} {r.get('state') or '?':<10} "
              f"{step:>11} {loss_s:>8} {ladder.label(r.get('rung')):<7} {ckpt[:16]:<16} "
              f"{runs.fmt_duration(r.get('wall_s')):>9}  "
              + (f"{str(r.get('started')):<16}  {r.get('job', '')}" if job_col else f"{r.get('started')}"))
    if note:
        print(note, file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from supervisor.control import runs

    store = _find(args.run)
    runs.ensure_supervisor(store)
    data = runs.status(store)
    from supervisor.slurm.meta import is_slurm, read_meta
    from supervisor.slurm.runs import status_line

    slurm_run = is_slurm(store)
    if slurm_run:
        data["slurm_job"] = read_meta(store)
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print(runs.render_status(data))
        if slurm_run:
            print(status_line(store))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from supervisor.control import runs

    store = _find(args.run)
    return runs.print_logs(store, follow=args.follow, lines=args.lines)


def cmd_stop(args: argparse.Namespace) -> int:
    from supervisor.control import runs

    store = _find(args.run)
    from supervisor.slurm.meta import is_slurm

    if is_slurm(store):  # graceful stop on its node, then scancel
        from supervisor.slurm.runs import stop as slurm_stop

        return slurm_stop(store, now=args.now)
    return runs.stop(store, now=args.now)


def cmd_wait(args: argparse.Namespace) -> int:
    from supervisor.control import runs

    store = _find(args.run)
    return runs.wait(store, timeout=args.timeout)


def cmd_attach(args: argparse.Namespace) -> int:
    if args.ssh:
        from supervisor.control.remote import attach_over_ssh

        return attach_over_ssh(args.ssh, args.run, args.remote_cmd)
    from supervisor.control import runs

    if args.run is None:
        live = [s for s in runs.all_runs() if runs.is_live(s)]
        if len(live) > 1 and sys.stdout.isatty():
            from supervisor.tui.app import pick_run

            picked = pick_run([runs.summary(s) for s in live]).run()
            if not picked:
                return 0
            args.run = picked
    store = _find(args.run)
    from supervisor.slurm.meta import is_slurm

    if is_slurm(store):  # find the job's node: here, or over ssh like --ssh NODE
        from supervisor import paths
        from supervisor.control.remote import attach_over_ssh
        from supervisor.slurm.runs import attach_target

        how, where = attach_target(store)
        if how == "wait":
            print(f"qlora-watch: {where}", file=sys.stderr)
            return 1
        if how == "ssh":
            return attach_over_ssh(str(where), store.run_id, home=paths.state_home())
    return _attach(store, args)


def _attach(store: Any, args: argparse.Namespace) -> int:
    from supervisor.control import runs

    client = runs.client_for(store)
    try:
        from supervisor.tui.app import make_app
    except ImportError as e:  # dashboard not installed: plain progress instead
        print(f"(dashboard unavailable: {e}); following progress, Ctrl-C to detach")
        return runs.follow_plain(store)
    result = make_app(client, run_id=store.run_id).run()
    if result in ("detached", "quit") and runs.is_live(store):  # q, d and ctrl+c: never the run
        how = "detached from" if result == "detached" else "left the dashboard of"
        print(f"{how} {store.run_id}; the run goes on. `qlora-watch attach {store.run_id}`")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from supervisor.tui.serve import serve

    argv = [sys.executable, "-m", "supervisor", "attach"] + ([args.run] if args.run else [])
    serve(argv, port=args.port)
    return 0


def cmd_socket(args: argparse.Namespace) -> int:
    """Used by `attach --ssh` on the remote side: print the run's socket path."""
    from supervisor import paths
    from supervisor.control import runs

    store = _find(args.run)
    runs.ensure_supervisor(store)
    if not runs.is_live(store):
        print(f"qlora-watch: run {store.run_id} has ended; see `qlora-watch status {store.run_id}`",
              file=sys.stderr)
        return 1
    print(paths.socket_path(store.run_id))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from supervisor.extras import require

    require("report", "report (its plots)")
    from supervisor.report.data import ReportError
    from supervisor.report.html import generate_report

    store = _find(args.run)
    other = _find(args.compare).path if args.compare else None
    out = Path(args.out) if args.out else store.path / "report"
    try:
        html = generate_report(store.path, out, other)
    except ReportError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {html}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from supervisor.control.remove import RemoveError, describe_removal, remove_run

    store = _find(args.run)
    from supervisor.slurm.meta import is_slurm, job_id, job_in_queue

    if is_slurm(store) and job_in_queue(store):  # its next job start would find no run folder
        print(f"refused: run {store.run_id}'s Slurm job {job_id(store)} is still in the queue; "
              f"`qlora-watch stop {store.run_id}` first")
        return 1
    text = describe_removal(store.path, args.checkpoints)
    print(text)
    if text.startswith("refused"):
        return 1
    if not args.yes:
        if not sys.stdin.isatty():
            print("qlora-watch: not a terminal: pass --yes to delete", file=sys.stderr)
            return EXIT_BAD_INPUT
        if input("delete? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    try:
        removed = remove_run(store.path, args.checkpoints)
    except RemoveError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    for p in removed:
        print(f"deleted {p}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from supervisor.extras import require

    require("train", "merge")
    from supervisor.control.merge import MergeError, find_adapter, merge_adapter

    src = Path(args.run)
    if not (os.sep in args.run and src.is_dir()):  # a run id, else an adapter/output folder path
        src = _find(args.run).path
    try:
        print(f"merging {find_adapter(src, args.checkpoint)} into its bf16 base on the CPU")
        out = merge_adapter(src, Path(args.out), checkpoint=args.checkpoint)
    except MergeError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    print(f"merged model: {out}")
    return 0


def cmd_tui_client(args: argparse.Namespace) -> int:
    """Used by `attach --ssh`: run the dashboard against a local (forwarded) socket."""
    from supervisor.control.client import AsyncRunClient
    from supervisor.tui.app import make_app

    make_app(AsyncRunClient(Path(args.socket))).run()
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from supervisor.cli.help import Parser, epilog

    ap = Parser(
        prog="qlora-watch",
        description="Supervise and watch long QLoRA fine-tuning runs.",
        epilog="Quick start: qlora-watch start recipes/tiny.toml (each command's --help has examples)",
    )
    ap.add_argument("--version", action="version", version=f"qlora-watch {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Any, help: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        p.set_defaults(fn=fn)
        return p

    def sets(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="override a recipe key, e.g. --set train.max_seq_len=768")

    p = add("start", cmd_start, "check the fit, start a supervised run, open the dashboard")
    p.add_argument("recipe")
    sets(p)
    p.add_argument("--detach", action="store_true", help="start and return; no dashboard")
    p.add_argument("--force", action="store_true", help="start even when preflight says it does not fit")
    p.add_argument("--auto-fit", action="store_true", help="start at the first OOM-ladder rung that fits")

    p = add("run", cmd_run, "supervise any training command: qlora-watch run --output-dir DIR -- CMD...")
    p.add_argument("--name", default="run", help="a name for the run (default: run)")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where the command writes checkpoint-N folders (watched, pruned, resumed)")
    p.add_argument("--ladder", action="append", default=None, metavar="KEY=VALUE",
                   help="one OOM-ladder rung (repeat for more), e.g. --ladder train.max_seq_len=768; "
                        "default: the recipes' ladder")
    p.add_argument("--save-total-limit", type=int, metavar="N", help="complete checkpoints to keep (3)")
    p.add_argument("--gpus", metavar="0,1", help="the GPU indices the command may use (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--stop-signal", default="SIGTERM", choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"],
                   help="what a graceful stop sends (SIGINT for scripts that save on Ctrl-C)")
    p.add_argument("--oom-relaunch-unchanged", action="store_true",
                   help="after a CUDA OOM, relaunch a command that reads no ladder setting as it is")
    sets(p)
    p.add_argument("--detach", action="store_true", help="start and return; no dashboard")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")

    p = add("submit", cmd_submit, "submit a run as a Slurm batch job (requeued jobs resume it); "
            "prints RUN_ID JOB_ID")
    p.add_argument("recipe")
    sets(p)
    p.add_argument("--partition", metavar="P", help="the Slurm partition")
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs per node (default: the recipe's "
                   "hardware.gpus; 0: none)")
    p.add_argument("--time", metavar="T", help="the time limit, e.g. 24:00:00 (USR1 comes "
                   "stop_grace_s + 60 s before it: checkpoint, requeue)")
    p.add_argument("--sbatch-arg", action="append", metavar="OPT", default=[],
                   help="one more sbatch option, e.g. --sbatch-arg=--account=proj (repeat)")
    p.add_argument("--job-name", metavar="NAME", help="the job name (default: qlw-RUN_ID)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; create and submit nothing")

    p = add("resume", cmd_resume, "continue a stopped, failed or lost run: a new attempt in the same run")
    p.add_argument("run", nargs="?", help="run id or unique prefix (default: latest)")
    p.add_argument("--from", dest="from_ckpt", metavar="checkpoint-N",
                   help="resume from this checkpoint (default: the newest complete one)")
    sets(p)
    p.add_argument("--detach", action="store_true", help="resume and return; no dashboard")

    p = add("preflight", cmd_preflight, "estimate VRAM, host RAM and disk; exit 3 if it does not fit")
    p.add_argument("recipe")
    sets(p)
    p.add_argument("--gpu-mem", type=float, metavar="GIB", help="check against a card of this size")
    p.add_argument("--host-ram", type=float, metavar="GIB", help="check against this much host RAM")
    p.add_argument("--json", action="store_true")

    p = add("validate", cmd_validate, "validate a recipe (exit 2 with file:line:col if it is bad)")
    p.add_argument("recipe")
    sets(p)

    p = add("recipes", cmd_recipes, "the shipped recipes: list them, copy one to edit, the schema")
    p.add_argument("--json", action="store_true")
    p.set_defaults(action=None)
    rsub = p.add_subparsers(dest="action", metavar="ACTION")
    cp = rsub.add_parser("cp", help="copy a shipped recipe to edit", description="copy a shipped recipe to edit")
    cp.add_argument("name", help="a shipped recipe, e.g. 8b")
    cp.add_argument("dest", help="file (or folder) to write")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    rsub.add_parser("schema", help="print the recipe's JSON Schema",
                    description="print the recipe's JSON Schema (docs/recipe.schema.json)")

    p = add("ls", cmd_ls, "list runs")
    p.add_argument("--json", action="store_true")

    p = add("status", cmd_status, "a run's state, step, loss, speed, ETA and last events")
    p.add_argument("run", nargs="?", help="run id or unique prefix (default: latest)")
    p.add_argument("--json", action="store_true")

    p = add("logs", cmd_logs, "the trainer's log")
    p.add_argument("run", nargs="?")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=50)

    p = add("stop", cmd_stop, "stop a run gracefully (the trainer saves a checkpoint first)")
    p.add_argument("run", nargs="?")
    p.add_argument("--now", action="store_true", help="kill at once; nothing new is saved")

    p = add("wait", cmd_wait, "block until the run ends; exit 0 only if it completed")
    p.add_argument("run", nargs="?")
    p.add_argument("--timeout", type=float, default=None, metavar="S")

    p = add("attach", cmd_attach, "open the dashboard on a run (d detaches, the run goes on)")
    p.add_argument("run", nargs="?")
    p.add_argument("--ssh", metavar="USER@HOST", help="attach to a run on a remote box over ssh")
    p.add_argument("--remote-cmd", metavar="PATH", default=None,
                   help="qlora-watch on the remote box, when ssh's PATH lacks it "
                        "(default: $QLORA_WATCH_REMOTE_CMD, else qlora-watch)")

    p = add("serve", cmd_serve, "serve the dashboard to a browser on 127.0.0.1")
    p.add_argument("run", nargs="?")
    p.add_argument("--port", type=int, default=8566)

    p = add("report", cmd_report, "write a self-contained HTML report with plots of a run")
    p.add_argument("run", nargs="?", help="run id or unique prefix (default: latest)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: report/ in the run's folder)")
    p.add_argument("--compare", metavar="RUN2", help="overlay another run's loss and tokens/s")

    p = add("rm", cmd_rm, "delete a finished run's records (and its checkpoints with --checkpoints)")
    p.add_argument("run")
    p.add_argument("--checkpoints", action="store_true",
                   help="also delete checkpoint-N, adapter and attempt-N in its output folder")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")

    from supervisor.cli.cache import add_parser as add_cache

    add_cache(add)

    p = add("merge", cmd_merge, "merge the LoRA adapter into the bf16 base model, on the CPU")
    p.add_argument("run", help="run id, or an adapter/output folder path")
    p.add_argument("--checkpoint", type=int, metavar="N", help="merge checkpoint-N instead of the final adapter")
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("doctor", cmd_doctor, "check the box: driver, CUDA build, bitsandbytes, disk, HF token, "
            "lingering; exit 1 on a fail")
    p.add_argument("--json", action="store_true")

    p = add("completion", cmd_completion, "print a shell completion script (static: tab never starts Python)")
    p.add_argument("shell", choices=("bash", "zsh", "fish"))

    p = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    p.add_argument("run_dir")
    p.add_argument("--no-telemetry", action="store_true")
    p.set_defaults(fn=cmd_supervise)

    p = sub.add_parser("_socket", help=argparse.SUPPRESS)
    p.add_argument("run", nargs="?")
    p.set_defaults(fn=cmd_socket)

    p = sub.add_parser("_slurm_job", help=argparse.SUPPRESS)
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_slurm_job)

    p = sub.add_parser("_tui", help=argparse.SUPPRESS)
    p.add_argument("--socket", required=True)
    p.set_defaults(fn=cmd_tui_client)
    # internal commands stay callable but out of --help
    sub._choices_actions = [a for a in sub._choices_actions if not a.dest.startswith("_")]
    return ap


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if not __version__ and args_in[:1] != ["doctor"]:
        from supervisor.preflight.doctor import SEPARATE_VENV

        print("qlora-watch: the `supervisor` package here is not qlora-watch's (the PyPI package "
              f"supervisor, supervisord, uses the same name); use a separate venv: {SEPARATE_VENV}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    from supervisor.extras import MissingExtra

    try:
        return int(args.fn(args) or 0)
    except MissingExtra as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - errors in words, never a traceback (errors.py)
        from supervisor.cli.errors import explain

        msg = explain(e)
        if msg is None:
            raise
        print(f"qlora-watch: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

