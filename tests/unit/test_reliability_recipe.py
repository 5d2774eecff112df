"""RELIABILITY_PLAN G: recipe validation, and the recipe parser fuzzed with hypothesis.

Covered in tests/unit/test_recipe.py (see docs/reliability.md): G1 malformed TOML / invalid UTF-8
/ NUL / huge file, G2 unknown keys with suggestions, G3 bad values, G4 '..' and '/', G5 a shell
string, G6 literal secrets; exit 2 with nothing started in tests/e2e/test_config_errors.py. G5's
argv case is in tests/e2e/test_reliability_security.py, G7 in tests/e2e/test_reliability_recipe.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.recipe import (
    MAX_RECIPE_BYTES,
    RecipeError,
    load_recipe,
    parse_override,
    parse_toml_text,
    validate,
)
from tests.support import (
    qlw,
    recipe_file,
)

pytestmark = pytest.mark.timeout(120)

MINIMAL = """name = "t"
[model]
name = "m"
[data]
path = "/d.jsonl"
[train]
output_dir = "/tmp/qlw-never-used"
"""


# ------------------------------------------------------------------------------ G1 G3


@pytest.mark.parametrize("content, pattern", [
    (MINIMAL[: len(MINIMAL) // 2], r"r.toml:\d+:\d+: invalid TOML"),  # truncated mid-file
    ('[model]\nname = "a"\nname = "b"\n', r"r.toml:3:\d+: invalid TOML"),  # duplicate key
    ("[model]\n[model]\n", r"r.toml:2:\d+: invalid TOML"),  # duplicate table
    (MINIMAL + "[supervisor]\nstop_grace_s = \"ten\"\n", r"supervisor.stop_grace_s: Input should be a valid number"),
    (MINIMAL + "[supervisor]\nstop_grace_s = -1\n", r"supervisor.stop_grace_s: Input should be greater than 0"),
    (MINIMAL + "[guards.crash]\nmax_restarts = 1.5\n", r"guards.crash.max_restarts"),
    ('oom_ladder = [{ "train.max_seq_len" = 767.5 }]\n' + MINIMAL, r"oom_ladder\[0\].*max_seq_len"),
    ('oom_ladder = [{ "train.per_device_batch" = 3 }]\n' + MINIMAL.replace(
        "[train]\n", "[train]\nper_device_batch = 2\ngrad_accum = 4\n"), r"does not divide the effective batch 8"),
    ('oom_ladder = [{ "lora.rank" = 8 }]\n' + MINIMAL, r"oom_ladder\[0\].*lora.rank: unknown key"),
    ('oom_ladder = 3\n' + MINIMAL, r"oom_ladder"),
    (MINIMAL + "[train.nested]\nx = 1\n", r"train.nested: unknown key"),
])
def test_g1_g3_bad_recipes_are_recipe_errors(tmp_path: Path, content: str, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(recipe_file(tmp_path, content))


@pytest.mark.parametrize("value", ['"abc"', "[1]"])
def test_g3_non_numeric_batch_rung_is_a_recipe_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(RecipeError):
        load_recipe(recipe_file(tmp_path, f'oom_ladder = [{{ "train.per_device_batch" = {value} }}]\n' + MINIMAL))


# ------------------------------------------------------------------------------ G4


def test_g4_output_dir_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.checkpoints.folders import OutputDirError, claim_output_dir

    for bad, pattern in ((str(Path.home()), "must not be / or your home"), ("~", "must not be / or your home"),
                         ("/", "must not be /"), ("runs/../../etc", r"must not contain '\.\.'")):
        text = MINIMAL.replace('output_dir = "/tmp/qlw-never-used"', f'output_dir = "{bad}"')
        with pytest.raises(RecipeError, match=pattern):
            load_recipe(recipe_file(tmp_path, text))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    if os.geteuid() == 0:
        with pytest.raises(OutputDirError, match="belongs to uid 65534"):
            claim_output_dir(foreign, "r1")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputDirError, match="symlink"):
        claim_output_dir(tmp_path / "link", "r1")


# ------------------------------------------------------------------------------ fuzzing


def _only_recipe_error(fn, *args):  # noqa: ANN001, ANN002, ANN202
    try:
        return fn(*args)
    except RecipeError as e:
        assert str(e)  # a message for the user, never empty
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_parse_toml_random_bytes(data: bytes) -> None:
    out = _only_recipe_error(parse_toml_text, data, "fuzz.toml")
    if out is not None:
        assert isinstance(out[0], dict)


KEYS = ["name", "model", "data", "train", "lora", "quant", "env", "trainer", "guards", "supervisor",
        "notify", "oom_ladder", "debug", "hardware", "path", "output_dir", "max_seq_len", "per_device_batch",
        "grad_accum", "r", "command", "crash", "max_restarts", "keep", "save_total_limit", "tiny",
        "stop_grace_s", "target_modules", "HF_TOKEN", "x", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["all-linear", "/tmp/x", "..", "/", "~"]))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), kids, max_size=5)),
                      max_leaves=25)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_fuzz_validate_random_dicts(data: dict) -> None:
    _only_recipe_error(validate, data, "fuzz.toml")


def _toml_value(v: object) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["model", "data", "train", "lora", "guards.crash", "supervisor",
                                           "trainer", "env", "", "train.x"]),
                          st.sampled_from(KEYS[1:]),
                          st.one_of(st.integers(-5, 5000), st.text(max_size=10), st.booleans(),
                                    st.lists(st.text(max_size=5), max_size=3))),
                max_size=10),
       st.integers(0, 400))
def test_fuzz_load_recipe_mutated_files(tmp_path_factory, edits: list, cut: int) -> None:
    """A valid recipe with random keys set in random tables, sometimes cut short: a Recipe or
    a RecipeError, never anything else."""
    text = MINIMAL
    for table, key, value in edits:
        line = f"{key or 'k'} = {_toml_value(value)}\n"
        text += (f"[{table}]\n" if table else "") + line
    if cut:
        text = text[: max(1, len(text) - cut)]
    p = tmp_path_factory.mktemp("r") / "r.toml"
    p.write_text(text)
    _only_recipe_error(load_recipe, p)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_set_overrides(item: str) -> None:
    try:
        parse_override(item)
    except RecipeError:
        pass


def test_recipe_size_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="limit"):
        parse_toml_text(b"#" * (MAX_RECIPE_BYTES + 1), "big.toml")
    p = recipe_file(tmp_path, MINIMAL + "#" * (10 << 20))  # G1: a 10 MB file
    with pytest.raises(RecipeError, match="limit"):
        load_recipe(p)
    res = qlw("validate", str(p))
    assert res.returncode == 2 and "limit" in res.stderr
