"""ray job submit --working-dir . -- python jobs/audit.py /shared/run/beta.parquet --out /shared/run/audit"""

from _entry import run

if __name__ == "__main__":
    run("audit")
