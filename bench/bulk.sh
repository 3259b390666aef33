#!/usr/bin/env bash
# Times the bulk commands on generated input against the machine's RabbitMQ and Postgres
# (127.0.0.1 only): `batch submit` of an OpenAI batch file, and `summarize` of a JSONL file
# with the built-in offline model. Each run gets a fresh database and broker prefix, removed
# afterwards (queues and exchanges through rabbitmqctl, so run it as root). Prints one line per run.
#   bench/bulk.sh                                  # 10,000 and 50,000 lines; 20,000 and 60,000 documents
#   bench/bulk.sh --compare OTHER/switchyard       # the same, alternating with another build
#   bench/bulk.sh --submit 50000 --summarize ""    # only the sizes named ("" for none)
#   bench/bulk.sh --rounds 3
# Nothing is recorded: copy the lines into bench/RESULTS.md with the machine and the commits.
set -euo pipefail
cd "$(dirname "$0")/.."

submit_sizes="10000 50000"
summarize_sizes="20000 60000"
rounds=1
other=""
while [ $# -gt 0 ]; do
  case "$1" in
    --compare) other=$2; shift 2 ;;
    --submit) submit_sizes=$2; shift 2 ;;
    --summarize) summarize_sizes=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "bench/bulk.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

cargo build --release --locked --bin switchyard
this=$PWD/target/release/switchyard
builds=("$this")
[ -n "$other" ] && builds+=("$other")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pg=(psql -h 127.0.0.1 -U postgres -qAt)

# Input: a batch line, or a document of five sentences of twelve words, per number.
python3 - "$work" $submit_sizes $summarize_sizes <<'EOF'
import json, random, sys
work, sizes = sys.argv[1], sorted({int(n) for n in sys.argv[2:]})
words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega river mountain market engine policy budget "
         "queue worker provider").split()
rng = random.Random(7)
for n in sizes:
    with open(f"{work}/batch-{n}.jsonl", "w") as lines, open(f"{work}/docs-{n}.jsonl", "w") as docs:
        for i in range(n):
            text = ". ".join(" ".join(rng.choice(words) for _ in range(12)).capitalize()
                             for _ in range(5)) + "."
            lines.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                    "url": "/v1/chat/completions",
                                    "body": {"model": "gpt-4o-mini", "max_tokens": 50,
                                             "messages": [{"role": "user", "content": text}]}}) + "\n")
            docs.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
EOF

cleanup() { # prefix, database
  for queue in $(rabbitmqctl -q list_queues name | grep "^$1\." || true); do
    rabbitmqctl -q delete_queue "$queue" >/dev/null
  done
  rabbitmqctl -q eval "[rabbit_exchange:delete(element(2, X), false, <<\"bench\">>)
    || X <- rabbit_exchange:list(), binary:match(element(4, element(2, X)), <<\"$1.\">>) =:= {0, $((${#1} + 1))}]." >/dev/null
  "${pg[@]}" -c "DROP DATABASE IF EXISTS $2"
}

run=0
time_one() { # label, binary, command args...
  local label=$1 bin=$2; shift 2
  run=$((run + 1))
  local prefix="bulk-$$-$run" database="bulk_$$_$run"
  export SWITCHYARD_DATABASE__URL="postgres://postgres@127.0.0.1:5432/$database"
  export SWITCHYARD_BROKER__PREFIX=$prefix
  "$bin" migrate >/dev/null 2>&1
  local start end
  start=$(date +%s.%N)
  "$bin" "$@" >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; cleanup "$prefix" "$database"; exit 1; }
  end=$(date +%s.%N)
  printf '%-45s %7.2f s  %s  (%s)\n' "$label" "$(echo "$end - $start" | bc)" "$bin" \
    "$(grep -E '^(summarize: [0-9]+ documents|batch: submitted)' "$work/stderr" | tail -n1)"
  cleanup "$prefix" "$database"
}

for round in $(seq "$rounds"); do
  for n in $submit_sizes; do
    for bin in "${builds[@]}"; do
      time_one "round $round: batch submit, $n lines" "$bin" batch submit "$work/batch-$n.jsonl"
    done
  done
  for n in $summarize_sizes; do
    for bin in "${builds[@]}"; do
      time_one "round $round: summarize, $n documents" "$bin" summarize "$work/docs-$n.jsonl" --out "$work/out.jsonl"
    done
  done
done
