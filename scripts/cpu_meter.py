#!/usr/bin/env python3
"""CPU time per call of the server, Postgres and Redis, read from /proc (used by scripts/bench).

The kernel counts, per process, the CPU time it has used: utime + stime in /proc/<pid>/stat, in
clock ticks (`getconf CLK_TCK`, 100 a second here), every thread included. `sample` records
those counters for the processes a benchmark drives, every INTERVAL seconds, until it is told to
stop; `table` charges each step of the benchmark with the growth of every counter over the
step's span (interpolated between the samples around its ends) and divides by the calls made in
it, which gives a cost per call that holds still where throughput moves with the machine's load.

Counters, one per line of the samples file:
  proc:NAME      a process given with --proc NAME=PID (a server, redis-server)
  pg:db:NAME     the Postgres backends serving database NAME (--databases): the bench's own work
                 on a server other clients share. A backend is told by its process title
                 ("postgres: [cluster: ]user database host(port) state", kept up to date while
                 update_process_title is on); a backend that exits keeps its last sampled value,
                 so at most one interval of a departing backend's work is missed (pgbench's
                 clients, at the end of their run)
  pg:aux         the postmaster's helper processes (checkpointer, background writer, WAL writer,
                 launchers): shared by every database, not charged to any step
  pg:all         every process of the postmaster: itself, its live children, and the children
                 it has reaped (cutime + cstime), other clients' backends included

  cpu_meter.py sample OUT.jsonl [--proc NAME=PID]... [--postmaster PID --databases A,B]
                      [--interval SECONDS]
  cpu_meter.py table SAMPLES.jsonl STEPS.jsonl OUT.json

STEPS.jsonl has one JSON object per step: {"name", "server": NAME or null, "db": NAME or null,
"floor": the name of the step it is compared with (a health check at the same concurrency)}, and
either "report": a load generator JSON report (its measured span and calls are used) or
"from"/"to" (Unix seconds) and "calls".
"""

import json
import os
import signal
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
AUX = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "stats collector",
    "archiver",
)


def stat(pid):
    """(ppid, starttime, utime + stime, cutime + cstime) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its closing one.
    fields = text[text.rindex(")") + 2 :].split()
    return (
        int(fields[1]),
        int(fields[19]),
        int(fields[11]) + int(fields[12]),
        int(fields[13]) + int(fields[14]),
    )


def title(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class Postgres:
    """The postmaster's processes, with the database each backend serves."""

    def __init__(self, postmaster, databases):
        self.postmaster = postmaster
        self.databases = set(databases)
        # (pid, starttime) -> database name, "" for a process of no watched database, "aux".
        self.kind = {}
        # (pid, starttime) -> last ticks seen, for the watched databases' backends.
        self.last = {}

    def classify(self, pid, text):
        if not text.startswith("postgres: "):
            return None  # forked, not yet named: look again next time
        words = text[len("postgres: ") :].split()
        # "15/main: checkpointer" when cluster_name is set.
        if words and words[0].endswith(":"):
            words = words[1:]
        rest = " ".join(words)
        if any(rest.startswith(name) for name in AUX):
            return "aux"
        if rest.startswith("parallel worker for PID "):
            leader = int(words[4])
            return next((d for (p, _), d in self.kind.items() if p == leader), None)
        # "autovacuum worker database" or "user database host(port) state".
        if rest.startswith("autovacuum worker "):
            db = words[2] if len(words) > 2 else ""
        else:
            db = words[1] if len(words) > 1 else ""
        return db if db in self.databases else ""

    def read(self):
        counters = {"pg:aux": 0}
        own = stat(self.postmaster)
        if own is None:
            return counters
        total = own[2] + own[3]
        for pid in children(self.postmaster):
            s = stat(pid)
            if s is None:
                continue
            total += s[2]
            key = (pid, s[1])
            kind = self.kind.get(key)
            if kind is None:
                kind = self.classify(pid, title(pid))
                if kind is None:
                    continue
                self.kind[key] = kind
            if kind == "aux":
                counters["pg:aux"] += s[2]
            elif kind:
                self.last[key] = s[2]
        counters["pg:all"] = total
        for db in self.databases:
            counters[f"pg:db:{db}"] = sum(
                ticks for key, ticks in self.last.items() if self.kind.get(key) == db
            )
        return counters


def sample(args):
    out, procs, postmaster, databases, interval = args[0], {}, None, [], 0.1
    i = 1
    while i < len(args):
        flag, value = args[i], args[i + 1]
        if flag == "--proc":
            name, pid = value.split("=", 1)
            procs[name] = int(pid)
        elif flag == "--postmaster":
            postmaster = int(value)
        elif flag == "--databases":
            databases = [d for d in value.split(",") if d]
        elif flag == "--interval":
            interval = float(value)
        else:
            sys.exit(f"cpu_meter.py sample: unknown option {flag}")
        i += 2
    pg = Postgres(postmaster, databases) if postmaster else None
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with open(out, "a") as f:
        while not stop:
            started = time.time()
            counters = {}
            for name, pid in procs.items():
                s = stat(pid)
                if s is not None:
                    counters[f"proc:{name}"] = s[2]
            if pg:
                counters.update(pg.read())
            f.write(json.dumps({"t": (started + time.time()) / 2, "ticks": counters}) + "\n")
            f.flush()
            time.sleep(max(0.0, interval - (time.time() - started)))


