#!/usr/bin/env bash
# ZeRO-1 data-parallel training (the multi-process issue): `mpirun -np 2` and `-np 4` train
# the tiny demo model with the same losses, validation losses and gradient norms as one
# process (to 1e-5 relative: only the order of float sums differs), rank 0 alone writing the
# run, and a run saved by 2 processes resumes on 4 with the same losses; so do expert
# parallelism over 2 and 4 processes (--ep 2 on 2 and on 4, --ep 4 on 4), which log their
# all-to-all volume; an --ep that does not divide the processes is an error;
# a --dp that is not the number of processes, and a batch (or a ramp) that does not split,
# are errors on every rank; rank 0 failing alone ends the job (MPI_Abort), never a hang.
# Node-limited routing: covering every node routes as without it; one node of two per token
# sends less to the other processes.
#   train_data_parallel.sh DSV3_BINARY PROJECT_ROOT
set -euo pipefail
dsv3=$1 root=$2
source "$root/tests/dist/demo_shards.sh"  # $work, $mpi, $work/shards
train=(train --config "$root/configs/tiny-demo.json" --data "$work/shards" --steps 6 --batch 4 --seq 32 --eval-every 3
       --threads 1 --keep 5)
"$dsv3" "${train[@]}" --save-every 6 --out "$work/one" 2>/dev/null
"${mpi[@]}" -np 2 "$dsv3" "${train[@]}" --save-every 6 --out "$work/two" 2>/dev/null
"${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --save-every 6 --out "$work/four" --dp 4 2>/dev/null
# Resumed onto another number of processes: 2 save at step 3 (their ZeRO shards of the
# moments gathered), 4 continue from there.
"${mpi[@]}" -np 2 "$dsv3" "${train[@]}" --save-every 3 --out "$work/moved" 2>/dev/null
rm -rf "$work/moved/checkpoint-0000006"
"${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --save-every 3 --out "$work/moved" --resume 2>/dev/null
# Expert parallelism: the routed experts split over groups of --ep processes.
"${mpi[@]}" -np 2 "$dsv3" "${train[@]}" --save-every 6 --out "$work/ep2" --ep 2 2>/dev/null
"${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --save-every 6 --out "$work/ep2x2" --ep 2 2>/dev/null
"${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --save-every 6 --out "$work/ep4" --ep 4 2>/dev/null
# Node-limited routing (§2.1.2) over 2 "nodes" of 2 expert-parallel ranks: covering both nodes
# is the routing above bit for bit; one node per token sends less to other processes.
"${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --save-every 6 --out "$work/ep4-nodes2" --ep 4 --ep-nodes 2 --max-nodes 2 2>/dev/null
"${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --save-every 6 --out "$work/ep4-node1" --ep 4 --ep-nodes 2 --max-nodes 1 2>/dev/null
grep -q '"node_limited_routing"' "$work/ep4-node1/checkpoint-0000006/config.json" || { echo "the node limit is not in the checkpoint's config"; exit 1; }
cmp -s "$work/ep4/checkpoint-0000006/model.safetensors" "$work/ep4-nodes2/checkpoint-0000006/model.safetensors" ||
  { echo "covering every node changed the weights"; exit 1; }
python3 - "$work" <<'PY'
from metrics_rows import rows
one = rows("one")
assert len(one) == 6, one
for name in ("two", "four", "moved", "ep2", "ep2x2", "ep4"):
    other = rows(name)
    assert len(other) == 6, (name, other)
    for a, b in zip(one, other):
        for col in ("loss", "mtp_loss", "val_loss", "grad_norm"):
            if a[col] == "" and b[col] == "":
                continue
            x, y = float(a[col]), float(b[col])
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), f"{name} step {a['step']} {col}: {x} alone, {y} data parallel"
    if name.startswith("ep"):
        assert all(float(r["a2a_mb"]) > 0 for r in other), (name, "no all-to-all volume logged")
