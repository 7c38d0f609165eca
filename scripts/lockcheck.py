"""Is requirements/*.lock current with pyproject.toml?

The locks (made by scripts/lock with pip-tools) pin every package the project installs, with
their SHA-256 hashes: requirements/runtime.lock what the image installs (pyproject's
[project.dependencies]), requirements/test.lock what scripts/setup installs (those plus the
`test` extra). pyproject keeps its ranges; this module says when the locks no longer match them:

  - each lock's header records `# pyproject-deps-sha256: <hex>`, a digest of pyproject's
    dependency strings and test extra (sorted, whitespace dropped); a lock made from another
    list is stale, even when its pins happen to fit;
  - every direct requirement is pinned (`name==version`) in the lock it belongs to, and the pin
    satisfies pyproject's specifier;
  - every pin carries at least one hash (pip's --require-hashes refuses the file otherwise);
  - a package in both locks is pinned to the same version in both.

Standard library only, plus `packaging` where it is installed (pytest brings it); without it, a
small parser covers the specifiers pyproject uses (==, !=, <, <=, >, >=, ~=, ==X.*).

  python scripts/lockcheck.py          check; exit 1 with one line when stale
  python scripts/lockcheck.py digest   print the digest of pyproject's dependency lists
  python scripts/lockcheck.py stamp    write the digest into the header of each lock
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    HAVE_PACKAGING = True
except ImportError:  # pragma: no cover - the tests switch HAVE_PACKAGING off instead
    HAVE_PACKAGING = False

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"runtime": "requirements/runtime.lock", "test": "requirements/test.lock"}
DIGEST_PREFIX = "# pyproject-deps-sha256: "
STALE = "requirements/*.lock is stale: run scripts/lock"
HEADERS = {
    "runtime": [
        "# inbox-exporter's runtime dependencies, pinned, with the SHA-256 of every file: what the",
        "# image installs (Dockerfile: pip wheel --require-hashes -r requirements/runtime.lock).",
        "# Made from pyproject.toml [project.dependencies], which keeps the ranges.",
    ],
    "test": [
        "# inbox-exporter's runtime and test dependencies, pinned, with the SHA-256 of every file:",
        "# what scripts/setup installs (pip install --require-hashes -r requirements/test.lock).",
        "# Made from pyproject.toml [project.dependencies] and the `test` extra, constrained to",
        "# the versions of requirements/runtime.lock.",
    ],
}
REGENERATE = [
    "# Regenerate with scripts/lock after changing pyproject's dependencies (tests/test_lock.py",
    "# fails until then); `scripts/lock --upgrade` moves every pin to the newest version the",
    "# ranges allow, `scripts/lock --upgrade-package NAME` only NAME.",
]


def canonical(name: str) -> str:
    """PEP 503 normalized name: `PyYAML` and `pyyaml`, `typing_extensions` and `-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- pyproject --------------------------------------------------------------------------------

def declared(pyproject: dict) -> dict[str, list[str]]:
    """The requirement strings of each lock: runtime = dependencies; test = those + the extra."""
    project = pyproject["project"]
    runtime = list(project.get("dependencies", []))
    extra = list(project.get("optional-dependencies", {}).get("test", []))
    return {"runtime": runtime, "test": extra}


def deps_digest(decl: dict[str, list[str]]) -> str:
    """SHA-256 of the sorted requirement strings (whitespace dropped) of each list."""
    norm = {key: sorted("".join(s.split()) for s in reqs) for key, reqs in sorted(decl.items())}
    blob = json.dumps(norm, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Req:
    name: str       # canonical
    specifier: str  # e.g. ">=3.10,<4", "" for any version
    applies: bool   # False when its environment marker excludes this Python/platform


_REQ_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*"
                     r"(?:\(([^)]*)\)|([^;@]*))\s*(?:;(.*))?$")


def parse_requirement(text: str) -> Req:
    if HAVE_PACKAGING:
        r = Requirement(text)
        applies = r.marker is None or r.marker.evaluate({"extra": "test"})
        return Req(canonical(r.name), str(r.specifier), bool(applies))
    return _simple_requirement(text)


def _simple_requirement(text: str) -> Req:
    m = _REQ_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse requirement {text!r}")
    spec = "".join((m.group(3) or m.group(4) or "").split())
    # Without packaging, a marker is not evaluated: such a requirement is not checked.
    return Req(canonical(m.group(1)), spec, applies=m.group(5) is None)


# --- versions -----------------------------------------------------------------------------------

def satisfies(version: str, specifier: str) -> bool:
    if HAVE_PACKAGING:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    return _simple_satisfies(version, specifier)


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"cannot parse version {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def _simple_satisfies(version: str, specifier: str) -> bool:
    """Release-segment comparison: enough for the plain ranges pyproject uses."""
    v = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        m = re.match(r"^(~=|===|==|!=|<=|>=|<|>)\s*(\S+)$", clause)
        if not m:
            raise ValueError(f"cannot parse specifier {clause!r}")
        op, target = m.groups()
        if op in ("==", "!=") and target.endswith(".*"):
            prefix = _release(target[:-2])
            hit = (v + (0,) * len(prefix))[:len(prefix)] == prefix
            ok = hit if op == "==" else not hit
        elif op == "===":
            ok = version.strip() == target
        elif op == "~=":
            t = _release(target)
            ok = _cmp(v, t) >= 0 and v[:len(t) - 1] == t[:-1]
        else:
            c = _cmp(v, _release(target))
            ok = {"==": c == 0, "!=": c != 0, "<=": c <= 0, ">=": c >= 0,
                  "<": c < 0, ">": c > 0}[op]
        if not ok:
            return False
    return True


# --- locks --------------------------------------------------------------------------------------

@dataclass
class Lock:
    digest: str | None = None
    pins: dict[str, str] = field(default_factory=dict)          # canonical name -> version
    hashes: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> sha256:...
    unpinned: list[str] = field(default_factory=list)           # requirement lines not `==`


_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*([^\s;]+)")


def parse_lock(text: str) -> Lock:
    lock = Lock()
    for raw in text.splitlines():
        if raw.startswith(DIGEST_PREFIX):
            lock.digest = raw[len(DIGEST_PREFIX):].strip()
    # join continuation lines, drop comments
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line or line.startswith("-"):  # blank, or an option line (-c, --index-url, ...)
            continue
        m = _PIN_RE.match(line)
        if not m:
            lock.unpinned.append(line.split()[0])
            continue
        name = canonical(m.group(1))
        lock.pins[name] = m.group(2)
        lock.hashes[name] = re.findall(r"--hash[= ](\S+)", line)
    return lock


def problems(decl: dict[str, list[str]], lock_texts: dict[str, str],
             project_name: str = "inbox-exporter") -> list[str]:
    """What makes the locks stale against pyproject's lists DECL; [] when they are current."""
    found: list[str] = []
    digest = deps_digest(decl)
    locks = {key: parse_lock(text) for key, text in lock_texts.items()}
    wanted = {"runtime": decl["runtime"], "test": decl["runtime"] + decl["test"]}
    for key, lock in locks.items():
        path = LOCKS[key]
        if lock.digest is None:
            found.append(f"{path} records no pyproject-deps-sha256")
        elif lock.digest != digest:
            found.append(f"{path} was made from other pyproject dependencies")
        for name in lock.unpinned:
            found.append(f"{path}: {name} is not pinned with ==")
        for name, hashes in sorted(lock.hashes.items()):
            if not hashes:
                found.append(f"{path}: {name} has no --hash")
        for text in wanted[key]:
            req = parse_requirement(text)
            if not req.applies or req.name == canonical(project_name):
                continue
            pin = lock.pins.get(req.name)
            if pin is None:
                found.append(f"{path}: {req.name} is not pinned")
            elif req.specifier and not satisfies(pin, req.specifier):
                found.append(f"{path}: {req.name}=={pin} does not satisfy {req.specifier!r}")
    if {"runtime", "test"} <= locks.keys():
        runtime, test = locks["runtime"].pins, locks["test"].pins
        for name in sorted(runtime.keys() & test.keys()):
            if runtime[name] != test[name]:
                found.append(f"{name} is {runtime[name]} in {LOCKS['runtime']} "
                             f"but {test[name]} in {LOCKS['test']}")
    return found


def read_pyproject(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def check(root: Path = ROOT) -> list[str]:
    pyproject = read_pyproject(root)
    texts: dict[str, str] = {}
    missing = []
    for key, rel in LOCKS.items():
        path = root / rel
        if path.exists():
            texts[key] = path.read_text(encoding="utf-8")
        else:
            missing.append(f"{rel} is missing")
    return missing + problems(declared(pyproject), texts, pyproject["project"]["name"])


def stale_message(found: list[str]) -> str:
    """One line: the fix first, then what is wrong."""
    return f"{STALE} ({'; '.join(found)})" if found else ""


# --- stamp (scripts/lock) ------------------------------------------------------------------------

def stamp_text(key: str, text: str, digest: str) -> str:
    """TEXT (pip-compile's output) with this module's header in front, an older one replaced."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        if line.startswith(DIGEST_PREFIX):
            lines = lines[i + 1:]
            break
    header = HEADERS[key] + REGENERATE + [DIGEST_PREFIX + digest]
    return "\n".join(header + lines) + "\n"


def stamp(root: Path = ROOT) -> None:
    digest = deps_digest(declared(read_pyproject(root)))
    for key, rel in LOCKS.items():
        path = root / rel
        path.write_text(stamp_text(key, path.read_text(encoding="utf-8"), digest),
                        encoding="utf-8")


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "check"
    if cmd == "digest":
        print(deps_digest(declared(read_pyproject())))
    elif cmd == "stamp":
        stamp()
    elif cmd == "check":
        found = check()
        if found:
            print(stale_message(found), file=sys.stderr)
            return 1
        print("requirements/*.lock are current with pyproject.toml")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
