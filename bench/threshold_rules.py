"""The decision-threshold rules on planted score distributions: realised FPR on new faces.

Real faces score N(0, 1), synthetic ones N(2.5, 1); each draw chooses a threshold from a validation
set of N real faces (and 100 synthetic) for a 5% target, then measures the FPR that threshold gives
on 200,000 new real faces from the same distribution. 500 draws per N and rule.

    .venv/bin/python bench/threshold_rules.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from facetrace.tasks.registry import THRESHOLD_RULES, operating_point

    rng = np.random.default_rng(13)
    held_out = rng.normal(0, 1, 200_000)
    print("| real validation faces | rule | realised FPR mean | 95th percentile | max | share of draws > 5% "
          "| reported 95% interval holds it |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for reals in (98, 184, 300):
        realised = {rule: [] for rule in THRESHOLD_RULES}
        covered = {rule: 0 for rule in THRESHOLD_RULES}
        for _ in range(500):
            labels = np.r_[np.zeros(reals), np.ones(100)].astype(int)
            scores = np.r_[rng.normal(0, 1, reals), rng.normal(2.5, 1, 100)]
            for rule in THRESHOLD_RULES:
                point = operating_point(labels, scores, 0.05, rule)
                fpr = float((held_out >= point["threshold"]).mean())
                realised[rule].append(fpr)
                covered[rule] += point["fpr_interval"][0] <= fpr <= point["fpr_interval"][1]
        for rule, values in realised.items():
            v = np.array(values)
            print(f"| {reals} | {rule} | {v.mean():.3f} | {np.percentile(v, 95):.3f} | {v.max():.3f} | "
                  f"{(v > 0.05).mean():.3f} | {covered[rule] / len(v):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
