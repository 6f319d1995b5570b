"""Condense `pip wheel -v llama-cpp-python` output into a progress line every few steps:
the build of llama.cpp takes about 10 minutes on 2 cores, silence would look like a hang.
On failure, the last lines of the output are shown."""

from __future__ import annotations

import re
import sys
import time

STEP = re.compile(r"\[(\d+)/(\d+)\]")


def main() -> None:
    started, shown = time.monotonic(), -10
    tail: list[str] = []
    for line in sys.stdin:
        tail = [*tail, line][-30:]
        match = STEP.search(line)
        if match:
            done, total = int(match[1]), int(match[2])
            if done - shown >= 10 or done == total:
                shown = done
                elapsed = time.monotonic() - started
                print(f"  llama.cpp build: {done}/{total} ({elapsed:.0f} s)", flush=True)
        elif line.startswith(("Successfully built", "Successfully installed", "Saved ")):
            print(f"  {line.strip()}", flush=True)
    if tail and "ERROR" in "".join(tail):
        sys.stdout.writelines(tail)


if __name__ == "__main__":
    main()
