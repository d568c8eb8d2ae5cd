r"""ray job submit --working-dir . -- python jobs/annotate.py --config cluster.yaml --teacher vllm \
    --out /shared/run/ann"""

from _entry import run

if __name__ == "__main__":
    run("annotate")
