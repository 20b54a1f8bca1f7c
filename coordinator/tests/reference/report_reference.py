"""Reference p-values for coordinator/tests/it/report.rs, from scipy.

Run: python3 coordinator/tests/reference/report_reference.py   (needs numpy and scipy)
The per-case Dice are defined by formulas that the Rust test rebuilds exactly: two target
sites (7 and 9 test cases), two organs, arms Model_S, Model_T, Model_ST. In organ "parotid_l"
Model_ST equals Model_S on every fourth case (zero differences: scipy's asymptotic method).
"""
import json

import numpy as np
from scipy import stats

SITES = {"target-a": 7, "target-b": 9}
ORGANS = ["brainstem", "parotid_l"]
ARMS = {"Model_S": (0.50, 11), "Model_T": (0.56, 23), "Model_ST": (0.62, 37)}


def lcg(seed, n):
    state = seed
    out = []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((state >> 11) / 2**53)
    return out


def dice(site_i, organ_i, arm):
    base, seed = ARMS[arm]
    n = list(SITES.values())[site_i]
    u = lcg(seed * (site_i + 1) * 7919 + 1000 * organ_i, n)
    return [base + (v - 0.5) * 0.3 for v in u]


def values(site_i, organ_i, arm):
    v = dice(site_i, organ_i, arm)
    if arm == "Model_ST" and organ_i == 1:
        s = dice(site_i, organ_i, "Model_S")
        v = [s[i] if i % 4 == 0 else v[i] for i in range(len(v))]
    return v


def test(x, y):
    x, y = np.array(x), np.array(y)
    d = x - y
    exact = len(d) <= 50 and not np.any(d == 0) and len(np.unique(np.abs(d))) == len(d)
    method = "exact" if exact else "asymptotic"
    w = stats.wilcoxon(x, y, method=method, correction=False)
    t = stats.ttest_rel(x, y)
    return {"method": method, "W": float(w.statistic), "p": float(w.pvalue),
            "t": float(t.statistic), "t_p": float(t.pvalue), "mean": float(np.mean(x)),
            "sd": float(np.std(x, ddof=1)), "median": float(np.median(x))}


out = {}
for oi, organ in enumerate(ORGANS):
    for scope in list(SITES) + ["pooled"]:
        idx = range(len(SITES)) if scope == "pooled" else [list(SITES).index(scope)]
        arm = {a: sum((values(si, oi, a) for si in idx), []) for a in ARMS}
        out[f"{scope}/{organ}/st_vs_s"] = test(arm["Model_ST"], arm["Model_S"])
        out[f"{scope}/{organ}/st_vs_t"] = test(arm["Model_ST"], arm["Model_T"])
print(json.dumps(out, indent=1, sort_keys=True))
