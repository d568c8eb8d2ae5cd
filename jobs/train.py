"""ray job submit --working-dir . -- python jobs/train.py --config train.yaml [--set num_workers=8]"""

from _entry import run

if __name__ == "__main__":
    run("train")
