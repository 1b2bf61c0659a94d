#!/usr/bin/env bash
# An ARM64 gateway, for real, under emulation (issue 10 item 5).
#
# Builds (once, cached) a Debian bookworm arm64 root file system with debootstrap + qemu-user-static,
# installs this project into a venv inside it from an offline wheelhouse (the C core compiles natively
# with the root's own gcc; the site runs stock onnxruntime, no training build, no torch), then runs one
# real federation round on this x86-64 host: a Mosquitto on its own port (broker_config/ template via
# `fedpeft-edge broker`), an x86-64 aggregator, one x86-64 site agent and one site agent INSIDE the
# arm64 root (`chroot ROOT /venv/bin/fedpeft-edge agent ...`, executed by qemu-aarch64; network shared
# with the host), both training MiniLM LoRA on their own Reuters R8 shard. It checks that the aggregator
# accepted the arm64 site's update, prints a summary and writes a JSON result.
#
#   sudo bash scripts/arm64_gateway.sh                (needs root: apt-get, binfmt_misc, debootstrap, chroot)
#
# Environment (all optional):
#   FEDPEFT_ARM64_ROOT     cached arm64 root file system        (default /var/tmp/fedpeft-arm64-root)
#   FEDPEFT_ARM64_WORK     folder for this run's logs and state  (default: a new temp folder)
#   FEDPEFT_ARM64_RESULT   JSON result file                      (default $FEDPEFT_ARM64_WORK/result.json)
#   FEDPEFT_ARM64_PYTHON   host (x86-64, dev install) Python     (default python3)
#   FEDPEFT_ARM64_STEPS / _BATCH / _MAX_LEN   emulated training size (default 3 steps of 4 x 32 tokens)
#   FEDPEFT_ARM64_STAGE    "root" stops after building the root and its venv (no federation)
#   FEDPEFT_ARM64_REBUILD  1: throw the cached root away and debootstrap again (a cold run)
#   FEDPEFT_ARM64_TIMEOUT  seconds the round may take before its services are stopped (default 1800)
#
# Emulated timings say nothing about real ARM hardware: qemu-user translates every instruction.
# Idempotent: a second run reuses the root, the wheelhouse and the installed project (reinstalled only
# when the project's source changed) and takes the federation round's time only.
# Never mounts /sys into the root: with /proc and /sys both there, onnxruntime's cpuinfo crashes under
# qemu. The arm64 agent alone gets a /proc, in a private mount namespace (onnxruntime needs
# /proc/self/fd to open the gradient model's external data); nothing is ever mounted on the host's side.
set -euo pipefail
# The whole body is one function, parsed before it runs: editing this file during a run cannot break it.
main() {
cd "$(dirname "$0")/.."

ROOT=${FEDPEFT_ARM64_ROOT:-/var/tmp/fedpeft-arm64-root}
WORK=${FEDPEFT_ARM64_WORK:-}
PY=${FEDPEFT_ARM64_PYTHON:-python3}
STEPS=${FEDPEFT_ARM64_STEPS:-3}
BATCH=${FEDPEFT_ARM64_BATCH:-4}
MAX_LEN=${FEDPEFT_ARM64_MAX_LEN:-32}
STAGE=${FEDPEFT_ARM64_STAGE:-all}
SUITE=bookworm
# Paths inside the root (also seen from the host under $ROOT).
IN_WH=/opt/fedpeft/wheelhouse
IN_SRC=/opt/fedpeft/src
IN_RUN=/opt/fedpeft/run

T_START=$(date +%s)
say() { printf '[arm64-gateway %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf '[arm64-gateway] FAILED: %s\n' "$*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, binfmt_misc, debootstrap and chroot need it)"
[ "$(uname -m)" = x86_64 ] || die "this script emulates arm64 on an x86-64 host; this is $(uname -m)"
command -v apt-get >/dev/null || die "needs a Debian host (apt-get not found)"

# --- 1. host tools: debootstrap, qemu-user-static, binfmt-support ---------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying the install with the current lists"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >/tmp/fedpeft-arm64-apt.log 2>&1 \
        || { tail -n 20 /tmp/fedpeft-arm64-apt.log >&2; die "apt-get could not install ${need[*]}"; }
fi
command -v debootstrap >/dev/null || die "debootstrap is missing after the install"
[ -x /usr/bin/qemu-aarch64-static ] || die "/usr/bin/qemu-aarch64-static is missing after the install"

# --- 2. binfmt_misc: let the kernel hand aarch64 binaries to qemu-aarch64-static -------------------
# Not mounted on these machines; without it debootstrap fails with "Unable to execute target architecture".
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "cannot mount binfmt_misc (a container without the privilege?)"
fi
if ! grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
fi
grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt entry qemu-aarch64 is not enabled"
# The F flag (fix binary) loads the interpreter now, so it works inside a chroot without a copy of qemu.
grep -qs '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || say "warning: qemu-aarch64 binfmt entry lacks the F flag; copying qemu into the root as well"

# --- 3. the Debian mirror the host's apt uses (never written down here) --------------------------
mirror() {
    local f uri
    # deb822 sources: the first URIs line of a stanza whose Suites hold the plain suite.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v s="$SUITE" '
            /^[[:space:]]*$/ { if (u != "" && ok) { print u; exit } u = ""; ok = 0; next }
            /^URIs:/ { u = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
            END { if (u != "" && ok) print u }' "$f" | head -n1)
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    # one-line sources: "deb [options] URI SUITE COMPONENTS"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
              if ($(i + 1) == s) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
}

# --- 4. the root file system (cached) ----------------------------------------------------------
BASE_STAMP=$ROOT/opt/fedpeft/.base-ok
if [ "${FEDPEFT_ARM64_REBUILD:-0}" = 1 ] && [ -e "$ROOT" ]; then
    say "FEDPEFT_ARM64_REBUILD=1: removing the cached root $ROOT"
    rm -rf --one-file-system "$ROOT"
fi
T_ROOT=$(date +%s)
DEBOOTSTRAP_S=0
if [ ! -e "$BASE_STAMP" ]; then
    MIRROR=$(mirror)
    [ -n "$MIRROR" ] || die "no Debian $SUITE mirror found in /etc/apt/sources.list or sources.list.d"
    partial="$ROOT.partial"
    rm -rf --one-file-system "$partial" "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    say "debootstrap $SUITE arm64 into $partial (about 6 minutes under emulation)"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,python3-dev,gcc,libc6-dev \
        "$SUITE" "$partial" "$MIRROR" >"$(dirname "$ROOT")/fedpeft-arm64-debootstrap.log" 2>&1 \
        || { tail -n 30 "$(dirname "$ROOT")/fedpeft-arm64-debootstrap.log" >&2
             die "debootstrap failed (log: $(dirname "$ROOT")/fedpeft-arm64-debootstrap.log)"; }
    mkdir -p "$partial/opt/fedpeft"
    mv "$partial" "$ROOT"
    touch "$BASE_STAMP"
    DEBOOTSTRAP_S=$(elapsed "$T_ROOT")
    say "root file system ready in ${DEBOOTSTRAP_S} s"
else
    say "reusing the cached root $ROOT"
fi
if ! grep -qs '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
fi
# /sys must never be mounted in the root (see step 8); a /proc left from a crashed hand run is unmounted.
mountpoint -q "$ROOT/sys" && die "$ROOT/sys is mounted; unmount it (onnxruntime crashes under qemu with it)"
if mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || die "cannot unmount $ROOT/proc"; fi
# The root must really be aarch64, executed through qemu.
ROOT_MACHINE=$(chroot "$ROOT" /usr/bin/uname -m) || die "cannot execute the arm64 root (binfmt/qemu broken)"
[ "$ROOT_MACHINE" = aarch64 ] || die "the root reports machine $ROOT_MACHINE, not aarch64"
ROOT_PYTHON=$(chroot "$ROOT" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || die "python3 does not run in the root"
[ "$ROOT_PYTHON" = 3.11 ] || die "the root's python is $ROOT_PYTHON; the wheelhouse is made for 3.11"

# --- 5. the offline wheelhouse (made on the host: pip in the root cannot verify TLS) ------------
# The device dependencies are the [project] dependencies of pyproject.toml (base install: stock
# onnxruntime, no training build, no torch) plus the build requirements of the C core.
WH=$ROOT$IN_WH
DEPS=$("$PY" - <<'PYDEPS'
import tomllib
with open("pyproject.toml", "rb") as f:
    p = tomllib.load(f)
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))
PYDEPS
) || die "cannot read the dependencies from pyproject.toml"
DEPS_KEY=$(printf '%s\n' "$DEPS" | sha256sum | cut -c1-16)
T_WH=$(date +%s)
if [ ! -e "$WH/.ok-$DEPS_KEY" ]; then
    say "downloading the aarch64 wheelhouse on the host"
    rm -rf "$WH"; mkdir -p "$WH"
    mapfile -t dep_list <<<"$DEPS"
    platform=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
              --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
              --platform manylinux_2_17_aarch64 --platform any)
    # A package with no wheel at all (an sdist only, e.g. a pure-Python one) is built into a wheel on the
    # host and offered to the resolver from the wheelhouse; a compiled one would be refused for aarch64.
    for attempt in 1 2 3 4 5 6; do
        if "$PY" -m pip download -q "${platform[@]}" --find-links "$WH" -d "$WH" "${dep_list[@]}" \
            2>"$WH/.pip-download.err"; then
            break
        fi
        missing=$(sed -n 's/.*No matching distribution found for \([A-Za-z0-9._-]*\).*/\1/p' \
            "$WH/.pip-download.err" | head -n1)
        if [ -z "$missing" ] || [ "$attempt" = 6 ]; then
            cat "$WH/.pip-download.err" >&2
            die "pip download of the aarch64 wheelhouse failed"
        fi
        say "no aarch64/any wheel of $missing: building a wheel from its sdist on the host"
        "$PY" -m pip wheel -q --no-deps -w "$WH" "$missing" || die "cannot build a wheel of $missing"
        ls "$WH" | grep -i "^${missing//-/_}-.*-none-any\.whl$" >/dev/null \
            || die "$missing is not pure Python; it would need compiling inside the root"
    done
    rm -f "$WH/.pip-download.err"
    touch "$WH/.ok-$DEPS_KEY"
    say "wheelhouse: $(ls "$WH"/*.whl | wc -l) wheels in $(elapsed "$T_WH") s"
