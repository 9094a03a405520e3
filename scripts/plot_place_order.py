#!/usr/bin/env python3
"""Draws PlaceOrder calls/s against concurrency as an SVG, from the reports of scripts/bench's
sweep: <dir>/batched-c<N>.json and <dir>/off-c<N>.json (load generator JSON reports) and
<dir>/naive-c<N>.json ({"tps": ...}, from pgbench). No plotting library: plain SVG.

    scripts/plot_place_order.py target/bench/sweep docs/place-order.svg
"""
import glob, json, math, os, re, sys

src, dst = sys.argv[1], sys.argv[2]


def series(prefix, value):
    points = []
    for path in glob.glob(os.path.join(src, f"{prefix}-c*.json")):
        c = int(re.search(r"-c(\d+)\.json$", path).group(1))
        try:
            points.append((c, value(json.load(open(path)))))
        except (ValueError, KeyError, StopIteration):
            print(f"skipping {path}: no figure in it", file=sys.stderr)
    return sorted(points)


def place_order(report):
    return next(r["calls_per_sec"] for r in report["rpcs"] if r["rpc"] == "PlaceOrder")


lines = [
    ("service, group commit", "#1f77b4", series("batched", place_order)),
    ("service, WRITE_BATCH_MAX=1", "#ff7f0e", series("off", place_order)),
    ("naive SELECT … FOR UPDATE (pgbench)", "#2ca02c", series("naive", lambda r: r["tps"])),
]
W, H, L, R, T, B = 720, 420, 70, 20, 40, 60
xs = [c for _, _, pts in lines for c, _ in pts] or [1]
ys = [v for _, _, pts in lines for _, v in pts] or [1]
xmax = max(xs)
ymax = max(ys) * 1.1


def x(c):
    return L + (W - L - R) * math.log2(c) / math.log2(max(xmax, 2))


def y(v):
    return H - B - (H - T - B) * v / ymax


out = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
    f'<rect width="{W}" height="{H}" fill="white"/>',
    f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">PlaceOrder on one hot product: calls/s against concurrency</text>',
    f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
    f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
]
c = 1
while c <= xmax:
    out.append(f'<line x1="{x(c):.1f}" y1="{H - B}" x2="{x(c):.1f}" y2="{H - B + 5}" stroke="black"/>')
    out.append(f'<text x="{x(c):.1f}" y="{H - B + 18}" text-anchor="middle">{c}</text>')
    c *= 2
step = 10 ** int(math.log10(ymax)) if ymax >= 10 else 1
while ymax / step > 10:
    step *= 2
v = 0
while v <= ymax:
    out.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{int(v):,}</text>')
    v += step
out.append(f'<text x="{(L + W - R) / 2}" y="{H - 20}" text-anchor="middle">concurrent callers (log scale)</text>')
out.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">calls/s</text>')
for i, (name, colour, pts) in enumerate(lines):
    if pts:
        path = " ".join(f"{x(c):.1f},{y(v):.1f}" for c, v in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{x(c):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>' for c, v in pts]
    out.append(f'<rect x="{L + 12}" y="{T + 8 + 18 * i}" width="12" height="3" fill="{colour}"/>')
    out.append(f'<text x="{L + 30}" y="{T + 13 + 18 * i}">{name}</text>')
out.append("</svg>")
open(dst, "w").write("\n".join(out) + "\n")
