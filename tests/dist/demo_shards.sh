# Sourced by the multi-process training tests (with dsv3 and root set): a work folder $work,
# removed on exit; mpirun's command for one machine ($mpi, one thread per process, as root
# too); and token shards of the bundled corpus's first 3,000 verses in $work/shards (a
# 2,048-token BPE learnt from them, 5% held out).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi=(mpirun --oversubscribe --bind-to none)
export PYTHONPATH="$root/tests/dist${PYTHONPATH:+:$PYTHONPATH}"  # metrics_rows.py
{ zcat "$root/data/kjv-verses.txt.gz" || true; } | head -n 3000 > "$work/corpus.txt"  # (zcat stops at head's end)
[[ $(wc -l < "$work/corpus.txt") -eq 3000 ]] || { echo "cannot read the bundled corpus"; exit 1; }
"$dsv3" train-tokenizer --input "$work/corpus.txt" --vocab-size 2048 --out "$work/tok" >/dev/null 2>&1
"$dsv3" data --tokenizer "$work/tok" --input "$work/corpus.txt" --out "$work/shards" --val-fraction 0.05 >/dev/null 2>&1