else
    say "reusing the wheelhouse ($(ls "$WH"/*.whl | wc -l) wheels)"
fi

# --- 6. the project in a venv inside the root (C core compiled by the root's gcc, as aarch64) -----
# Reinstalled only when the source changed: a hash over the files a `pip install .` reads (README.md is
# copied for the package metadata but left out of the hash: editing it changes no code).
SRC_FILES=$(git ls-files -co --exclude-standard -- pyproject.toml setup.py build.py README.md csrc fedpeft_edge \
    | grep -v -E '(__pycache__|\.so$|\.o$)' | while read -r f; do if [ -f "$f" ]; then echo "$f"; fi; done | sort)
SRC_KEY=$( (printf '%s\n' "$SRC_FILES"; printf '%s\n' "$SRC_FILES" | grep -vx README.md | xargs -d '\n' cat) \
    | sha256sum | cut -c1-16)
T_INSTALL=$(date +%s)
INSTALL_S=0
if [ ! -x "$ROOT/venv/bin/python" ]; then
    chroot "$ROOT" /usr/bin/python3 -m venv /venv || die "cannot make the venv inside the root"
fi
if [ ! -e "$ROOT/venv/.ok-$SRC_KEY-$DEPS_KEY" ]; then
    say "installing the project into the root's venv (compiling the C core under emulation)"
    rm -rf "$ROOT$IN_SRC"; mkdir -p "$ROOT$IN_SRC"
    printf '%s\n' "$SRC_FILES" | tar -cf - -T - | tar -xf - -C "$ROOT$IN_SRC"
    # HOME and TMPDIR inside the root; no /proc, so pip's cache and build dirs must be ordinary folders.
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin TMPDIR=/tmp \
        /venv/bin/python -m pip install -q --no-index --find-links "$IN_WH" "$IN_SRC" \
        >"$ROOT/opt/fedpeft/install.log" 2>&1 \
        || { tail -n 40 "$ROOT/opt/fedpeft/install.log" >&2; die "pip install inside the root failed"; }
    rm -f "$ROOT"/venv/.ok-*
    touch "$ROOT/venv/.ok-$SRC_KEY-$DEPS_KEY"
    INSTALL_S=$(elapsed "$T_INSTALL")
    say "installed in ${INSTALL_S} s"
