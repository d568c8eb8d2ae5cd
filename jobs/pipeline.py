"""ray job submit --working-dir . -- python jobs/pipeline.py --config sp2dpo/configs/ultrafeedback-8b.yaml"""

from _entry import run

if __name__ == "__main__":
    run("pipeline")
