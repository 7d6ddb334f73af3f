"""`make load` and `make soak`: ghz against the encinfer stack on loopback.

    python scripts/load.py                 # make load: Predict at c=1,2,4, streams, batch, health
    python scripts/load.py --quick         # a few seconds of each (the test suite's smoke run)
    python scripts/load.py --soak 600      # make soak: c=4 for 10 minutes, the service's RSS every 30 s

Starts deploy/compose.yml's topology without Docker (`encinfer.stack.Stack`: MinIO,
s3-init, key store, inference with 2 workers, on free loopback ports), prepares
payloads with `encinfer ghz-data`, runs the ghz binary ($ENCINFER_GHZ_BIN or
~/.cache/encinfer/bin/ghz) through server reflection, and writes:

    out/load/<scenario>.json   ghz's JSON reports (token redacted, per-request details dropped)
    out/load/summary.json      one row per run: rps, p50/p95/p99, errors, item errors
    out/load/soak.json         the soak run and its RSS samples
    out/load/latency.png       Predict latency and throughput against concurrency (copied to bench/load.png)
    BENCHMARKS.md              the table, between <!-- load:begin --> and <!-- load:end --> only

Every ghz run is bounded by a request count AND a duration: ghz 0.121's -x drops the
count (it turns into -z), so the duration is enforced here by SIGINT, after which ghz
lets in-flight calls finish (--duration-stop wait) and writes its report.
Targets (measured, reported, never asserted): 0 errors; throughput at c=4 >= 1.7x c=1;
p99 < 3x p50 at c=2; RSS flat over the soak.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- load:begin -->", "<!-- load:end -->"
SOAK_BEGIN, SOAK_END = "<!-- load:soak:begin -->", "<!-- load:soak:end -->"
RSS_INTERVAL = 30.0


@dataclass(frozen=True)
class Run:
    """One ghz run of a ghz-data scenario."""

    name: str
    scenario: str        # predict | stream | batch | health (ghz-data's config names)
    concurrency: int
    connections: int
    total: int           # requests (calls), at most
    seconds: float       # and at most this long


def plan(quick: bool) -> list[Run]:
    if quick:
        return [Run("predict-c1", "predict", 1, 1, 60, 3), Run("predict-c2", "predict", 2, 2, 60, 3),
                Run("predict-c4", "predict", 4, 4, 60, 3), Run("stream-c2", "stream", 2, 2, 6, 5),
                Run("batch-c2", "batch", 2, 2, 2, 10), Run("health-c4", "health", 4, 2, 200, 3)]
    return [Run("predict-c1", "predict", 1, 1, 3000, 20), Run("predict-c2", "predict", 2, 2, 4000, 20),
            Run("predict-c4", "predict", 4, 4, 5000, 20), Run("stream-c2", "stream", 2, 2, 300, 20),
            Run("batch-c2", "batch", 2, 2, 40, 30), Run("health-c4", "health", 4, 2, 10000, 10)]


# ---------------------------------------------------------------------------- ghz

def run_ghz(ghz: Path, config: str, report: Path, *, concurrency: int, connections: int, total: int = 0,
            seconds: float = 0.0, duration: float = 0.0) -> dict:
    """Runs ghz with a ghz-data config; returns its JSON report (also left, redacted, at `report`).

    total + seconds: at most `total` calls, stopped after `seconds` if not done.
    duration: ghz's own -z (the soak), no count.
    """
    argv = [str(ghz), "--config", config, "-c", str(concurrency), "--connections", str(connections),
            "--duration-stop", "wait", "-O", "json", "-o", str(report)]
    argv += ["-z", f"{duration:g}s"] if duration else ["-n", str(total)]
    report.unlink(missing_ok=True)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = seconds if seconds else duration + 60
    try:
        _, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # stop sending; in-flight calls finish; the report is written
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"ghz did not stop after SIGINT: {' '.join(argv)}") from None
    if process.returncode != 0 or not report.exists():
        raise RuntimeError(f"ghz failed ({process.returncode}): {stderr.strip()[-2000:]}")
    data = json.loads(report.read_text())
    # The report repeats the call metadata (the bearer token) and every single request.
    if (data.get("options") or {}).get("metadata"):
        data["options"]["metadata"] = {k: "<redacted>" for k in data["options"]["metadata"]}
    data.pop("details", None)
    report.write_text(json.dumps(data, indent=1) + "\n")
    return data


def summarize(run_name: str, report: dict, images_per_call: int, stream_errors: int | None = None,
              cpu: dict | None = None) -> dict:
    codes = report.get("statusCodeDistribution") or {}
    ok = int(codes.get("OK", 0))
    pct = {p["percentage"]: p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    rps = float(report.get("rps") or 0.0)
    return {
        "run": run_name, "call": (report.get("options") or {}).get("call", ""),
        "concurrency": (report.get("options") or {}).get("concurrency", 0),
        "connections": (report.get("options") or {}).get("connections", 0),
        "count": int(report.get("count", 0)), "ok": ok, "errors": int(report.get("count", 0)) - ok,
        "item_errors": stream_errors, "rps": round(rps, 2), "images_per_s": round(rps * images_per_call, 1),
        "avg_ms": round(report.get("average", 0) / 1e6, 3), "p50_ms": round(pct.get(50, 0.0), 3),
        "p95_ms": round(pct.get(95, 0.0), 3), "p99_ms": round(pct.get(99, 0.0), 3),
        "seconds": round(report.get("total", 0) / 1e9, 2), "end_reason": report.get("endReason", ""),
        **(cpu or {}),
    }


# ---------------------------------------------------------------------------- the service's memory

def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (the inference server and its worker processes)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _status_kb(pid: int, field: str, name: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pid: int) -> dict:
    """RSS and PSS (MB) summed over the process tree; PSS counts shared pages once."""
    pids = process_tree(pid)
    rss = sum(_status_kb(p, "VmRSS") for p in pids)
    pss = sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids)
    return {"processes": len(pids), "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


class MemorySampler(threading.Thread):
    """Samples memory(pid) now, every `interval` seconds, and once more at stop()."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def sample(self) -> None:
        self.samples.append({"t_s": round(time.monotonic() - self._t0, 1), **memory(self.pid)})

    def run(self) -> None:
        self.sample()
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> list[dict]:
        self._done.set()
        self.join(timeout=10)
        if not self.samples or time.monotonic() - self._t0 - self.samples[-1]["t_s"] > 1.0:
            self.sample()
        return self.samples


