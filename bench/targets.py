#!/usr/bin/env python3
"""Issue #3's proxy targets against one bench/run.sh run, as Markdown.

  targets.py RESULTS/proxy-<stamp>-intercept RESULTS/proxy-<stamp>-passthrough

Each argument is a result prefix written by ../shared/bench/bench-proxy.sh (<prefix>.tsv, <prefix>.idle.tsv).
Every number is the median over the run's rounds; ratios compare targets measured in the same run.
"""

import csv
import re
import statistics
import sys

CANDIDATE = "bot-bottle"
PASSTHROUGH = "bot-bottle-passthrough"
REF = "direct"


def load(prefix):
    rows = list(csv.DictReader(open(f"{prefix}.tsv"), delimiter="\t"))
    idle = {r["target"]: r for r in csv.DictReader(open(f"{prefix}.idle.tsv"), delimiter="\t")}
    return rows, idle


def med(rows, target, scenario, conc, key, tool="oha"):
    vals = []
    for r in rows:
        if (r["target"], r["tool"], r["scenario"], r["conc"]) == (target, tool, scenario, str(conc)):
            try:
                vals.append(float(r[key]))
            except ValueError:
                pass
    return statistics.median(vals) if vals else None


def per_round(rows, target, scenario, conc, key, tool="oha"):
    """{round: value} for one case."""
    out = {}
    for r in rows:
        if (r["target"], r["tool"], r["scenario"], r["conc"]) == (target, tool, scenario, str(conc)):
            try:
                out[r["round"]] = float(r[key])
            except ValueError:
                pass
    return out


def round_ratios(rows, target, scenario, conc, key, tool="oha", as_times=False, diff=False):
    """The same comparison inside each round (targets of one round ran back to back), e.g. "27 % / 69 %"."""
    ours, ref = per_round(rows, target, scenario, conc, key, tool), per_round(rows, REF, scenario, conc, key, tool)
    cells = []
    for rnd in sorted(set(ours) & set(ref), key=int):
        if diff:
            cells.append(f"{ours[rnd] - ref[rnd]:+.2f}")
        elif ref[rnd]:
            r = ours[rnd] / ref[rnd]
            cells.append(f"{r:.1f}×" if as_times else f"{100 * r:.0f} %")
    return " / ".join(cells) or "-"


def bad(rows, target, scenario, conc, tool="oha"):
    total = 0
    for r in rows:
        if (r["target"], r["tool"], r["scenario"], r["conc"]) == (target, tool, scenario, str(conc)):
            total += int(float(r["bad"] or 0))
    return total


def fmt(v, nd=0, unit=""):
    if v is None:
        return "-"
    return f"{v:,.{nd}f}{unit}"


