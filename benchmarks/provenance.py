"""Where a benchmark's output came from: one line with the date, the machine and the git commit.

Every benchmark whose output is kept under ``docs/results_files/`` prints ``made_line()`` near its
top, so a raw file names the code and the machine that made it without anyone editing it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def commit() -> str:
    """The checkout's short commit, with ' +changes' when its tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    return (head or "unknown") + (" +changes" if dirty else "")


def made_line() -> str:
    """'made <date> on <host> (<n> CPUs, <arch>), git commit <sha>'."""
    return (f"made {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()} ({os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}), git commit {commit()}")
