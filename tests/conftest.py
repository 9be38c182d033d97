"""Shared fixtures. `fake_hub`: a local Hugging Face Hub (tests/hub_server.py) for this test only."""
import os

import pytest


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fresh FakeHub with user `alice` (token `hf_alice`), the environment pointing at it
    (HF_ENDPOINT, an empty HF_HOME, no token, online), and `.env` for subprocesses."""
    from huggingface_hub import constants
    from hub_server import FakeHub

    hub = FakeHub().start()
    hub.add_user("alice", "hf_alice")
    home = tmp_path / "hf_home"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # huggingface_hub read these at import; loratools passes endpoint/cache/offline itself, these cover the rest
    for name, value in {"ENDPOINT": hub.url, "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False,
                        "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}.items():
        monkeypatch.setattr(constants, name, value)
    hub.home = home
    hub.env = dict(os.environ, **env)
    yield hub
    hub.stop()
