#!/usr/bin/env python3
"""Fails on an #include that runs back up the library's floors (docs/ARCHITECTURE.md).

A header under include/cbq/FOLDER/ may include headers of its own folder and of folders on lower
floors only; headers directly in include/cbq/ (cbq.hpp, quantize.hpp) stand on the top floor. The
CUDA backend (cuda/cbq/) sits above the library and may include any of it, but nothing in
include/cbq/ may include the backend. Folders on one floor do not include each other.

Usage: scripts/check-layers.py [REPO]   (prints every violation; exit 1 if there is one)
"""
import pathlib
import re
import sys

# Floor of every folder under include/cbq/, lowest first. Keep in step with ARCHITECTURE.md.
FLOORS = {
    "core": 1,
    "formats": 2,
    "ops": 3, "tokenizer": 3, "optim": 3,
    "quant": 4, "model": 4, "eval": 4,
    "pass": 5,
    "export": 6, "report": 6,
}
TOP = max(FLOORS.values()) + 1  # include/cbq/*.hpp
BACKEND = TOP + 1               # cuda/cbq/

INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]cbq/([^">]+)[">]')


def place(rel: str, backend: bool):
    """(floor, folder) of a path below cbq/, e.g. 'ops/rope.hpp' -> (3, 'ops')."""
    if backend or rel.startswith("cuda/") or rel == "cuda.cuh":
        return BACKEND, "cuda"
    parts = rel.split("/")
    if len(parts) == 1:
        return TOP, ""
    if parts[0] not in FLOORS:
        return None, parts[0]
    return FLOORS[parts[0]], parts[0]


def main() -> int:
    repo = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    roots = [(repo / "include" / "cbq", False), (repo / "cuda" / "cbq", True)]
    bad, checked = [], 0
    for root, backend in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in {".hpp", ".inc", ".cuh", ".h"}:
                continue
            rel = path.relative_to(root).as_posix()
            floor, folder = place(rel, backend)
            where = path.relative_to(repo).as_posix()
            if floor is None:
                bad.append(f"{where}: folder '{folder}' has no floor in scripts/check-layers.py")
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                m = INCLUDE.match(line)
                if not m:
                    continue
                checked += 1
                target = m.group(1)
                t_floor, t_folder = place(target, False)
                if t_floor is None:
                    bad.append(f"{where}:{n}: includes cbq/{target}, a folder with no floor")
                elif t_folder == folder:
                    continue
                elif t_floor >= floor:
                    what = "runs back up" if t_floor > floor else "crosses to a folder on its floor"
                    bad.append(f"{where}:{n}: includes cbq/{target} (floor {t_floor}, {t_folder or 'top'}) "
                               f"from floor {floor} ({folder or 'top'}): {what}")
    for b in bad:
        print(b)
    print(f"check-layers: {checked} includes checked, {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