assert all(float(r["a2a_mb"]) == 0 for r in one)
strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "node_mb")} for r in rs]
assert strip(rows("ep4-nodes2")) == strip(rows("ep4")), "covering every node changed the routing"
node1, node2 = rows("ep4-node1"), rows("ep4-nodes2")
sent = lambda rs: sum(float(r["node_mb"]) for r in rs)
assert all(float(r["loss"]) > 0 for r in node1) and 0 < sent(node1) < 0.8 * sent(node2), (sent(node1), sent(node2))
print(f"node-limited routing over 2 nodes: tokens' rows to the other node {sent(node1):.2f} MB with 1 node per token, "
      f"{sent(node2):.2f} MB with both")
print("data parallel (ZeRO-1) over 2 and 4 processes, resumed from 2 onto 4, and expert parallel over 2 and 4: the losses of one process")
PY
for run in two four; do
  [[ -d "$work/$run/checkpoint-0000006" ]] || { echo "no checkpoint from rank 0 in $run"; exit 1; }
done
# Errors, named on every rank before any work.
if out=$("${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --out "$work/bad" --ep 3 2>&1); then echo "--ep 3 on 4 processes ran"; exit 1; fi
grep -q -- "--ep 3 must divide the 4 data-parallel processes" <<<"$out" || { echo "unexpected: $out"; exit 1; }
if out=$("${mpi[@]}" -np 4 "$dsv3" "${train[@]}" --out "$work/bad" --ep 4 --ep-nodes 3 2>&1); then echo "--ep-nodes 3 ran"; exit 1; fi
grep -q -- "--ep-nodes 3 must divide --ep 4" <<<"$out" || { echo "unexpected: $out"; exit 1; }
if out=$("$dsv3" "${train[@]}" --out "$work/bad" --max-nodes 1 2>&1); then echo "--max-nodes alone ran"; exit 1; fi
grep -q -- "--max-nodes needs --ep-nodes" <<<"$out" || { echo "unexpected: $out"; exit 1; }
if out=$("$dsv3" "${train[@]}" --out "$work/bad" --ep-nodes 2 --max-nodes 3 2>&1); then echo "--max-nodes 3 of 2 ran"; exit 1; fi
grep -q -- "--max-nodes 3 must be between 1 and --ep-nodes 2" <<<"$out" || { echo "unexpected: $out"; exit 1; }
if out=$("${mpi[@]}" -np 2 "$dsv3" "${train[@]}" --out "$work/bad" --dp 3 2>&1); then echo "--dp 3 on 2 processes ran"; exit 1; fi
grep -q -- "--dp 3 must equal the number of processes (2" <<<"$out" || { echo "unexpected: $out"; exit 1; }
if out=$("${mpi[@]}" -np 2 "$dsv3" train --config "$root/configs/tiny-demo.json" --data "$work/shards" --steps 2 --batch 3 --seq 32 \
          --out "$work/odd" --threads 1 2>&1); then echo "a batch of 3 over 2 processes ran"; exit 1; fi
grep -q "divisible" <<<"$out" || { echo "unexpected: $out"; exit 1; }
# A batch ramp that does not split at some step is refused before training.
if out=$("${mpi[@]}" -np 2 "$dsv3" train --config "$root/configs/tiny-demo.json" --data "$work/shards" --steps 30 --batch 8 \
          --batch-start 4 --batch-ramp 20 --seq 32 --out "$work/ramp" --threads 1 2>&1); then echo "an odd ramp ran"; exit 1; fi
grep -q "step 3's batch is 5" <<<"$out" || { echo "unexpected: $out"; exit 1; }
# Rank 0 failing alone (its run folder is locked by another trainer) ends every process,
# rather than leaving the others waiting in a collective.
mkdir -p "$work/locked"
python3 -c 'import fcntl, sys, time; f = open(sys.argv[1], "w"); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)' \
  "$work/locked/.lock" >/dev/null 2>&1 &
holder=$!
sleep 0.5
if out=$(timeout 60 "${mpi[@]}" -np 2 "$dsv3" "${train[@]}" --out "$work/locked" 2>&1); then echo "a locked run folder ran"; exit 1; fi
kill "$holder" 2>/dev/null || true
grep -q "is in use by another dsv3 run" <<<"$out" || { echo "unexpected: $out"; exit 1; }
echo "ok"
