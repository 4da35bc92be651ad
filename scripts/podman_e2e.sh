#!/usr/bin/env bash
# The image and the manifests, run for real with podman (no Docker daemon, no registry, no cluster):
#   1. build a Debian 12 base image with mmdebstrap (+ the host's extra CA certificates),
#   2. build the project's Dockerfile on it (CPU only),
#   3. `podman kube play` the training Job's pod (k8s/30-train-job.yaml, $(VAR)s expanded from
#      k8s/20-config.yaml by scripts/podman_kube.py): it publishes a model version into the volume,
#   4. `podman kube play` the Deployment (k8s/40-server-deployment.yaml): it becomes SERVING,
#   5. the thin client on the host (the source tree's fovea.cli): health, predict; /metrics answers,
#   6. `podman kube down`: the server drains and exits 0.
# Each step's time is printed. What podman cannot check (probes, Services, HPA, NetworkPolicy, preStop)
# is checked offline by tests/test_deploy_manifests.py; docs/deploy.md lists it.
#
# Usage: scripts/podman_e2e.sh        (root: installs what it needs with apt)
# Exit 0: passed, or podman cannot run here at all (the reason is printed). Anything else: failed.
# Env: FOVEA_E2E_DIR (work folder, default /tmp/fovea-podman-e2e), FOVEA_E2E_KEEP=1 (keep the images
# and volumes), PYTHON (an interpreter with grpcio, numpy and pyyaml; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD
work="${FOVEA_E2E_DIR:-/tmp/fovea-podman-e2e}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in "${FOVEA_VENV:-.venv}/bin/python" .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null; then python=$candidate; break; fi
  done
fi
base_image=localhost/fovea-e2e-base:bookworm
grpc_port="${FOVEA_E2E_GRPC_PORT:-18500}"
metrics_port="${FOVEA_E2E_METRICS_PORT:-19090}"
# A small, fast demo training (the ConfigMap's own values train ResNet50 at 224 px on ImageNet
# weights, which CI can neither download nor afford): no ImageNet weights, 32 px, one epoch.
train_overrides=(
  FOVEA_TRAIN_WEIGHTS=none
  FOVEA_TRAIN_INPUT_SIZE=32
  FOVEA_TRAIN_EPOCHS=1
  FOVEA_TRAIN_FINE_TUNE_EPOCHS=0
  FOVEA_POLL_INTERVAL=2
)

say() { printf '\n[podman-e2e] %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*"; exit 1; }
stage_start=$(date +%s)
step_start=$stage_start
declare -a timings=()
step_done() {
  local now; now=$(date +%s)
  timings+=("$(printf '%-44s %4d s' "$1" $((now - step_start)))")
  say "$1: done in $((now - step_start)) s"
  step_start=$now
}
report_timings() {
  say "step durations:"
  printf '  %s\n' "${timings[@]}"
  printf '  %-44s %4d s\n' "total" $(($(date +%s) - stage_start))
}

# ---- 0. tools -------------------------------------------------------------------------------------
tools=(podman buildah mmdebstrap newuidmap fuse-overlayfs slirp4netns runc)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    skip "${missing[*]} not installed, and this is not root on Debian/Ubuntu (apt-get install -y podman buildah mmdebstrap uidmap fuse-overlayfs slirp4netns runc)"
  fi
  say "installing podman buildah mmdebstrap uidmap fuse-overlayfs slirp4netns runc"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman buildah mmdebstrap uidmap fuse-overlayfs slirp4netns runc >/dev/null
fi
mkdir -p "$work"
# crun refuses this machine's cgroup layout and the ulimits cannot be raised: runc, cgroupfs, and
# limits within the hard ones.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=20000; [ "$nproc" = unlimited ] && nproc=32768
[ "$nofile" -gt 20000 ] && nofile=20000; [ "$nproc" -gt 32768 ] && nproc=32768
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$work/containers.conf"
if ! info=$(podman info 2>&1); then
  skip "podman cannot run here: $(printf '%s' "$info" | tail -n 3)"
fi
"$python" -c 'import grpc, numpy, yaml' 2>/dev/null \
  || fail "$python lacks grpcio, numpy or pyyaml (set PYTHON to the dev venv's python)"
step_done "tools and containers.conf"

# ---- 1. base image --------------------------------------------------------------------------------
if ! podman image exists "$base_image"; then
  rm -f "$work/rootfs.tar"
  mmdebstrap --quiet --variant=minbase bookworm "$work/rootfs.tar"
  podman import --quiet "$work/rootfs.tar" localhost/fovea-e2e-rootfs:bookworm >/dev/null
  rm -f "$work/rootfs.tar"
  # The network may re-sign TLS (a proxy's CA): the image must trust what the host trusts.
  ctx="$work/base-context"
  rm -rf "$ctx" && mkdir -p "$ctx/certs"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
  cat >"$ctx/Containerfile" <<'EOF'
FROM localhost/fovea-e2e-rootfs:bookworm
COPY certs/ /usr/local/share/ca-certificates/
EOF
  podman build --quiet --network host -t "$base_image" "$ctx" >/dev/null
fi
step_done "base image (mmdebstrap + podman import)"

# ---- 2. the project's image -----------------------------------------------------------------------
image=$("$python" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("k8s/40-server-deployment.yaml")) if d]
print(docs[0]["spec"]["template"]["spec"]["containers"][0]["image"])')
say "building $image from the Dockerfile (base $base_image, CPU only)"
podman build --format docker --network host --build-arg BASE_IMAGE="$base_image" --build-arg TF_EXTRA= \
  -t "$image" . 2>&1 | grep --line-buffered -E '^(STEP|COMMIT|Successfully)|rror' || true