else
    say "reusing the installed project (source unchanged)"
fi
# What the gateway really runs: aarch64 Python, stock onnxruntime, the C core built for it.
DEVICE_JSON=$(chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin /venv/bin/python - <<'PYDEV'
import importlib.metadata as md, json, platform, sysconfig
names = {d.metadata["Name"].lower() for d in md.distributions()}
bad = sorted(n for n in names if n.startswith("onnxruntime-training") or n == "torch")
if bad or "onnxruntime" not in names:
    raise SystemExit(f"device venv is wrong: unwanted {bad}, onnxruntime present: {'onnxruntime' in names}")
from fedpeft_edge import _core
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "onnxruntime": md.version("onnxruntime"), "numpy": md.version("numpy"),
                  "core": _core.__file__.rsplit("/", 1)[-1], "platform_tag": sysconfig.get_platform()}))
PYDEV
) || die "the root's venv is not a working device install"
say "device: $DEVICE_JSON"
[ "$STAGE" = root ] && { say "FEDPEFT_ARM64_STAGE=root: stopping before the federation"; exit 0; }

# --- 7. the model and each site's data, made on the host (x86-64 dev install with the training build) ---
# The cached bundle builder (fedpeft-edge prepare's code): MiniLM exported once, LoRA artifacts, lowered to
# a gradient model for stock onnxruntime. Each site gets its own Reuters R8 shard as a local .jsonl file
# ([data] path), so the root needs no data packages.
[ -n "$WORK" ] || WORK=$(mktemp -d /tmp/fedpeft-arm64-run.XXXXXX)
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
RESULT=${FEDPEFT_ARM64_RESULT:-$WORK/result.json}
RUN=$ROOT$IN_RUN  # this run's files inside the root (wiped each run)
rm -rf "$RUN" "$WORK/agg" "$WORK/site-x86" "$WORK/broker"
mkdir -p "$RUN"
T_PREP=$(date +%s)
say "preparing the MiniLM LoRA gradient model and the sites' data on the host (cached after the first run)"
"$PY" - "$WORK" "$ROOT/opt/fedpeft" "$RUN" "$((STEPS * BATCH))" >"$WORK/prepare.log" 2>&1 <<'PYPREP' \
    || { tail -n 30 "$WORK/prepare.log" >&2; die "preparing the model or the data failed (log: $WORK/prepare.log)"; }
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from fedpeft_edge.data.datasets import load_dataset
from fedpeft_edge.data.partition import partition
from fedpeft_edge.faces.tasks import TaskConfig, get_bundle, get_gradient_model, method_spec, prepare_backbone

