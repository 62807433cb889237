"""Runs a command and prints one JSON line: its wall time, exit code and peak resident memory.

    python3 scripts/peak_rss.py LABEL COMMAND [ARGS...]

The peak is the largest resident set of the command or any of its children (getrusage's
RUSAGE_CHILDREN ru_maxrss, Linux KiB), measured by the kernel, so nothing polls. The
command's own stdout goes to stderr, so that the JSON line is the only stdout.
"""
import json
import resource
import subprocess
import sys
import time

label, cmd = sys.argv[1], sys.argv[2:]
start = time.monotonic()
proc = subprocess.run(cmd, stdout=sys.stderr)
seconds = time.monotonic() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"case": label, "rc": proc.returncode, "seconds": round(seconds, 2),
                  "peak_rss_mib": round(peak_kib / 1024, 1)}), flush=True)
sys.exit(proc.returncode)
