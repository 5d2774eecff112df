"""The old name of tests/support/: kept only so that test files written on other branches still
import while they are merged; tests/unit/test_boundaries.py names each such import. Delete once
none is left."""

from tests.support import *  # noqa: F401,F403
