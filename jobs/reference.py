"""ray job submit --working-dir . -- python jobs/reference.py --artifact beta.parquet --pairs pairs.parquet --model M"""

from _entry import run

if __name__ == "__main__":
    run("train", "reference")
