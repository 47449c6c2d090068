#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it (not editable, no extras) into a fresh venv
# and, from a directory outside the checkout with a fresh BQX_HOME, check that
#   - `bqx demo --months 1` exits 0 and writes the report;
#   - `bqx backfill --executor dask` fails with one stderr line naming the "dask" extra,
#     `bqx update --follow --metrics-port` with one naming the "service" extra, and a database
#     secret (BQX_DATABASE_SECRET) with one naming the "aws" extra;
#   - the wheel holds bqx/py.typed and every .py file under src/bqx, and nothing else of bqx.
# Then `bqx db stop` and everything is removed. Quiet unless something fails.
#
#   make wheel-check                      # or: tools/wheel_check.sh
#   PYTHON=python3.12 make wheel-check    # another interpreter (>= 3.11)
#   WHEEL_CHECK_KEEP=1 make wheel-check    # keep the venv, the logs and BQX_HOME (server stopped)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
t0=$SECONDS

# nothing from the caller's environment may choose the database, the code or the home
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(BQX_|PG)' || true)
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

work=$(mktemp -d "${TMPDIR:-/tmp}/bqx-wheel.XXXXXX")
venv=$work/venv
export BQX_HOME=$work/home
run=$work/run # the working directory of every bqx command: no checkout in sight
log=$work/log
mkdir -p "$run" "$log"

cleanup() {
    if [[ -x $venv/bin/bqx && -d $BQX_HOME/pg ]]; then
        (cd "$run" && "$venv/bin/bqx" db stop >/dev/null 2>&1) || true
    fi
    if [[ ${WHEEL_CHECK_KEEP:-} ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

fail() {
    echo "wheel check FAILED: $1" >&2
    shift
    for f in "$@"; do
        [[ -s $f ]] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
    done
    exit 1
}

# -- build, from a copy of the tree (a stale build/ in the checkout must not leak in) ---------
mkdir "$work/tree"
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md src |
    tar -C "$work/tree" -xf -
"$PYTHON" -m venv "$venv" || fail "cannot create a venv with $PYTHON"
"$venv/bin/python" -m pip wheel --quiet --no-deps -w "$work/dist" "$work/tree" \
    >"$log/build.txt" 2>&1 || fail "pip wheel" "$log/build.txt"
wheels=("$work"/dist/*.whl)
[[ ${#wheels[@]} == 1 && -f ${wheels[0]} ]] || fail "expected one wheel in $work/dist"
wheel=${wheels[0]}

# -- contents: bqx/py.typed and exactly the .py files of src/bqx --------------------------
"$venv/bin/python" - "$wheel" "$repo/src" >"$log/contents.txt" 2>&1 <<'EOF' ||
import sys, zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
in_wheel = {n for n in names if n.startswith("bqx/") and n.endswith(".py")}
in_src = {p.relative_to(src).as_posix() for p in (src / "bqx").rglob("*.py")
          if "__pycache__" not in p.parts}
problems = [f"missing from the wheel: {n}" for n in sorted(in_src - in_wheel)]
problems += [f"in the wheel, not in src: {n}" for n in sorted(in_wheel - in_src)]
if "bqx/py.typed" not in names:
    problems.append("missing from the wheel: bqx/py.typed")
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
fields = zipfile.ZipFile(wheel).read(meta).decode().splitlines()
if "Name: bqx-metrics" not in fields:
    problems.append(f"{meta}: the distribution is not named bqx-metrics")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
    fail "the wheel's contents ($(basename "$wheel"))" "$log/contents.txt"

# -- install: not editable, no extras ----------------------------------------------------
"$venv/bin/python" -m pip install --quiet "$wheel" >"$log/install.txt" 2>&1 ||
    fail "pip install $(basename "$wheel")" "$log/install.txt"
(cd "$run" && "$venv/bin/python" - "$venv") >"$log/imports.txt" 2>&1 <<'EOF' ||
import importlib.util, sys
from pathlib import Path

import bqx

venv = Path(sys.argv[1]).resolve()
problems = []
if venv not in Path(bqx.__file__).resolve().parents:
    problems.append(f"bqx imported from {bqx.__file__}, not from the venv")
for extra, module in [("dask", "dask"), ("dask", "distributed"), ("ml", "sklearn"),
                      ("ml", "lightgbm"), ("service", "prometheus_client"),
                      ("aws", "boto3")]:
    if importlib.util.find_spec(module) is not None:
        problems.append(f"{module} (extra {extra}) is installed without asking for it")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
    fail "the core install" "$log/imports.txt"
core_mb=$(du -sm "$venv"/lib/python*/site-packages | cut -f1)

bqx() { (cd "$run" && "$venv/bin/bqx" "$@"); }

# -- the tour ----------------------------------------------------------------------------
bqx demo --months 1 >"$log/demo.txt" 2>&1 || fail "bqx demo --months 1" "$log/demo.txt"
for f in report.md report.html; do
    [[ -s $run/bqx-report/$f ]] || fail "bqx demo wrote no bqx-report/$f" "$log/demo.txt"
done

# -- a missing extra is one line (exit 1) -------------------------------------------------
one_line() { # extra, then the command
    local extra=$1 rc=0
    shift
    # (a timeout: with the extra installed by mistake, --follow would run on)
    (cd "$run" && timeout 300 "$venv/bin/bqx" "$@") >"$log/out.txt" 2>"$log/err.txt" || rc=$?
    local lines
    lines=$(wc -l <"$log/err.txt")
    [[ $rc == 1 ]] || fail "bqx $* exited $rc, expected 1" "$log/err.txt" "$log/out.txt"
    [[ $lines == 1 ]] || fail "bqx $* wrote $lines lines on stderr, expected 1" "$log/err.txt"
    grep -qF "\"$extra\" extra: pip install 'bqx-metrics[$extra]'" "$log/err.txt" ||
        fail "bqx $* did not name the \"$extra\" extra" "$log/err.txt"
}
one_line dask backfill --executor dask
one_line service update --follow 60 --metrics-port 9108
BQX_DATABASE_SECRET=prod/bqx one_line aws status

# -- stop the server ---------------------------------------------------------------------
[[ $(bqx db stop 2>&1) == stopped ]] || fail "bqx db stop did not say stopped"

echo "wheel check: ok ($(basename "$wheel"), core install ${core_mb} MB of site-packages," \
    "$((SECONDS - t0)) s)"
