"""Where a run's CPU goes, process by process, once it is running: starts a command
(`rayvid run ...`), reads every process's CPU time (/proc, Linux) twice a second, and
prints each process role's share of the cores over a window of the run (from `--from`
seconds after the start to `--tail` seconds before its end: the steady state, with
start-up and the last video's drain left out). Run:
`.venv/bin/python bench/cpu_split.py --from 14 --tail 4 -- .venv/bin/rayvid run VIDEOS OUT --model M`."""

import argparse
import collections
import os
import subprocess
import sys
import time

ROLES = ("Predictor", "Decoder", "rayvid.decode import serve", "bin/rayvid", "raylet", "gcs_server",
         "_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker", "ray::Reports",
         "DashboardAgent", "dashboard.py", "log_monitor", "monitor.py", "RuntimeEnvAgent")


def role(cmdline: str) -> str:
    for name in ROLES:
        if name in cmdline:
            return {"rayvid.decode import serve": "decode child", "bin/rayvid": "driver"}.get(name, name)
    return "other: " + cmdline[:40]


def snapshot() -> dict:
    """{pid: (command line, CPU seconds)} of every process."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    me = str(os.getpid())  # (this script's own reading of /proc is no part of the run)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = (cmdline, (int(fields[11]) + int(fields[12])) / tick)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="start", type=float, default=14.0, help="window start, s after the command starts")
    p.add_argument("--tail", type=float, default=4.0, help="window end, s before the command ends")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.monotonic()
    proc = subprocess.Popen(command)
    snaps, names = [], {}  # (seconds since start, snapshot); pid -> the Ray title it had (an exiting one loses it)
    while proc.poll() is None:
        snap = snapshot()
        for pid, (cmdline, _) in snap.items():
            if cmdline and ("ray::" in cmdline or pid not in names):
                names[pid] = cmdline
        snaps.append((time.monotonic() - t0, snap))
        time.sleep(0.5)
    end = time.monotonic() - t0
    window = [s for s in snaps if args.start <= s[0] <= end - args.tail]
    if len(window) < 2:
        sys.exit(f"the run took {end:.1f} s: no window from {args.start:g} s to {args.tail:g} s before its end")
    (ta, first), (tb, _) = window[0], window[-1]
    last = {}  # pid -> its CPU seconds when last seen in the window (a decode actor ends before the run)
    for _, snap in window:
        last.update((pid, cpu) for pid, (_, cpu) in snap.items())
    share = collections.Counter()
    for pid, cpu in last.items():
        share[role(names.get(pid, ""))] += (cpu - first[pid][1] if pid in first else cpu) / (tb - ta)
    print(f"exit {proc.returncode}; run {end:.1f} s; window {ta:.1f}-{tb:.1f} s; {sum(share.values()):.2f} cores busy")
    for name, cores in share.most_common():
        if cores >= 0.005:
            print(f"  {cores:5.3f} cores  {name}")


if __name__ == "__main__":
    main()