# ---------------------------------------------------------------------------- CPU: ours and everyone else's

TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / TICK
    return total


class CpuShare:
    """Cores used during a run by the stack and ghz, and by everything else on the machine.

    The machine is shared: 'others' says how much of it other work took meanwhile."""

    def __init__(self, roots: list[int]) -> None:
        import resource
        self._resource = resource
        self.roots = roots
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        pids = sorted({p for root in self.roots for p in process_tree(root)} | {os.getpid()})
        children = self._resource.getrusage(self._resource.RUSAGE_CHILDREN)  # ghz, once it has exited
        return (time.monotonic(), _machine_busy_seconds(), _cpu_seconds(pids),
                children.ru_utime + children.ru_stime)

    def stop(self) -> dict:
        t1, busy1, ours1, ghz1 = self._read()
        t0, busy0, ours0, ghz0 = self._start
        wall = max(t1 - t0, 1e-9)
        ours = (ours1 - ours0) + (ghz1 - ghz0)
        return {"ours_cores": round(ours / wall, 2), "others_cores": round(max(busy1 - busy0 - ours, 0.0) / wall, 2)}


# ---------------------------------------------------------------------------- metrics

def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def stream_answer_errors(before: dict[str, float], after: dict[str, float]) -> int:
    """Stream answers that carried a non-OK item status between two scrapes."""
    name = "encinfer_stream_answers_total{"
    return int(sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k.startswith(name) and 'code="OK"' not in k))


# ---------------------------------------------------------------------------- report

def machine() -> dict:
    load1, _, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(load1, 2),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def targets(rows: list[dict]) -> dict:
    by = {r["run"]: r for r in rows}
    out = {"errors_total": sum(r["errors"] + (r["item_errors"] or 0) for r in rows)}
    if "predict-c1" in by and "predict-c4" in by and by["predict-c1"]["rps"]:
        out["c4_over_c1"] = round(by["predict-c4"]["rps"] / by["predict-c1"]["rps"], 2)
    if "predict-c2" in by and by["predict-c2"]["p50_ms"]:
        out["p99_over_p50_c2"] = round(by["predict-c2"]["p99_ms"] / by["predict-c2"]["p50_ms"], 2)
    return out


