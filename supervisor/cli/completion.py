"""`qlora-watch completion bash|zsh|fish`: static completion scripts made from the parser.

Static: the script holds the commands, options and shipped recipe names, and lists run ids
from the runs folder itself, so pressing tab never starts Python (let alone torch).
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish")
RUNS_DIR = '"${QLORA_WATCH_HOME:-${XDG_STATE_HOME:-$HOME/.local/state}/qlora-watch}/runs"'
FISH_RUNS_DIR = ("(set -q QLORA_WATCH_HOME; and echo $QLORA_WATCH_HOME; or echo "
                 "(set -q XDG_STATE_HOME; and echo $XDG_STATE_HOME; or echo ~/.local/state)/qlora-watch)/runs")


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The public subcommands and their parsers (hidden `_` ones left out)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {n: p for n, p in action.choices.items() if not n.startswith("_")}
    return {}


def options(p: argparse.ArgumentParser) -> list[str]:
    return [o for a in p._actions for o in a.option_strings if o.startswith("--")]


def positional_kind(p: argparse.ArgumentParser) -> str:
    """What the first positional is: a recipe, a run, a shell, a file, or none."""
    positionals = [a for a in p._actions if not a.option_strings]
    if not positionals:
        return "none"
    for a in positionals:
        if isinstance(a, argparse._SubParsersAction):
            continue
        if a.dest == "recipe":
            return "recipe"
        if a.dest == "run":
            return "run"
        if a.dest == "shell":
            return "shell"
    sub = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return "sub:" + " ".join(sub[0].choices) if sub else "file"


def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def bash(parser: argparse.ArgumentParser, recipes: list[str]) -> str:
    cmds = commands(parser)
    cases = []
    for name, p in cmds.items():
        kind = positional_kind(p)
        cases.append(f'    {name}) opts="{" ".join(options(p))}"; kind="{kind}";;')
    return f"""# qlora-watch bash completion (static: `qlora-watch completion bash` wrote it)
_qlora_watch() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" opts="" kind="file"
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=($(compgen -W "{" ".join(cmds)} --help --version" -- "$cur")); return
  fi
  case "${{COMP_WORDS[1]}}" in
{chr(10).join(cases)}
  esac
  if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur")); return; fi
  case "$kind" in
    recipe) COMPREPLY=($(compgen -W "{" ".join(recipes)}" -- "$cur") $(compgen -f -X '!*.toml' -- "$cur") $(compgen -d -- "$cur"));;
    run) COMPREPLY=($(compgen -W "$(ls {RUNS_DIR} 2>/dev/null)" -- "$cur"));;
    shell) COMPREPLY=($(compgen -W "{" ".join(SHELLS)}" -- "$cur"));;
    sub:*) if [ "$COMP_CWORD" -eq 2 ]; then COMPREPLY=($(compgen -W "${{kind#sub:}}" -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi;;
    file) COMPREPLY=($(compgen -f -- "$cur"));;
  esac
}}
complete -o filenames -F _qlora_watch qlora-watch
"""


def zsh(parser: argparse.ArgumentParser, recipes: list[str]) -> str:
    # zsh runs the bash function through bashcompinit: one definition of what completes where.
    return ("#compdef qlora-watch\n# qlora-watch zsh completion (static: `qlora-watch completion zsh`)\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + bash(parser, recipes).split("\n", 1)[1])


def fish(parser: argparse.ArgumentParser, recipes: list[str]) -> str:
    lines = ["# qlora-watch fish completion (static: `qlora-watch completion fish` wrote it)",
             "complete -c qlora-watch -f"]
    for name, text in helps(parser).items():
        lines.append(f"complete -c qlora-watch -n __fish_use_subcommand -a {name} -d {_q(text)}")
    for name, p in commands(parser).items():
        cond = f"-n '__fish_seen_subcommand_from {name}'"
        for o in options(p):
            lines.append(f"complete -c qlora-watch {cond} -l {o[2:]}")
        kind = positional_kind(p)
        if kind == "recipe":
            lines.append(f"complete -c qlora-watch {cond} -F -a '{' '.join(recipes)}'")
        elif kind == "run":
            lines.append(f"complete -c qlora-watch {cond} -a '(ls {FISH_RUNS_DIR} 2>/dev/null)'")
        elif kind == "shell":
            lines.append(f"complete -c qlora-watch {cond} -a '{' '.join(SHELLS)}'")
        elif kind.startswith("sub:"):
            lines.append(f"complete -c qlora-watch {cond} -a '{kind[4:]}'")
        elif kind == "file":
            lines.append(f"complete -c qlora-watch {cond} -F")
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def script(shell: str, parser: argparse.ArgumentParser, recipes: list[str]) -> str:
    return {"bash": bash, "zsh": zsh, "fish": fish}[shell](parser, recipes)
