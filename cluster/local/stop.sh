#!/usr/bin/env bash
# Stop the Ray head and MLflow server that cluster/local/start.sh started, and nothing else.
#
# Why not `ray stop`: it finds Ray processes by name and stops every Ray instance of this user on the machine
# (other heads, other people's `ray.init()` sessions). Instead start.sh runs `ray start --head --block` and
# `mlflow server` each in a session of its own (setsid) and records the leader's pid. Here:
#   1. SIGTERM the leader. `ray start --block` drains the node and kills its children (GCS, raylet, dashboard,
#      agents; the raylet takes its workers and running jobs down with it); MLflow stops its workers.
#   2. wait up to REDDINO_STOP_TIMEOUT seconds (60; the head first drains running work for
#      RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 5 s as start.sh sets it), then SIGKILL what is left in that session.
# A pid is only signalled while its session id is the recorded pid, so a recycled pid is never hit.
#
#   REDDINO_CLUSTER_DIR   the state dir given to start.sh (~/.reddino/local-cluster)
set -uo pipefail

state=${REDDINO_CLUSTER_DIR:-$HOME/.reddino/local-cluster}
timeout=${REDDINO_STOP_TIMEOUT:-60}

session_pids() {  # live (not zombie) pids whose session id is $1
  ps -eo pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

stop_one() {  # name pidfile
  local name=$1 pidfile=$2 leader
  [[ -f "$pidfile" ]] || return 0
  leader=$(cat "$pidfile")
  if [[ -z "$(session_pids "$leader")" ]]; then
    echo "$name (pid $leader) is not running"
    rm -f "$pidfile"
    return 0
  fi
  echo "stopping $name (session $leader)"
  kill -TERM "$leader" 2>/dev/null
  local deadline=$((SECONDS + timeout))
  while (( SECONDS < deadline )); do
    kill -0 "$leader" 2>/dev/null || break
    sleep 0.5
  done
  sleep 1  # let children finish their own shutdown
  local left
  left=$(session_pids "$leader")
  if [[ -n "$left" ]]; then
    echo "  SIGKILL for what is left of $name: $(echo $left)"
    kill -KILL $left 2>/dev/null
    for _ in $(seq 20); do [[ -z "$(session_pids "$leader")" ]] && break; sleep 0.5; done
  fi
  rm -f "$pidfile"
}

stop_one "MLflow server" "$state/mlflow.pid"
stop_one "Ray head" "$state/ray.pid"
rm -f "$state/env"
