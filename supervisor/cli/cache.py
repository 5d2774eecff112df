"""`qlora-watch cache ls` / `qlora-watch cache rm`: the quantised-weight caches (runner/qcache.py).

A run's own cache lives in its records folder (RUNS/RUN/qcache) and goes with `qlora-watch rm`;
the shared one (model.weight_cache = "shared") is HOME/qcache and goes only with `cache rm`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def roots() -> list[tuple[str, Path]]:
    """(owner, folder): "shared", then every run with a cache of its own."""
    from supervisor.paths import runs_dir
    from supervisor.runner.qcache import shared_root

    out = [("shared", shared_root())]
    runs = runs_dir()
    if runs.is_dir():
        out += [(p.parent.name, p) for p in sorted(runs.glob("*/qcache")) if p.is_dir()]
    return out


def entries() -> list[dict[str, Any]]:
    from supervisor.runner.qcache import list_entries

    return [{"owner": owner, **e} for owner, root in roots() for e in list_entries(root)]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def cmd_cache(args: argparse.Namespace) -> int:
    found = entries()
    if args.action == "ls":
        if args.json:
            print(json.dumps(found, indent=1))
            return 0
        if not found:
            print("no weight caches")
            return 0
        for e in found:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created_at"])) if e.get("created_at") else "-"
            print(f"{e['key']:<32} {e['owner']:<16} {_gb(e['bytes']):>10}  {e['state']:<7} {when}  "
                  f"{e.get('backend') or '-'}  {e['model']}")
        print(f"total {_gb(sum(e['bytes'] for e in found))} in {len(found)} entr{'y' if len(found) == 1 else 'ies'}")
        return 0
    # rm: the named entries (a key, or a prefix of one), a run's, or --all
    pick = [e for e in found
            if args.all or (args.run and e["owner"] == args.run)
            or any(e["key"].startswith(k) for k in args.keys)]
    if not pick:
        print("qlora-watch: no such cache entry (see `qlora-watch cache ls`)", file=sys.stderr)
        return 1
    for e in pick:
        print(f"delete {e['path']} ({_gb(e['bytes'])}, {e['owner']})")
    if not args.yes:
        if not sys.stdin.isatty():
            print("qlora-watch: not a terminal: pass --yes to delete", file=sys.stderr)
            return 2
        if input("delete? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    allowed = {str(root) for _, root in roots()}
    for e in pick:
        p = Path(e["path"])
        if str(p.parent) not in allowed or p.is_symlink() or not p.is_dir():
            print(f"qlora-watch: refusing {p}: not a cache entry", file=sys.stderr)
            continue
        shutil.rmtree(p)
        print(f"deleted {p}")
    return 0


def add_parser(add: Any) -> None:
    p = add("cache", cmd_cache, "list or delete quantised-weight caches (fast relaunches)")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("ls", help="list every cache entry: key, owner (a run or shared), size")
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="delete entries: KEY (or a prefix), --run RUN's, or --all")
    rm.add_argument("keys", nargs="*", metavar="KEY")
    rm.add_argument("--run", default=None, help="every entry of this run's own cache")
    rm.add_argument("--all", action="store_true", help="every entry, shared and per run")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask")
