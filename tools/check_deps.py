#!/usr/bin/env python3
"""The module tree stays as drawn in README.md "Architecture": reads every `crate::` path (and a
mod.rs's paths into its own children) in src/, and fails on

  - an import from a higher stage, or between two stages of the same rank
    (the stages, bottom up, are RANKS below), and
  - any cycle among the files (a child that reaches a sibling through its parent's
    re-exports closes a cycle with that parent, so children name siblings directly).

Usage: python3 tools/check_deps.py [src-dir]   (exit 1 and one line per finding)
"""
import pathlib
import re
import sys

# Rank of each top-level module; a module may use only modules of a lower rank (or its own).
RANKS = {
    "error": 0, "numerics": 0,
    "io": 1, "compute": 1,
    "tokenizer": 2, "quant": 2,
    "model": 3,
    "export": 4,
    "ptq": 5,
    "cli": 6,
}


def module_of(path, src):
    """src/model/config.rs -> ('model', 'config'); src/model/mod.rs -> ('model',)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return tuple(parts)


def code_lines(text):
    """The text without comments and string literals (doc examples name paths too)."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def expand(path):
    """`a::{b, c::d}` -> ['a::b', 'a::c::d'] (one level of braces is all src/ uses)."""
    m = re.match(r"^(.*?)\{(.*)\}$", path, re.S)
    if not m:
        return [path]
    head, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for it in items:
        it = it.strip()
        if it:
            out.extend(expand(head + it))
    return out


def references(text, me, modules):
    """Modules this file's code names: the longest known module prefix of each path."""
    code = code_lines(text)
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        paths.extend(p.strip() for p in expand(re.sub(r"\s+", "", m.group(1))))
    paths.extend(m.group(0) for m in re.finditer(r"\bcrate(?:::\w+)+", code))
    found = set()
    for p in paths:
        p = re.sub(r"\s+as\s+\w+$", "", p)
        p = re.sub(r"as\w+$", "", p) if p.endswith("}") else p
        parts = p.split("::")
        if parts[0] == "crate":
            parts = parts[1:]
        elif parts[0] == "self":
            parts = list(me) + parts[1:]
        elif parts[0] == "super":
            continue
        else:
            # A path into one of my own children (a mod.rs naming its submodules).
            if tuple(me) + (parts[0],) in modules:
                parts = list(me) + parts
            else:
                continue
        parts = [re.sub(r"as\w+$", "", x) for x in parts]
        for n in range(len(parts), 0, -1):
            cand = tuple(parts[:n])
            if cand in modules:
                if cand != me:
                    found.add(cand)
                break
    return found


def cycles(graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent / "src")
    files = {module_of(p, src): p for p in sorted(src.rglob("*.rs"))}
    files = {m: p for m, p in files.items() if m not in (("lib",), ("main",))}
    modules = set(files)
    problems = []
    graph = {}
    for me, path in files.items():
        if me[0] not in RANKS:
            problems.append(f"{path}: top-level module '{me[0]}' has no stage in tools/check_deps.py RANKS")
            continue
        refs = references(path.read_text(), me, modules)
        graph[me] = refs
        for r in sorted(refs):
            if r[0] != me[0] and RANKS.get(r[0], 99) >= RANKS[me[0]]:
                problems.append(
                    f"{path}: uses {'::'.join(r)} (stage '{r[0]}', rank {RANKS.get(r[0])}) "
                    f"from stage '{me[0]}' (rank {RANKS[me[0]]}): only lower stages may be used"
                )
    for comp in cycles(graph):
        problems.append("import cycle: " + " -> ".join("::".join(c) for c in comp))
    edges = sum(len(v) for v in graph.values())
    for p in problems:
        print(p)
    print(f"check_deps: {len(files)} modules, {edges} imports, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
