# The rows of a run's metrics.csv, for the multi-process tests' checks: rows(name) reads
# WORK/name/metrics.csv, WORK being the check's first argument (demo_shards.sh puts this
# folder on PYTHONPATH).
import csv
import sys


def rows(name, work=None):
    with open(f"{work or sys.argv[1]}/{name}/metrics.csv") as f:
        return list(csv.DictReader(f))
