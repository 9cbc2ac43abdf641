#!/usr/bin/env bash
# kafka-local.sh — a real single-node Apache Kafka broker on 127.0.0.1 for tests/dev,
# without Docker: KRaft mode (combined broker+controller), jars resolved from Maven Central.
#
# Usage:
#   scripts/kafka-local.sh start    # start (or reuse) the broker; LAST stdout line = bootstrap address
#   scripts/kafka-local.sh status   # print the address, exit 0 if running and answering; else exit 1
#   scripts/kafka-local.sh stop     # SIGTERM (SIGKILL after a timeout) the broker this script started
#   e.g.  BOOTSTRAP=$(scripts/kafka-local.sh start | tail -n1)
#
# Needs: java >= 17 and mvn on PATH (mvn only for the first start: jars are cached), plus
# coreutils/bash (/dev/tcp, timeout, od). Progress messages go to stderr.
#
# Environment:
#   KAFKA_VERSION          Kafka version to run (default: pinned below)
#   CONVOFLOW_CACHE        cache root (default ~/.cache/convoflow); jars go to
#                          $CONVOFLOW_CACHE/kafka/<version>/libs (resolved once, reused after)
#   KAFKA_LOCAL_DIR        state dir: server.properties, pid/port files, data, logs
#                          (default ~/.cache/convoflow/kafka-run). Data is wiped on each fresh start.
#   KAFKA_LOCAL_HEAP       JVM heap flags (default "-Xms256m -Xmx512m")
#   KAFKA_LOCAL_TIMEOUT    seconds to wait for the broker to answer (default 60)
#   KAFKA_LOCAL_STOP_TIMEOUT  seconds to wait after SIGTERM before SIGKILL (default 20)
#
# "Answering" means: a Kafka ApiVersions request sent over TCP gets a reply with our
# correlation id (a real protocol round trip, not just an open port).
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"   # 4.1.x: KRaft-only line (ZooKeeper removed in 4.0), patch release
LOG4J_VERSION="2.24.3"                    # log4j2 backend, same major line Kafka 4.x ships in its tarball
DEP_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"  # pinned (mvn 3.8 defaults to 2.8)
CACHE_ROOT="${CONVOFLOW_CACHE:-$HOME/.cache/convoflow}"
LIBS="$CACHE_ROOT/kafka/$KAFKA_VERSION/libs"
STATE="${KAFKA_LOCAL_DIR:-$HOME/.cache/convoflow/kafka-run}"
HEAP="${KAFKA_LOCAL_HEAP:--Xms256m -Xmx512m}"
WAIT_S="${KAFKA_LOCAL_TIMEOUT:-60}"
STOP_S="${KAFKA_LOCAL_STOP_TIMEOUT:-20}"
PID_FILE="$STATE/broker.pid"
PORT_FILE="$STATE/broker.port"

log() { echo "kafka-local: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

check_tools() {
  command -v java >/dev/null || die "java not found on PATH (need Java 17+)"
  local ver major
  ver=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)
  major=${ver%%.*}; [[ "$major" == 1 ]] && major=$(cut -d. -f2 <<<"$ver")
  [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]] || die "Java 17+ required, found '${ver:-unknown}'"
}

# Resolve kafka_2.13 + runtime deps + a log4j2 backend into $LIBS (once; marker file = done).
resolve_jars() {
  [[ -f "$LIBS/.complete" ]] && return 0
  command -v mvn >/dev/null || die "mvn not found on PATH (needed once to fetch Kafka jars)"
  local work; work="$CACHE_ROOT/kafka/$KAFKA_VERSION"
  mkdir -p "$work"; rm -rf "$LIBS"
  log "resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION from Maven Central (first run only)..."
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.convoflow</groupId><artifactId>kafka-local</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
  mvn -q -B -f "$work/pom.xml" "$DEP_PLUGIN:copy-dependencies" -DincludeScope=runtime \
      -DoutputDirectory="$LIBS" >"$work/mvn.log" 2>&1 \
    || { tail -n 30 "$work/mvn.log" >&2; die "maven could not resolve Kafka jars (log: $work/mvn.log)"; }
  ls "$LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || die "kafka jar missing in $LIBS"
  touch "$LIBS/.complete"
}