work, root_opt, run, n = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
prepared = prepare_backbone(TaskConfig(kind="text", dataset="reuters_r8", max_len=64))
train = load_dataset("reuters_r8", "train")
bundle = get_bundle(prepared, method_spec("lora", "text", train.num_classes), log=print)
gradient = get_gradient_model(bundle, log=print)
# The gateway's copy of the gradient model (the [trainer] gradient_dir a plant copies to each gateway).
target = root_opt / "gradient"
stamp = root_opt / "gradient.spec"
if not (stamp.is_file() and stamp.read_text() == gradient.spec_hash and target.is_dir()):
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(gradient.directory, target)
    stamp.write_text(gradient.spec_hash)
shutil.copyfile(prepared.meta["tokenizer_json"], root_opt / "tokenizer.json")
# Two sites, IID shards of R8's training split; each keeps n documents (the emulated budget is small).
parts = partition("iid", train.labels, None, 2, 0.5, 0)
for site, idx, folder in (("x86", parts[0], work), ("arm64", parts[1], run)):
    rows = train.take(np.asarray(idx[:n]))
    with open(folder / f"site-{site}.jsonl", "w") as f:
        for text, label in zip(rows.texts, rows.labels.tolist()):
            f.write(json.dumps({"text": text, "label": train.classes[label]}) + "\n")
