"""tests/vllm runs only inside the separate vLLM environment (.venv-vllm, `bash .ci/vllm-env.sh`).

In an environment without vLLM (the main .venv) these tests are not collected when the run
covers the whole suite (`pytest tests`); asked for by path (`pytest tests/vllm`), they are
collected and skip with the reason."""
import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    if importlib.util.find_spec("vllm") is not None:
        return None
    for arg in config.args:
        p = Path(str(arg).split("::")[0]).resolve()
        if p == HERE or HERE in p.parents:
            return None  # explicitly asked for: collect, then skip with the reason
    return True
