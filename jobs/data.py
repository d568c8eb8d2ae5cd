"""ray job submit --working-dir . -- python jobs/data.py ultrafeedback-sample --out /shared/run/data"""

from _entry import run

if __name__ == "__main__":
    run("data", "prepare")
