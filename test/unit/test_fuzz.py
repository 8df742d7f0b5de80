"""The libFuzzer target of the session core (test/unit/fuzz.cpp, clang, ASan and
UBSan): every input of the committed corpus replayed, one item each, then a
10-second fuzzing pass whose new inputs go to a temporary directory."""
import os
import re
import subprocess

import pytest

from harness import TEST

TARGET = os.path.join(TEST, "unit", "fuzz")
CORPUS = os.path.join(TEST, "unit", "fuzz-corpus")
SEEDS = sorted(os.listdir(CORPUS))
pytestmark = pytest.mark.needs("fuzz")


@pytest.mark.parametrize("seed", SEEDS)
def test_corpus_input(seed):
    p = subprocess.run([TARGET, os.path.join(CORPUS, seed)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-4000:]


def test_ten_seconds_of_fuzzing(tmp_path):
    p = subprocess.run([TARGET, "-max_total_time=10", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
                        str(tmp_path), CORPUS], capture_output=True, text=True, timeout=120)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", p.stderr)
    assert p.returncode == 0 and runs, p.stderr[-4000:]
    print(f"10 s pass: {runs.group(1)} executions, no finding")
