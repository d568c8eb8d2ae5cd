r"""ray job submit --working-dir . -- python jobs/schedule.py --pairs /shared/run/data/pairs.parquet \
    --annotations /shared/run/ann --out /shared/run/beta.parquet"""

from _entry import run

if __name__ == "__main__":
    run("schedule")
