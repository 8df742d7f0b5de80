"""The Catch2 unit tests of the session core (test/unit/unit.cpp): the
session, the replies, the log line; it replays test/sessions whole and in
1- and 3-byte pieces.  One pytest item per Catch2 test case and build
(test/harness/catch2.py)."""
import catch2

PROGRAMS = {"plain": "test/unit/unit", "asan": "test/unit/unit-asan"}


def pytest_generate_tests(metafunc):
    catch2.parametrize(metafunc, PROGRAMS)


def test_catch2(program, case):
    catch2.check(program, case)
