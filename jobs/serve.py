"""ray job submit --working-dir . -- python jobs/serve.py --config serve.yaml --host 0.0.0.0

Deploys the app on the running cluster and returns; it keeps serving after the job ends
(`serve shutdown` or `serve delete sp2dpo` removes it)."""

from _entry import run

if __name__ == "__main__":
    run("serve", "--detach")
