"""Stage: serve base and tuned models behind one OpenAI-compatible Ray Serve app.

    from sp2dpo.serve import ServeConfig, ModelConfig, start_server, stop_server
    url = start_server(ServeConfig(port=8123, models=[ModelConfig(id="base")]))
"""

from sp2dpo.serve.config import AutoscalingConfig, ModelConfig, ServeConfig
from sp2dpo.serve.server import resolve_api_key, start_server, stop_server

__all__ = ["AutoscalingConfig", "ModelConfig", "ServeConfig", "resolve_api_key", "start_server", "stop_server"]