# ApiVersions v0 request (api_key 18, correlation id 42, client "cf"); true if the reply echoes id 42.
answers() (
  exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
  printf '\x00\x00\x00\x0c\x00\x12\x00\x00\x00\x00\x00\x2a\x00\x02cf' >&3
  [[ "$(timeout 5 head -c 8 <&3 | od -An -tx1 | tr -d ' \n')" == *0000002a ]]
)

# PID of the broker this script started (alive, and really our kafka.Kafka), else fail.
our_pid() {
  local pid; pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $STATE/server.properties" || return 1
  echo "$pid"
}

free_port() {  # random unused port below the ephemeral range (no listener answers on it)
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))
    [[ "$p" == "${1:-}" ]] && continue
    (exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$p") || { echo "$p"; return 0; }
  done
  die "no free port found on 127.0.0.1"
}

wait_ready() {  # $1=pid $2=port
  local deadline=$((SECONDS + WAIT_S))
  while ((SECONDS < deadline)); do
    answers "$2" && return 0
    kill -0 "$1" 2>/dev/null || break
    sleep 0.5
  done
  return 1
}

cmd_start() {
  check_tools
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"; command -v flock >/dev/null && flock 9   # serialize concurrent starts
  local pid port cport
  if pid=$(our_pid); then
    port=$(cat "$PORT_FILE")
    wait_ready "$pid" "$port" || die "broker pid $pid runs but does not answer on $port; run '$0 stop'"
    log "already running (pid $pid)"; echo "127.0.0.1:$port"; return 0
  fi
  resolve_jars
  rm -rf "$STATE/data" "$STATE/logs" "$PID_FILE" "$PORT_FILE"; mkdir -p "$STATE/data" "$STATE/logs"
  port=$(free_port); cport=$(free_port "$port")
  cat >"$STATE/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$STATE/data
auto.create.topics.enable=true
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  # Quiet logging: INFO from Kafka to logs/server.log, WARN elsewhere; nothing on the console.
  cat >"$STATE/log4j2.properties" <<EOF
appender.f.type=File
appender.f.name=f
appender.f.fileName=$STATE/logs/server.log
appender.f.layout.type=PatternLayout
appender.f.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=WARN
rootLogger.appenderRef.f.ref=f
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.ak.name=org.apache.kafka
logger.ak.level=INFO
EOF
  local heap jvm; read -ra heap <<<"$HEAP"
  jvm=(java "${heap[@]}" -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$STATE/log4j2.properties" "-Dkafka.logs.dir=$STATE/logs" -cp "$LIBS/*")
  local cid; cid=$("${jvm[@]}" kafka.tools.StorageTool random-uuid 2>>"$STATE/logs/format.log" | tail -n1)
  [[ -n "$cid" ]] || die "could not generate a cluster id (see $STATE/logs/format.log)"
  "${jvm[@]}" kafka.tools.StorageTool format -t "$cid" -c "$STATE/server.properties" \
      >>"$STATE/logs/format.log" 2>&1 || { tail -n 20 "$STATE/logs/format.log" >&2; die "storage format failed"; }
  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller $cport, state $STATE)"
  setsid nohup "${jvm[@]}" kafka.Kafka "$STATE/server.properties" \
      >"$STATE/logs/broker.out" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"; echo "$port" >"$PORT_FILE"
  if ! wait_ready "$pid" "$port"; then
    log "broker did not answer on 127.0.0.1:$port within ${WAIT_S}s; last log lines:"
    tail -n 40 "$STATE/logs/server.log" "$STATE/logs/broker.out" >&2 2>/dev/null || true
    cmd_stop >/dev/null 2>&1 || true
    die "Kafka failed to start"
  fi
  log "ready after ${SECONDS}s (pid $pid)"
  echo "127.0.0.1:$port"
}

cmd_stop() {
  local pid
  if pid=$(our_pid); then
    log "stopping broker pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_S))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "still alive after ${STOP_S}s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  else
    log "no broker running"
  fi
  rm -f "$PID_FILE" "$PORT_FILE"
}

cmd_status() {
  local pid port
  pid=$(our_pid) || { log "not running"; exit 1; }
  port=$(cat "$PORT_FILE" 2>/dev/null) || { log "running (pid $pid) but port file missing"; exit 1; }
  answers "$port" || { log "pid $pid alive but not answering on 127.0.0.1:$port"; exit 1; }
  echo "127.0.0.1:$port"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