(work / "prepared.json").write_text(json.dumps({
    "gradient_dir": str(gradient.directory), "tokenizer_json": prepared.meta["tokenizer_json"],
    "classes": train.classes, "spec_hash": gradient.spec_hash, "num_trainable": int(bundle.num_trainable)}))
print("prepared", gradient.directory, gradient.spec_hash)
PYPREP
PREP_S=$(elapsed "$T_PREP")
j() { "$PY" -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print(json.dumps(v) if isinstance(v, list) else v)' "$WORK/prepared.json" "$1"; }
HOST_GRADIENT=$(j gradient_dir); HOST_TOKENIZER=$(j tokenizer_json); CLASSES=$(j classes)
say "model and data ready in ${PREP_S} s (spec $(j spec_hash | cut -c1-12), $(j num_trainable) trainable)"

# --- 8. one federation round: Mosquitto, an x86-64 aggregator, an x86-64 site, the arm64 site ---------
PIDS=()
cleanup() {  # stop only what this script started, by process id
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
# exec: started with `&`, the function's subshell becomes the service itself, so $! is the service's pid
# and the kills below reach it (a plain call left the service running after its subshell was killed).
cli() { exec "$PY" -m fedpeft_edge.faces.cli "$@"; }
FLEET=arm64gw

# Mosquitto from the broker_config/ dev template (loopback, anonymous) on a free port of its own.
cli broker --kind dev --prefer mosquitto --port 0 --data-dir "$WORK/broker" >"$WORK/broker.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    PORT=$(sed -n 's/^BROKER [^:]*:\([0-9]*\)$/\1/p' "$WORK/broker.log" | head -n1)
    [ -n "$PORT" ] && break
    kill -0 "${PIDS[0]}" 2>/dev/null || break
    sleep 0.2
done
[ -n "${PORT:-}" ] || { cat "$WORK/broker.log" >&2; die "Mosquitto did not start"; }
grep -q "mosquitto broker running" "$WORK/broker.log" || { cat "$WORK/broker.log" >&2; die "the broker is not Mosquitto"; }
say "Mosquitto on 127.0.0.1:$PORT"

cat >"$WORK/aggregator.toml" <<TOML
[connection]
port = $PORT
[fleet]
name = "$FLEET"
[aggregator]
state_dir = "$WORK/agg"
max_rounds = 1
quorum = 2
min_clients = 2
round_deadline_s = 3600
final_linger_s = 60
[trainer]
kind = "gradient"
gradient_dir = "$HOST_GRADIENT"
TOML
site_toml() {  # site-id state_dir gradient_dir data_path tokenizer threads
    cat <<TOML
[connection]
port = $PORT
[fleet]
name = "$FLEET"
[agent]
client_id = "site-$1"
state_dir = "$2"
local_steps = $STEPS
threads = $6
evaluate = false
dump_updates = true
idle_exit_s = 3600
drain_timeout_s = 120
exit_after_final = true
[codec]
mode = "topk_int8"
topk_ratio = 0.1
[trainer]
kind = "gradient"
gradient_dir = "$3"
[data]
path = "$4"
classes = $CLASSES
eval_fraction = 0.0
batch_size = $BATCH
options = { model_kind = "text", tokenizer_json = "$5", max_len = $MAX_LEN }
TOML
}
site_toml x86 "$WORK/site-x86" "$HOST_GRADIENT" "$WORK/site-x86.jsonl" "$HOST_TOKENIZER" 1 >"$WORK/site-x86.toml"
site_toml arm64 "$IN_RUN/site-arm64" /opt/fedpeft/gradient "$IN_RUN/site-arm64.jsonl" /opt/fedpeft/tokenizer.json 2 \
    >"$RUN/site-arm64.toml"
cp "$RUN/site-arm64.toml" "$WORK/"

T_ROUND=$(date +%s)
cli aggregate --config "$WORK/aggregator.toml" >"$WORK/aggregator.log" 2>&1 &
AGG=$!; PIDS+=($AGG)
cli agent --config "$WORK/site-x86.toml" >"$WORK/site-x86.log" 2>&1 &
X86=$!; PIDS+=($X86)
# The arm64 site: its own Python, onnxruntime and C core, executed by qemu-aarch64, on the host's network
# (127.0.0.1:$PORT is the host's Mosquitto). onnxruntime >= 1.2x opens external-data initializers (the
# frozen base in base.data) only through /proc/self/fd, so the agent gets a /proc -- mounted in a private
# mount namespace that lives and dies with it (never visible on the host, nothing to unmount). /sys stays
# unmounted: /proc and /sys together make onnxruntime's cpuinfo crash under qemu (SIGSEGV); either alone
# only makes it warn (measured here; STACK_NOTES' "no /proc, no /sys" predates the external-data check).
unshare --mount --propagation private -- /bin/sh -c \
    'mount -t proc proc "$1/proc" || exit 90; exec chroot "$@"' sh "$ROOT" \
    /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin PYTHONUNBUFFERED=1 \
    /venv/bin/fedpeft-edge agent --config "$IN_RUN/site-arm64.toml" >"$WORK/site-arm64.log" 2>&1 &
ARM=$!; PIDS+=($ARM)
sleep 1
# unshare, sh, chroot and env exec(), so this pid is the agent itself; its executable is the emulator.
ARM_EXE=$(readlink "/proc/$ARM/exe" 2>/dev/null || echo "?")
say "aggregator pid $AGG, x86-64 site pid $X86, arm64 site pid $ARM (executable: $ARM_EXE); waiting for the round"

# Wait for all three, bounded (FEDPEFT_ARM64_TIMEOUT, default 1800 s); a service still running then is
# stopped and counts as failed.
deadline=$(( T_ROUND + ${FEDPEFT_ARM64_TIMEOUT:-1800} ))
ARM_WALL=
while kill -0 "$AGG" 2>/dev/null || kill -0 "$X86" 2>/dev/null || kill -0 "$ARM" 2>/dev/null; do
    if [ -z "$ARM_WALL" ] && ! kill -0 "$ARM" 2>/dev/null; then
        ARM_WALL=$(elapsed "$T_ROUND"); say "arm64 site finished after ${ARM_WALL} s"
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then say "timeout: stopping what still runs"; break; fi
    sleep 1
done
[ -n "$ARM_WALL" ] || ARM_WALL=$(elapsed "$T_ROUND")
ROUND_S=$(elapsed "$T_ROUND")
for p in "$AGG" "$X86" "$ARM"; do kill "$p" 2>/dev/null || true; done
rc_of() { local rc=0; wait "$1" || rc=$?; echo "$rc"; }
ARM_RC=$(rc_of "$ARM"); X86_RC=$(rc_of "$X86"); AGG_RC=$(rc_of "$AGG")
kill "${PIDS[0]}" 2>/dev/null || true; wait "${PIDS[0]}" 2>/dev/null || true
PIDS=()
# Keep the arm64 site's state beside the host's logs; drop the sites' exported merged models (about 90 MB
# per version and site), which the verdict does not need.
cp -r "$RUN/site-arm64" "$WORK/site-arm64" 2>/dev/null || true
rm -rf "$WORK/site-arm64/model" "$WORK/site-x86/model" "$RUN/site-arm64/model"

# --- 9. verdict, summary and the JSON result ----------------------------------------------------------
export DEVICE_JSON ARM_EXE ARM_RC X86_RC AGG_RC STEPS BATCH MAX_LEN ROOT
export DEBOOTSTRAP_S INSTALL_S PREP_S ARM_WALL ROUND_S TOTAL_S=$(elapsed "$T_START")
"$PY" - "$WORK" "$RESULT" <<'PYRESULT' || exit 1
import json
import os
import sys
import time
from pathlib import Path

from fedpeft_edge.protocol import wire

work, result, env = Path(sys.argv[1]), Path(sys.argv[2]), os.environ
device = json.loads(env["DEVICE_JSON"])
metrics_file = work / "agg" / "metrics.jsonl"
metrics = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()] if metrics_file.is_file() else []


def sent(site):
    files = sorted((work / f"site-{site}" / "sent").glob("r*.msg"))
    return (wire.decode_update(files[0].read_bytes()), files[0].stat().st_size) if files else (None, 0)


def step_s(u):
    return round(u.metrics["train_seconds"] / u.metrics["steps"], 3) if u and u.metrics.get("steps") else None


(arm, arm_bytes), (x86, _) = sent("arm64"), sent("x86")
arm_log = (work / "site-arm64.log").read_text(errors="replace")
participants = metrics[0]["participants"] if metrics else []
checks = {
    "arm64 agent exited 0": env["ARM_RC"] == "0",
    "x86-64 agent exited 0": env["X86_RC"] == "0",
    "aggregator exited 0": env["AGG_RC"] == "0",
    "arm64 site ran as aarch64 under qemu": device["machine"] == "aarch64" and "qemu-aarch64" in env["ARM_EXE"],
    "arm64 site sent an update": arm is not None,
    "round 0 closed with site-arm64 counted": bool(metrics) and metrics[0]["round"] == 0
    and "site-arm64" in participants,
    "aggregator acknowledged it as accepted": "acknowledged by the aggregator: accepted" in arm_log,
}
steps, batch, max_len = int(env["STEPS"]), int(env["BATCH"]), int(env["MAX_LEN"])
out = {
    "ok": all(checks.values()),
    "checks": checks,
    "note": "emulated under qemu-user on an x86-64 host: says nothing about real ARM hardware",
    "arm64_device": device,
    "arm64_agent_executable": env["ARM_EXE"],
    "emulated_step_s": step_s(arm),
    "x86_64_step_s": step_s(x86),
    "arm64_update": None if arm is None else {"round": arm.round, "samples": arm.num_samples,
                                              "metrics": arm.metrics, "bytes": arm_bytes},
    "steps": steps, "batch": batch, "max_len": max_len,
    "round": metrics[0] if metrics else None,
    "seconds": {k: int(env[v]) for k, v in (("debootstrap", "DEBOOTSTRAP_S"), ("install_in_root", "INSTALL_S"),
                                             ("prepare_on_host", "PREP_S"), ("arm64_agent_wall", "ARM_WALL"),
                                             ("round_total", "ROUND_S"), ("script_total", "TOTAL_S"))},
    "logs": str(work),
    "root": env["ROOT"],
    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
}
result.write_text(json.dumps(out, indent=2, default=str) + "\n")
print("\n== ARM64 gateway under emulation ==")
print(f"arm64 site:  {device['machine']}, python {device['python']}, onnxruntime {device['onnxruntime']} (stock), "
      f"C core {device['core']}; ran by {out['arm64_agent_executable']}")
print(f"training:    {steps} steps of MiniLM LoRA per site, batch {batch} x {max_len} tokens")
print(f"step time:   {out['emulated_step_s']} s emulated aarch64 (qemu-user: says nothing about real ARM "
      f"hardware) vs {out['x86_64_step_s']} s native x86-64")
if metrics:
    m = metrics[0]
    print(f"round 0:     participants {m['participants']}, loss {m.get('loss')}, bytes in {m.get('bytes_in')}")
for name, ok in checks.items():
    print(f"  [{'ok' if ok else 'FAIL'}] {name}")
print(f"times (s):   {out['seconds']}")
print(f"result:      {result}   logs: {work}")
sys.exit(0 if out["ok"] else 1)
PYRESULT
say "done: the aggregator accepted the arm64 gateway's update"
}

main "$@"
