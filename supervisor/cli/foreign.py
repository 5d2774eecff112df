"""The recipe that `qlora-watch run [options] -- COMMAND...` builds: a [trainer]-only recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from supervisor.daemon import handoff
from supervisor.recipe import Recipe, RecipeError, apply_overrides, parse_override, validate

FOREIGN_ERRORS = (RecipeError, handoff.HandoffError)


def recipe_for_command(args: argparse.Namespace) -> Recipe:
    """Validate the options and the command; raises RecipeError / HandoffError (exit 2)."""
    cmd = list(args.command or [])
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        raise RecipeError("run: give the command after --, e.g. "
                          "qlora-watch run --output-dir out -- python train.py")
    trainer: dict = {"command": cmd, "output_dir": args.output_dir, "stop_signal": args.stop_signal,
                     "oom_relaunch_unchanged": bool(args.oom_relaunch_unchanged)}
    if args.save_total_limit is not None:
        trainer["save_total_limit"] = args.save_total_limit
    data: dict = {"name": args.name, "trainer": trainer}
    if args.ladder is not None:
        data["oom_ladder"] = [{".".join(k): v for k, v in [parse_override(item)]} for item in args.ladder]
    if args.gpus:
        data["env"] = {"CUDA_VISIBLE_DEVICES": args.gpus}
    sets = list(args.set or [])
    found = handoff.axolotl_config(cmd, Path.cwd())
    if found is not None:  # the config's own values are the base the ladder starts from
        mine = {s.split("=", 1)[0].strip() for s in sets}
        sets = [i for i in handoff.axolotl_given(found[2]) if i.split("=", 1)[0] not in mine] + sets
    data["trainer"]["given"] = None
    apply_overrides(data, sets)
    if "train" in data:  # --set train.*: given, and the validator fills output_dir in
        data["train"].setdefault("output_dir", args.output_dir)
    recipe = validate(data, "qlora-watch run")
    keys = handoff.known_keys(recipe, [])
    handoff.fill(cmd, handoff.settings(recipe, keys, None, 1, None, Path(args.output_dir)))
    return recipe
