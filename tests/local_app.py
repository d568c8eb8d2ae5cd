"""A FastAPI app served by uvicorn on 127.0.0.1 in a thread, for stand-in OpenAI-compatible
endpoints (a hosted judge or teacher, which nothing here reaches).

    class Judge(LocalApp):
        def __init__(self):
            api = FastAPI()
            ...
            super().__init__(api)

    with Judge() as judge:
        client = openai.OpenAI(base_url=judge.url, api_key="unused")
"""

from __future__ import annotations

import threading
import time
from typing import Any

from s3_server import free_port


class LocalApp:
    def __init__(self, api: Any):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, f"{type(self).__name__} did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