podman image exists "$image" || fail "podman build did not produce $image"
# The HEALTHCHECK survives only in the docker format: check it is there.
podman image inspect --format '{{.Config.Healthcheck}}' "$image" | grep -q fovea \
  || fail "the image lost its HEALTHCHECK (build with --format docker)"
step_done "podman build of the Dockerfile"

# ---- 3. the training Job's pod --------------------------------------------------------------------
kube="$work/kube"
sets=(); for kv in "${train_overrides[@]}"; do sets+=(--set "$kv"); done
"$python" scripts/podman_kube.py --out "$kube" "${sets[@]}" --grpc-port "$grpc_port" --metrics-port "$metrics_port"
cleanup() {
  set +e
  podman kube down "$kube/server.yaml" >/dev/null 2>&1
  podman kube down "$kube/train.yaml" >/dev/null 2>&1
  if [ "${FOVEA_E2E_KEEP:-0}" != 1 ]; then
    podman volume rm -f fovea-data fovea-models >/dev/null 2>&1
  fi
}
trap cleanup EXIT
cleanup  # a previous run's pods and volumes
say "note: podman's 'failed to connect to syslog' and 'unable to get systemd connection ... healthchecks' lines are harmless: this machine runs no systemd (Kubernetes probes are checked offline)"
say "podman kube play $kube/train.yaml (k8s/30-train-job.yaml as a Pod; overrides: ${train_overrides[*]})"
podman kube play "$kube/train.yaml" || fail "podman kube play train.yaml failed"
train_container=fovea-train-train
rc=$(podman wait "$train_container")
train_log=$(podman logs "$train_container" 2>&1)
printf '%s\n' "$train_log" | tail -n 12
console_best=$(printf '%s\n' "$train_log" | sed -n 's/.*; best epoch \([0-9]*\)$/\1/p' | tail -n 1)
[ "$rc" = 0 ] || fail "the training pod exited $rc"
published=$(podman run --rm --network none -v fovea-models:/models:ro --entrypoint /bin/sh "$image" \
  -c 'ls -d /models/*/*/saved_model.pb 2>/dev/null')
[ -n "$published" ] || fail "the training pod exited 0 but published no version into fovea-models"
say "published: $published"
podman kube down "$kube/train.yaml" >/dev/null
step_done "training Job pod (train + publish)"

