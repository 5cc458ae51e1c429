"""Appends the highest fanout rate each target sustained (no loss, p99 < 100 ms)."""
import glob
import json
import os
import sys

out = sys.argv[1]
best = {}
for f in glob.glob(os.path.join(out, "*-rate-*.json")):
    r = json.load(open(f))
    ok = r["lost"] == 0 and r["p99_ms"] is not None and r["p99_ms"] < 100
    if ok:
        best[r["label"]] = max(best.get(r["label"], 0), r["rate"])
    else:
        best.setdefault(r["label"], 0)
print("\n### highest fanout rate with no loss and p99 < 100 ms\n")
print("| target | messages/s |")
print("|---|---|")
for label in sorted(best):
    print(f"| {label} | {best[label]:g} |")
for transport in ("sse", "ws"):
    h = best.get(f"herald-{transport}")
    for peer in ("nchan", "pushpin"):
        p = best.get(f"{peer}-{transport}")
        if h is not None and p:
            print(f"\nherald-{transport} / {peer}-{transport}: {h / p:.2f}x")