def load_table(summary: dict) -> str:
    t = summary["targets"]
    m = summary["machine"]
    lines = [
        f"Run {m['date']} with `make load` ({'quick' if summary.get('quick') else 'full'}): "
        f"{m['cpus']} cores shared with ghz and other work (1-minute load average {m['load_avg_1m_at_start']} "
        f"at the start), inference with {summary['workers']} worker processes, the full compose topology "
        "(MinIO, key store, inference) on loopback. Each run: at most `count` calls and at most the stated "
        "seconds. Latencies are per call as ghz sees them; a stream call carries every image of its payload. "
        "'cores: ours' = CPU used by the stack and ghz during the run, 'cores: others' = by everything else "
        "on the machine meanwhile (it is shared: read rows with 'others' well above 0 with care).",
        "",
        "| run | call | c | conns | calls | errors | item errors | calls/s | images/s | p50 ms | p95 ms | p99 ms "
        "| cores: ours | cores: others |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in summary["rows"]:
        item = "-" if r["item_errors"] is None else r["item_errors"]
        images = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        lines.append(f"| {r['run']} | {r['call'].rsplit('.', 1)[-1]} | {r['concurrency']} | {r['connections']} | "
                     f"{r['count']} | {r['errors']} | {item} | {r['rps']:.1f} | {images} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r.get('ours_cores', '-')} | {r.get('others_cores', '-')} |")
    verdict = lambda ok: "met" if ok else "missed"  # noqa: E731
    lines += ["", "Targets (measured, not asserted):", ""]
    lines.append(f"- errors at every concurrency (RPC status and per-item stream status): {t['errors_total']} "
                 f"({verdict(t['errors_total'] == 0)}: 0)")
    if "c4_over_c1" in t:
        lines.append(f"- Predict throughput at c=4 over c=1: {t['c4_over_c1']}x ({verdict(t['c4_over_c1'] >= 1.7)}: "
                     ">= 1.7x)")
    if "p99_over_p50_c2" in t:
        lines.append(f"- Predict p99 over p50 at c=2: {t['p99_over_p50_c2']}x "
                     f"({verdict(t['p99_over_p50_c2'] < 3)}: < 3x)")
    c4 = next((r for r in summary["rows"] if r["run"] == "predict-c4"), None)
    if c4 and c4.get("ours_cores") and c4["rps"]:
        cpu_ms = 1000 * c4["ours_cores"] / c4["rps"]
        lines.append(f"- at c=4 the stack and ghz used {c4['ours_cores']} of {m['cpus']} cores: {cpu_ms:.1f} ms of CPU "
                     f"per call (ghz, the server process, a worker), so {m['cpus']} cores allow about "
                     f"{1000 * m['cpus'] / cpu_ms:.0f} calls/s on this machine")
    lines += ["", "![Predict latency and throughput against concurrency](bench/load.png)", ""]
    return "\n".join(lines)


def soak_table(soak: dict) -> str:
    r, samples = soak["row"], soak["memory"]
    first, last = samples[0], samples[-1]
    growth = last["rss_mb"] - first["rss_mb"]
    lines = [
        f"### Soak ({soak['machine']['date']}, `make soak`, SOAK_SECONDS={soak['seconds']:g})",
        "",
        f"Predict at concurrency {r['concurrency']} ({r['connections']} connections) for {r['seconds']:.0f} s: "
        f"{r['count']} calls, {r['errors']} errors, {r['rps']:.1f} calls/s, p50 {r['p50_ms']:.2f} ms, "
        f"p95 {r['p95_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; CPU: {r.get('ours_cores', '-')} cores for the "
        f"stack and ghz, {r.get('others_cores', '-')} for other work on the machine.",
        "",
        f"Inference service memory (server + {first['processes'] - 1} child processes, from /proc): RSS "
        f"{first['rss_mb']:.1f} MB at the start, {last['rss_mb']:.1f} MB at the end ({growth:+.1f} MB, "
        f"{100 * growth / max(first['rss_mb'], 1e-9):+.1f}%); PSS {first['pss_mb']:.1f} -> {last['pss_mb']:.1f} MB.",
        "",
        "| t (s) | processes | RSS MB | PSS MB |",
        "|--:|--:|--:|--:|",
    ]
    lines += [f"| {s['t_s']:.0f} | {s['processes']} | {s['rss_mb']:.1f} | {s['pss_mb']:.1f} |" for s in samples]
    return "\n".join(lines) + "\n"


def _between(text: str, begin: str, end: str) -> str | None:
    if begin in text and end in text and text.index(begin) < text.index(end):
        return text[text.index(begin) + len(begin):text.index(end)]
    return None


def write_section(path: Path, load_part: str | None, soak_part: str | None) -> None:
    """Rewrites only the load section of BENCHMARKS.md; a part not given is kept as it was."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    old = _between(text, BEGIN, END) or ""
    old_soak = _between(old, SOAK_BEGIN, SOAK_END) or ""
    old_load = old.split(SOAK_BEGIN)[0] if SOAK_BEGIN in old else ""
    load_body = (load_part if load_part is not None else old_load).strip("\n")
    soak_body = (soak_part if soak_part is not None else old_soak).strip("\n")
    section = "\n".join([
        BEGIN, load_body or "_No `make load` results yet._", "",
        SOAK_BEGIN, soak_body or "_No `make soak` results yet._", SOAK_END, END])
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Load (ghz)\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def plot(rows: list[dict], path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["concurrency"], r) for r in rows if r["run"].startswith("predict-c"))
    if not pts:
        return None
    c = [p[0] for p in pts]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        ax.plot(c, [p[1][key] for p in pts], style, label=key.split("_")[0])
    ax.set_xlabel("ghz concurrency (connections = concurrency)")
    ax.set_ylabel("Predict latency (ms)")
    ax.set_xticks(c)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.bar(c, [p[1]["rps"] for p in pts], width=0.35, alpha=0.2, color="gray", label="calls/s")
    ax2.set_ylabel("calls/s (bars)")
    ax2.set_ylim(bottom=0)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(loc="upper left")
    ax.set_title("encinfer Predict under ghz (encrypted MNIST, latency layout)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds per run (smoke test)")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                   help="soak instead: Predict at c=4 for SECONDS, RSS every 30 s")
    p.add_argument("--rss-interval", type=float, default=RSS_INTERVAL, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "out" / "load"), help="reports directory (default out/load)")
    p.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"),
                   help="file whose load section is rewritten ('' = none)")
    p.add_argument("--chart-copy", default=str(REPO / "bench" / "load.png"), help="copy of latency.png ('' = none)")
    args = p.parse_args(argv)

    from encinfer.client.ghzdata import ghz_binary, write_ghz_data
    from encinfer.common import logs
    from encinfer.stack import Stack

    logs.configure(os.environ.get("ENCINFER_LOG_LEVEL", "WARNING"))
    ghz = ghz_binary()
    if not ghz.is_file():
        print(f"ghz not found at {ghz}: run `make ghz-bin` or set ENCINFER_GHZ_BIN", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    workdir = out / "stack"
    shutil.rmtree(workdir, ignore_errors=True)
    with Stack(workdir, free_ports=True) as stack:
        inference, metrics = stack.address("inference", 50052), stack.address("inference", 9102)
        workers = int(stack.env("inference").get("ENCINFER_WORKERS", "0") or 0)
        print(f"stack up: inference {inference}, key store {stack.address('keystore', 50051)}", flush=True)
        data = write_ghz_data(inference, stack.address("keystore", 50051), stack.token("demo"), out / "data",
                              with_batch=not args.soak)
        server_pid = stack.pid("inference")
        roots = [pid for pid in stack.pids.values() if Path(f"/proc/{pid}").exists()]
        # Warm-up: every worker fetches and deserializes each key once, outside the measurements.
        for name in [s for s in ("predict", "stream", "batch") if s in data.scenarios]:
            run_ghz(ghz, data.scenarios[name].config, out / "warmup.json", concurrency=2, connections=2,
                    total=8 if name == "predict" else 2, seconds=60)
        (out / "warmup.json").unlink(missing_ok=True)

        if args.soak:
            sampler = MemorySampler(server_pid, args.rss_interval)
            sampler.start()
            print(f"soak: Predict c=4 for {args.soak:g} s", flush=True)
            cpu = CpuShare(roots)
            report = run_ghz(ghz, data.scenarios["predict"].config, out / "soak-predict-c4.json", concurrency=4,
                             connections=4, duration=args.soak)
            share = cpu.stop()
            samples = sampler.stop()
            stack.check_alive()
            soak = {"machine": info, "seconds": args.soak, "row": summarize("soak-c4", report, 1, None, share),
                    "memory": samples}
            (out / "soak.json").write_text(json.dumps(soak, indent=1) + "\n")
            print(soak_table(soak))
            if args.benchmarks:
                write_section(Path(args.benchmarks), None, soak_table(soak))
            return 0

        mem_start = memory(server_pid)
        rows = []
        for run in plan(args.quick):
            scenario = data.scenarios[run.scenario]
            before = scrape(metrics)
            cpu = CpuShare(roots)
            report = run_ghz(ghz, scenario.config, out / f"{run.name}.json", concurrency=run.concurrency,
                             connections=run.connections, total=run.total, seconds=run.seconds)
            share = cpu.stop()
            item_errors = stream_answer_errors(before, scrape(metrics)) if run.scenario in ("stream", "batch") \
                else None
            row = summarize(run.name, report, scenario.images, item_errors, share)
            rows.append(row)
            print(f"{row['run']:<11} {row['count']:>6} calls {row['errors']} errors  {row['rps']:8.1f}/s  "
                  f"p50 {row['p50_ms']:7.2f}  p95 {row['p95_ms']:7.2f}  p99 {row['p99_ms']:7.2f} ms  "
                  f"cores ours {share['ours_cores']} others {share['others_cores']}", flush=True)
        stack.check_alive()
        summary = {"machine": info, "quick": args.quick, "workers": workers, "rows": rows, "targets": targets(rows),
                   "memory": {"start": mem_start, "end": memory(server_pid)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    chart = plot(rows, out / "latency.png")
    if chart and args.chart_copy:
        Path(args.chart_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, args.chart_copy)
    if args.benchmarks:
        write_section(Path(args.benchmarks), load_table(summary), None)
    print(json.dumps(summary["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
