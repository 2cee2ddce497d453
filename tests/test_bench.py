"""The benchmarks still run and print their figures (their numbers are read by people, not asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import gmail
from conftest import ROOT


def test_server_benchmark_prints_its_table():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_server.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["message", "bytes", "proxy"] and lines[4] == ""
    assert lines[5].startswith("peak memory per message byte") and len(lines[7:11]) == 4  # the four shapes
    assert lines[12].startswith("server peak RSS growth") and len(lines[14:18]) == 4
    assert re.fullmatch(r"worst memory \(tracemalloc\): \d+\.\d\d", lines[-2])
    assert re.fullmatch(r"worst proxy/seed: \d+\.\d\d", lines[-1])


def test_client_benchmark_prints_its_ratios():
    quick = ["--messages", "20", "--rounds", "2", "--batch", "20", "--batch-rounds", "1"]
    quick += ["--proxy-batch", "20", "--proxy-rounds", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_client.py"), *quick],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    default = gmail.DEFAULT_CONCURRENCY
    assert re.fullmatch(
        rf"client send_mail/bare: \d+\.\d\d  many\(1\)/send_mail: \d+\.\d\d  many\({default}\)/many\(1\): \d+\.\d\d  "
        r"batch/seed: \d+\.\d\d",
        result.stdout.strip().splitlines()[-1],
    )