def at(samples, name, t):
    """A counter's value at time t, in seconds of CPU, interpolated between samples."""
    points = [(s["t"], s["ticks"][name]) for s in samples if name in s["ticks"]]
    if not points or t < points[0][0] or t > points[-1][0]:
        return None
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            share = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return (v0 + share * (v1 - v0)) / TICKS
    return points[-1][1] / TICKS


def spent(samples, name, start, end):
    a, b = at(samples, name, start), at(samples, name, end)
    return None if a is None or b is None else b - a


def step_span(step):
    """(from, to, calls) of a step: from its load generator report, or given."""
    if "report" in step:
        report = json.load(open(step["report"]))
        calls = sum(r["calls"] for r in report["rpcs"])
        return report["measured_from_unix_secs"], report["measured_until_unix_secs"], calls
    return step["from"], step["to"], step["calls"]


def table(args):
    samples_path, steps_path, out = args
    samples = [json.loads(line) for line in open(samples_path) if line.strip()]
    steps = [json.loads(line) for line in open(steps_path) if line.strip()]
    rows = []
    for step in steps:
        start, end, calls = step_span(step)
        secs = end - start
        cpu = {
            "server": spent(samples, f"proc:server:{step['server']}", start, end)
            if step.get("server")
            else 0.0,
            "postgres": spent(samples, f"pg:db:{step['db']}", start, end) if step.get("db") else 0.0,
            "redis": spent(samples, "proc:redis", start, end),
            "postgres_all": spent(samples, "pg:all", start, end),
            "postgres_aux": spent(samples, "pg:aux", start, end),
        }
        per_call = {
            k: (None if v is None or not calls else v / calls * 1e6) for k, v in cpu.items()
        }
        parts = [per_call[k] for k in ("server", "postgres", "redis")]
        total = None if None in parts else sum(parts)
        rows.append(
            {
                "name": step["name"],
                "calls": calls,
                "seconds": secs,
                "calls_per_sec": calls / secs if secs > 0 else None,
                "floor": step.get("floor") or None,
                "cpu_seconds": cpu,
                "cpu_share": {k: (v / secs if v is not None and secs > 0 else None) for k, v in cpu.items()},
                "us_per_call": {**per_call, "total": total},
            }
        )
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        floor = by_name.get(r["floor"])
        floor_us = floor["us_per_call"]["total"] if floor else None
        total = r["us_per_call"]["total"]
        r["ratio_to_floor"] = total / floor_us if total is not None and floor_us else None
        r["above_floor_us"] = total - floor_us if total is not None and floor_us is not None else None
    result = {
        "method": "utime+stime from /proc/<pid>/stat, sampled; Postgres = backends of the step's "
        "database (by process title); Redis = the whole redis-server process, shared with "
        "other clients; postgres_all = every process of the postmaster, other clients included",
        "clock_ticks_per_sec": TICKS,
        "steps": rows,
    }
    json.dump(result, open(out, "w"), indent=2)
    print_table(rows)


def fmt(v, width, digits=1):
    return f"{'—':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_table(rows):
    width = max([len(r["name"]) for r in rows] + [8])
    print(
        f"  {'scenario':<{width}} {'calls':>9} {'calls/s':>9} {'server':>8} {'Postgres':>9} "
        f"{'Redis':>8} {'total':>8} {'x floor':>8}   {'pg all*':>8}  floor"
    )
    print(f"  {'':<{width}} {'':>9} {'':>9} {'µs/call':>8} {'µs/call':>9} {'µs/call':>8} {'µs/call':>8}")
    for r in rows:
        u = r["us_per_call"]
        if not r["calls"]:
            share = r["cpu_share"]
            pct = lambda k: "—" if share[k] is None else f"{100 * share[k]:.0f}%"
            print(
                f"  {r['name']:<{width}} (no calls; CPU of a core: server {pct('server')}, "
                f"Postgres {pct('postgres')}, Redis {pct('redis')}, pg all {pct('postgres_all')})"
            )
            continue
        print(
            f"  {r['name']:<{width}} {r['calls']:>9} {fmt(r['calls_per_sec'], 9, 0)} "
            f"{fmt(u['server'], 8)} {fmt(u['postgres'], 9)} {fmt(u['redis'], 8)} "
            f"{fmt(u['total'], 8)} {fmt(r['ratio_to_floor'], 8, 2)}   {fmt(u['postgres_all'], 8)}"
            f"  {r['floor'] or ''}"
        )
    print(
        "  Postgres: the backends of the step's own database; pg all*: every Postgres process, "
        "other clients' included.\n  Redis: the whole redis-server, which other clients share; "
        "x floor: total / the total of the floor named (a health check at the same concurrency)."
    )


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("sample", "table"):
        sys.exit(__doc__)
    {"sample": sample, "table": table}[sys.argv[1]](sys.argv[2:])