# ---- 4. the Deployment's pod ----------------------------------------------------------------------
say "podman kube play $kube/server.yaml (k8s/40-server-deployment.yaml)"
podman kube play "$kube/server.yaml" || fail "podman kube play server.yaml failed"
# kube play names a Deployment's container <deployment>-pod-<n>-<container>.
server_container=$(podman ps --format '{{.Names}}' | grep -E -- '^fovea-server-pod-[0-9]+-server$' | head -n 1)
[ -n "$server_container" ] || fail "no server container is running"
# The manifest's own user, read-only root and args, as the container runs them.
podman inspect --format 'user={{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}} args={{.Config.Cmd}}' "$server_container"
client() { PYTHONPATH="$root_dir/client" "$python" -m fovea.cli "$@"; }
for _ in $(seq 1 120); do
  if client health --target "localhost:$grpc_port" --timeout 2 >/dev/null 2>&1; then break; fi
  if [ "$(podman inspect --format '{{.State.Running}}' "$server_container")" != true ]; then
    podman logs "$server_container" 2>&1 | tail -n 30
    fail "the server container exited before SERVING"
  fi
  sleep 2
done
client health --target "localhost:$grpc_port" --timeout 5 || { podman logs "$server_container" 2>&1 | tail -n 30; fail "never SERVING"; }
step_done "Deployment pod SERVING"

# ---- 5. the thin client and /metrics --------------------------------------------------------------
image_file="$work/sample.png"
podman run --rm --network none -v fovea-data:/data:ro --entrypoint /bin/sh "$image" \
  -c 'cat "$(ls /data/images/*/*.png | head -n 1)"' >"$image_file"
client predict --target "localhost:$grpc_port" --model demo "$image_file" || fail "predict failed"
# best_epoch as metadata reports it: the same number as the trainer's console line above.
metadata=$(client metadata --target "localhost:$grpc_port" --model demo) || fail "metadata failed"
printf '%s\n' "$metadata" | grep -E '^(model|version|classes|metric best_epoch) '
metadata_best=$(printf '%s\n' "$metadata" | awk '$1 == "metric" && $2 == "best_epoch" {print $3}')
[ -n "$console_best" ] && [ "$console_best" = "$metadata_best" ] \
  || fail "best epoch: the trainer printed '$console_best', metadata says '$metadata_best'"
metrics=$("$python" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
  "http://localhost:$metrics_port/metrics") || fail "/metrics did not answer"
printf '%s\n' "$metrics" | grep -E '^(fovea_requests_total|fovea_ready|process_resident_memory_bytes)'
printf '%s\n' "$metrics" | grep -E '^fovea_requests_total\{' | grep 'code="OK"' | grep -q 'method="Predict"' \
  || fail "/metrics does not count the Predict call"
if printf '%s\n' "$metrics" | grep -q '_created'; then fail "/metrics has *_created series"; fi
# A client pointed at a wrong port says so in one line, at once.
if client health --target localhost:1 2>"$work/unreachable.txt"; then fail "health on a closed port succeeded"; fi
cat "$work/unreachable.txt"
grep -q '^fovea health: error: cannot connect to localhost:1: connection refused$' "$work/unreachable.txt" \
  || fail "the client's message for a closed port is not the one line expected"
step_done "client health/predict and /metrics"

# ---- 6. clean stop --------------------------------------------------------------------------------
# The manifest's terminationGracePeriodSeconds (40 s) as podman's stop timeout: SIGTERM, then SIGKILL.
podman stop --time 40 "$server_container" >/dev/null || fail "podman stop failed"
rc=$(podman inspect --format '{{.State.ExitCode}}' "$server_container")
server_log=$(podman logs "$server_container" 2>&1)
printf '%s\n' "$server_log" | tail -n 4
[ "$rc" = 0 ] || fail "the server exited $rc on SIGTERM (expected a drain and exit 0)"
printf '%s\n' "$server_log" | grep -q '"message": "draining: ' || fail "the server's log does not show the drain"
printf '%s\n' "$server_log" | grep -q '"message": "stopped"' || fail "the server's log does not end with stopped"
# TensorFlow's native start-up lines are hidden by default (fovea --tf-logs keeps them).
if printf '%s\n' "$server_log" | grep -qE '^[IWE][0-9]{4} |cuInit'; then
  fail "TensorFlow's start-up lines are in the server's log"
fi
podman kube down "$kube/server.yaml" >/dev/null || fail "podman kube down failed"
step_done "clean stop (SIGTERM, drain, exit 0)"
report_timings
say "PASSED"