def main():
    inter, inter_idle = load(sys.argv[1])
    passt, pass_idle = load(sys.argv[2])
    concs = sorted({int(r["conc"]) for r in inter if r["scenario"] == "https-small"})
    large_c = next((int(r["conc"]) for r in inter if r["scenario"] == "http-large"), 4)
    c16 = concs[0] if concs else 16
    lines = [
        "| issue #3 target | case | bot-bottle | reference | ratio (median) | per round | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio_row(goal_txt, case, rows, target, ref, sc, conc, need, key="rps", tool="oha", as_times=False):
        unit, nd = (" MiB/s", 1) if key == "mib_s" else (" req/s", 0)
        ours, theirs = med(rows, target, sc, conc, key, tool), med(rows, ref, sc, conc, key, tool)
        goal = float(re.search(r"[\d.]+", need).group()) / (1 if as_times else 100)
        if ours is None or not theirs:
            shown, met = "-", "?"
        else:
            r = ours / theirs
            shown = f"{r:.1f}×" if as_times else f"{100 * r:.0f} %"
            met = "yes" if r >= goal else "**no**"
        if ref == REF:
            rounds = round_ratios(rows, target, sc, conc, key, tool, as_times)
        else:
            o, t = per_round(rows, target, sc, conc, key, tool), per_round(rows, ref, sc, conc, key, tool)
            rounds = " / ".join(f"{o[k] / t[k]:.1f}×" for k in sorted(set(o) & set(t), key=int) if t[k]) or "-"
        lines.append(f"| {goal_txt} | {case} | {fmt(ours, nd, unit)} | {ref} {fmt(theirs, nd, unit)} "
                     f"| {shown} | {rounds} | {need} | {met} |")

    for c in concs:
        ratio_row("intercepted HTTPS vs mitmproxy", f"1 KiB, c{c}", inter, CANDIDATE, "mitmproxy", "https-small", c,
                  "≥ 20×", as_times=True)
    for c in concs:
        ratio_row("intercepted HTTPS vs direct", f"1 KiB, c{c}", inter, CANDIDATE, REF, "https-small", c, "≥ 40 %")
    for tool in ("oha", "wrk"):
        for c in concs:
            ratio_row("plain HTTP vs direct", f"1 KiB, c{c}, {tool}", inter, CANDIDATE, REF, "http-small", c,
                      "≥ 80 %", tool=tool)
    for c in concs:
        ratio_row("CONNECT passthrough vs direct", f"1 KiB, c{c}", passt, PASSTHROUGH, REF, "https-small", c,
                  "≥ 80 %")
    for name, rows, target, sc in (
        ("plain HTTP", inter, CANDIDATE, "http-small"),
        ("intercepted HTTPS", inter, CANDIDATE, "https-small"),
        ("CONNECT passthrough", passt, PASSTHROUGH, "https-small"),
    ):
        ours, ref = med(rows, target, sc, c16, "p99_ms"), med(rows, REF, sc, c16, "p99_ms")
        added = None if ours is None or ref is None else ours - ref
        met = "?" if added is None else ("yes" if added < 1.0 else "**no**")
        rounds = round_ratios(rows, target, sc, c16, "p99_ms", diff=True)
        lines.append(f"| p99 added latency | {name}, 1 KiB, c{c16} | p99 {fmt(ours, 2, ' ms')} "
                     f"| direct p99 {fmt(ref, 2, ' ms')} | {'-' if added is None else f'{added:+.2f} ms'} "
                     f"| {rounds} ms | < +1 ms | {met} |")
    for name, rows, target, sc in (
        ("plain HTTP", inter, CANDIDATE, "http-large"),
        ("intercepted HTTPS", inter, CANDIDATE, "https-large"),
        ("CONNECT passthrough", passt, PASSTHROUGH, "https-large"),
    ):
        ratio_row("10 MiB bodies vs direct", f"{name}, c{large_c}", rows, target, REF, sc, large_c, "≥ 70 %",
                  key="mib_s")
    for name, idle, target in (("intercept run", inter_idle, CANDIDATE), ("passthrough run", pass_idle, PASSTHROUGH)):
        rss = float(idle[target]["idle_rss_mib"]) if target in idle else None
        met = "?" if rss is None else ("yes" if rss < 20 else "**no**")
        check = idle.get(target, {}).get("check", "-")
        lines.append(f"| idle RSS | {name}, after the allowlist check ({check}) | {fmt(rss, 1, ' MiB')} | - | - | - "
                     f"| < 20 MiB | {met} |")
    print("\n".join(lines))
    print()
    print("Proxy CPU per request (µs; 10 MiB: ms per body) and bad responses, medians over rounds:")
    print()
    print("| case | bot-bottle | squid | tinyproxy | mitmproxy | bot-bottle bad |")
    print("|---|---|---|---|---|---|")
    cases = [(sc, c) for sc in ("http-small", "https-small") for c in concs]
    cases += [("http-large", large_c), ("https-large", large_c), ("deny-http", c16), ("deny-connect", c16)]
    for sc, c in cases:
        scale = 1000 if sc.endswith("-large") else 1
        cells = []
        for t in (CANDIDATE, "squid", "tinyproxy", "mitmproxy"):
            v = med(inter, t, sc, c, "proxy_cpu_us_req")
            cells.append(fmt(None if v is None else v / scale, 1 if scale > 1 else 0))
        print(f"| {sc} c{c} | " + " | ".join(cells) + f" | {bad(inter, CANDIDATE, sc, c)} |")
    for sc, c in [("https-small", c) for c in concs] + [("https-large", large_c)]:
        scale = 1000 if sc.endswith("-large") else 1
        v = med(passt, PASSTHROUGH, sc, c, "proxy_cpu_us_req")
        s = med(passt, "squid", sc, c, "proxy_cpu_us_req")
        print(f"| {sc} c{c} passthrough | {fmt(None if v is None else v / scale, 1 if scale > 1 else 0)} "
              f"| {fmt(None if s is None else s / scale, 1 if scale > 1 else 0)} | - | - "
              f"| {bad(passt, PASSTHROUGH, sc, c)} |")


if __name__ == "__main__":
    main()
