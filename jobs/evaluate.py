r"""ray job submit --working-dir . -- python jobs/evaluate.py generate --endpoint http://serve:8000/v1 \
    --model sp2dpo --out /shared/run/eval/sp2dpo"""

from _entry import run

if __name__ == "__main__":
    run("evaluate")
