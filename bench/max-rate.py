"""Appends the highest fanout rate each target sustained (no loss, p99 < 100 ms)."""
import glob
import json
import os
import sys

out = sys.argv[1]
passed, tried = {}, {}
for f in glob.glob(os.path.join(out, "*-rate-*.json")):
    r = json.load(open(f))
    label = r["label"]
    tried.setdefault(label, []).append(r["rate"])
    if r["lost"] == 0 and r["p99_ms"] is not None and r["p99_ms"] < 100:
        passed[label] = max(passed.get(label, 0), r["rate"])


def best(label):
    """(value, text): the highest passing rate, or a bound below the lowest tried."""
    if label in passed:
        return passed[label], f"{passed[label]:g}"
    lowest = min(tried[label])
    return None, f"< {lowest:g}"


print("\n### highest fanout rate to 10,000 subscribers with no loss and p99 < 100 ms\n")
print("| target | messages/s | rates tried |")
print("|---|---|---|")
for label in sorted(tried):
    print(f"| {label} | {best(label)[1]} | {', '.join(f'{r:g}' for r in sorted(tried[label]))} |")
for transport in ("sse", "ws"):
    h = f"herald-{transport}"
    if h not in tried:
        continue
    for peer in ("nchan", "pushpin"):
        p = f"{peer}-{transport}"
        if p not in tried:
            continue
        (hv, ht), (pv, pt) = best(h), best(p)
        if hv is not None and pv:
            ratio = f"{hv / pv:.2f}x"
        elif hv is not None:
            ratio = f"> {hv / min(tried[p]):.2f}x (the peer passed no rate tried)"
        else:
            ratio = "not measurable: herald passed no rate tried"
        print(f"\n{h} / {p}: {ratio}")
