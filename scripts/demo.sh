#!/usr/bin/env bash
# The Vigil demo. The full demo (simulator, interposer, exporter, workloads, metrics)
# arrives with the interposer; until then this shows the shared region at work:
# processes racing to initialize it, a lock holder SIGKILLed and taken over in
# milliseconds, and the counters and events that record it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "note: the full demo (gpusim + libvigil.so + vigil-exporter) is not yet available;"
echo "      showing the shared region (vigil-region) instead."
cargo build --quiet --release -p vigil-region
bin=target/release/vigil-region
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
region=$dir/demo.cache

echo; echo "==> 16 processes attach to a new region at the same instant"
for _ in $(seq 16); do "$bin" exercise attach "$region" >> "$dir/attach.out" & done
wait
grep -o 'path=[a-z_]*' "$dir/attach.out" | sort | uniq -c | sed 's/^/   /'

echo; echo "==> a process takes the region lock and is SIGKILLed while holding it"
"$bin" exercise hold "$region" > "$dir/holder.out" &
holder=$!
sleep 0.2
"$bin" exercise hold "$region" --hold-ms 10 > "$dir/waiter.out" &
waiter=$!
sleep 0.2
kill -9 "$holder"
wait "$holder" 2>/dev/null || true
wait "$waiter"
grep locked "$dir/waiter.out" | sed 's/^/    waiter: /'
echo "    (it waited in 2 ms slices; the slice after the kill found the owner's"
echo "     liveness token free and took the lock over: one force-post)"


echo; echo "==> the region, read-only (what the exporter will see)"
"$bin" inspect "$region" | grep -v '=0$'
echo; echo "==> its events"
"$bin" events "$region" | tail -6
