"""Who holds the GIL in a run: sums a ``py-spy record --gil --threads --format raw`` profile by thread group and
function (prints measured numbers, not a test).

    py-spy record --gil --threads --nonblocking -r 250 --format raw -o gil.txt -- python bench/bench_host.py ...
    python bench/gil_summary.py gil.txt --rate 250 [--top 25] [--within replay]

With ``--gil`` py-spy samples only the thread holding the GIL, so the samples of a group are the time its threads
held it, and their sum bounds a run's wall time from below on any number of cores: what no core count can run in
parallel. The main thread's samples count only inside a frame named by ``--within`` (default: the benches' run
calls), so that imports and set-up before the runs stay out; worker threads (named ``qpbridge-*``, thread pools)
count whole. Thread names lose their trailing number, so a pool's threads add up.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

WITHIN = ("run_plan (", "annotate_slide (")


def summarise(path: Path, rate: float, top: int, within: tuple[str, ...]) -> str:
    groups: Counter[str] = Counter()
    own: Counter[tuple[str, str]] = Counter()
    under: Counter[tuple[str, str]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        named = re.match(r"thread \(\d+\)(?:: (.*))?", frames[0])
        if named is None:
            continue
        group = re.sub(r"_\d+$", "", named.group(1) or "unnamed")
        if group in ("MainThread", "unnamed") and not any(w in stack for w in within):
            continue
        funcs = [f.split(" (")[0] for f in frames[1:]]
        groups[group] += n
        if funcs:
            own[(group, funcs[-1])] += n
        for f in set(funcs):
            under[(group, f)] += n
    total = sum(groups.values())
    out = [f"GIL held: {total / rate:.2f} s in all ({total} samples at {rate:g} Hz)"]
    out += [f"  {v / rate:7.3f} s  {v / max(1, total):6.1%}  {g}" for g, v in groups.most_common()]
    out.append(f"top {top} by own samples (the function running when sampled):")
    out += [f"  {v / rate:7.3f} s  {g:<24} {f}" for (g, f), v in own.most_common(top)]
    out.append(f"top {top} by samples under the function (itself and what it called):")
    out += [f"  {v / rate:7.3f} s  {g:<24} {f}" for (g, f), v in under.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path, help="py-spy raw output (--format raw, with --threads)")
    ap.add_argument("--rate", type=float, required=True, help="py-spy's sampling rate (-r), samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--within", nargs="+", default=list(WITHIN),
                    help="main-thread samples count only under a frame containing one of these")
    args = ap.parse_args(argv)
    print(summarise(args.profile, args.rate, args.top, tuple(args.within)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
