#!/usr/bin/env bash
# Start a local, loopback-only Ray head (token auth on) and an MLflow tracking server for `ray job submit`.
#
#   cluster/local/start.sh            # then: source ~/.reddino/local-cluster/env
#   cluster/local/stop.sh             # stops exactly what this started (by recorded pid)
#
# Knobs (environment variables, all optional):
#   REDDINO_CLUSTER_DIR     state dir: pids, logs, env file, Ray temp dir, MLflow store (~/.reddino/local-cluster).
#                           Keep it short: Ray puts unix sockets under it (paths must stay < 108 chars).
#   REDDINO_DASHBOARD_PORT  Ray dashboard + Job API port on 127.0.0.1 (8265)
#   REDDINO_MLFLOW_PORT     MLflow server port on 127.0.0.1 (5000); REDDINO_MLFLOW=0 skips the server
#   REDDINO_RAY_PORT        GCS port (default: a free port; Ray's 6379 may belong to another head)
#   REDDINO_NUM_CPUS / REDDINO_NUM_GPUS   resources the head advertises (default: detected)
#   REDDINO_PYTHON          interpreter whose `ray` and `mlflow` are used (default: .venv/bin/python of the repo,
#                           else python3 on PATH); its bin dir goes first on PATH so jobs' `python` is the same one.
#   RAY_AUTH_TOKEN_PATH     token file (default ~/.ray/auth_token, Ray's own default); generated (mode 600) if absent.
#                           RAY_AUTH_TOKEN (the token itself) is honoured too and then nothing is written.
#
# Everything binds 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 + --node-ip-address/--dashboard-host 127.0.0.1
# for Ray, --host 127.0.0.1 for MLflow. Both run in their own session (setsid) so stop.sh can stop exactly them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${REDDINO_CLUSTER_DIR:-$HOME/.reddino/local-cluster}
dash_port=${REDDINO_DASHBOARD_PORT:-8265}
mlflow_port=${REDDINO_MLFLOW_PORT:-5000}
if [[ -n "${REDDINO_PYTHON:-}" ]]; then py=$REDDINO_PYTHON
elif [[ -x "$repo/.venv/bin/python" ]]; then py=$repo/.venv/bin/python
else py=$(command -v python3); fi
bindir=$(cd "$(dirname "$py")" && pwd)

mkdir -p "$state/logs"
state=$(cd "$state" && pwd)
alive() {  # the recorded pid still leads its own session (not a recycled pid)
  [[ -f "$1" ]] && [[ "$(ps -o sid= -p "$(cat "$1")" 2>/dev/null | tr -d ' ')" == "$(cat "$1")" ]]
}
if alive "$state/ray.pid" || alive "$state/mlflow.pid"; then
  echo "a local cluster from $state is already running; run cluster/local/stop.sh first" >&2
  exit 1
fi
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() {  # url, seconds, pid to watch: any HTTP answer (even 401) means the server is up
  local url=$1 secs=$2 pid=$3
  "$py" - "$url" "$secs" "$pid" <<'PY'
import os, sys, time, urllib.error, urllib.request
url, secs, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end = time.time() + secs
while time.time() < end:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(f"process {pid} exited before {url} answered")
        time.sleep(0.5)
sys.exit(f"{url} did not answer within {secs:.0f}s")
PY
}

export PATH="$bindir:$PATH"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
# On SIGTERM (stop.sh) the head drains running work before exiting; Ray's default waits up to 30 s. Locally there
# is nothing to hand over (jobs die with the head), so 5 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}

# --- token: Ray reads RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token ---
token_path=""
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_path=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [[ ! -s "$token_path" ]]; then
    mkdir -p "$(dirname "$token_path")"
    (umask 077 && "$py" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_path")
    echo "generated a Ray auth token in $token_path"
  fi
  export RAY_AUTH_TOKEN_PATH=$token_path
fi

# --- Ray head: `ray start --block` owns its children and tears them all down on SIGTERM ---
gcs_port=${REDDINO_RAY_PORT:-$(free_port)}
ray_args=(start --head --block --node-ip-address 127.0.0.1 --port "$gcs_port"
  --dashboard-host 127.0.0.1 --dashboard-port "$dash_port"
  --ray-client-server-port "$(free_port)" --dashboard-agent-listen-port "$(free_port)"
  --temp-dir "$state/ray" --disable-usage-stats)
[[ -n "${REDDINO_NUM_CPUS:-}" ]] && ray_args+=(--num-cpus "$REDDINO_NUM_CPUS")
[[ -n "${REDDINO_NUM_GPUS:-}" ]] && ray_args+=(--num-gpus "$REDDINO_NUM_GPUS")
(cd "$repo" && exec setsid "$bindir/ray" "${ray_args[@]}" >"$state/logs/ray-head.log" 2>&1 < /dev/null) &
echo $! > "$state/ray.pid"

# --- MLflow tracking server: sqlite metadata + local artifact store, served over HTTP to jobs ---
mlflow_uri=""
if [[ "${REDDINO_MLFLOW:-1}" != 0 ]]; then
  mkdir -p "$state/mlflow/artifacts"
  # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no background job runner (GenAI server-side jobs, 7 extra processes).
  (export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
   exec setsid "$bindir/mlflow" server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
      --backend-store-uri "sqlite:///$state/mlflow/mlflow.db" \
      --artifacts-destination "$state/mlflow/artifacts" \
      >"$state/logs/mlflow.log" 2>&1 < /dev/null) &
  echo $! > "$state/mlflow.pid"
  mlflow_uri="http://127.0.0.1:$mlflow_port"
fi

# --- both start in parallel; wait for their HTTP endpoints ---
fail() { echo "$1; see $2" >&2; "$here/stop.sh" >/dev/null 2>&1 || true; exit 1; }
wait_http "http://127.0.0.1:$dash_port/api/version" 120 "$(cat "$state/ray.pid")" \
  || fail "Ray head did not come up" "$state/logs/ray-head.log"
if [[ -n "$mlflow_uri" ]]; then
  wait_http "$mlflow_uri/health" 120 "$(cat "$state/mlflow.pid")" || fail "MLflow server did not come up" "$state/logs/mlflow.log"
fi

# --- what clients need: `source $state/env` ---
{
  echo "export RAY_ADDRESS=http://127.0.0.1:$dash_port"
  echo "export REDDINO_RAY_GCS_ADDRESS=127.0.0.1:$gcs_port"
  echo "export RAY_AUTH_MODE=token"
  [[ -n "$token_path" ]] && echo "export RAY_AUTH_TOKEN_PATH=$token_path"
  [[ -n "$mlflow_uri" ]] && echo "export MLFLOW_TRACKING_URI=$mlflow_uri"
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
} > "$state/env"
echo "local Ray head (pid $(cat "$state/ray.pid")): dashboard/Job API http://127.0.0.1:$dash_port, GCS 127.0.0.1:$gcs_port"
[[ -n "$mlflow_uri" ]] && echo "MLflow server (pid $(cat "$state/mlflow.pid")): $mlflow_uri"
echo "state, logs: $state"
echo "export these (or: source $state/env):"
sed 's/^/  /' "$state/env"
