#!/usr/bin/env python3
"""Checks the layout ARCHITECTURE.md promises: no import circles between the modules of a
crate, and the study lead's side of the coordinator (`lead`) never importing `server`,
`service` or `store`. Reads `crate::` and `super::` paths in each crate's sources (tests
excluded). Exit 1 with the offending edges.

Usage: python3 .ci/layout.py
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CRATES = ["coordinator/src", "site-agent/src", "shared/src", "proto/src"]
FORBIDDEN = {("coordinator/src", "lead"): {"server", "service", "store"}}


def modname(root, path):
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts)


def edges_of(root):
    files = [
        os.path.join(d, f)
        for d, _, fs in os.walk(root)
        for f in fs
        if f.endswith(".rs") and f not in ("main.rs", "lib.rs")
    ]
    mods = {modname(root, f) for f in files}
    edges = set()
    for f in files:
        m = modname(root, f)
        src = open(f, encoding="utf-8").read().split("#[cfg(test)]")[0]
        # Doc comments name modules without importing them.
        src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith("//"))
        for ref in re.findall(r"crate::([a-z_]+(?:::[a-z_]+)*)", src):
            parts = ref.split("::")
            for k in range(len(parts), 0, -1):
                t = "::".join(parts[:k])
                if t in mods:
                    break
            else:
                continue
            if t != m and not m.startswith(t + "::") and not t.startswith(m + "::"):
                edges.add((m, t))
        parent = m.split("::")[:-1]
        for ref in re.findall(r"super::([a-z_]+)", src):
            t = "::".join(parent + [ref])
            if t in mods and t != m:
                edges.add((m, t))
    return edges


def cycles(edges):
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found = []
    for a, b in sorted(edges):
        seen, stack = {b}, [b]
        while stack:
            x = stack.pop()
            if x == a:
                found.append((a, b))
                break
            for y in graph.get(x, ()):
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
    return found


def main():
    problems = []
    for crate in CRATES:
        root = os.path.join(ROOT, crate)
        edges = edges_of(root)
        top = {(a.split("::")[0], b.split("::")[0]) for a, b in edges}
        top = {(a, b) for a, b in top if a != b}
        for a, b in cycles(edges) + cycles(top):
            problems.append(f"{crate}: {a} imports {b}, which imports it back")
        for (c, m), banned in FORBIDDEN.items():
            if c == crate:
                for a, b in sorted(top):
                    if a == m and b in banned:
                        problems.append(f"{crate}: {a} imports {b}")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print("layout: no import circles; lead imports no server, service or store")


if __name__ == "__main__":
    main()
