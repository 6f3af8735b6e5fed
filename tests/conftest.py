import os

import pytest

# Tests never touch the network or a hub, and never start wandb online.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def empty_offline_hub(monkeypatch, tmp_path):
    """No Hub and an empty cache (huggingface_hub and transformers read them at import, hence both)."""
    import huggingface_hub.constants as hf
    import transformers.utils.hub as tf

    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(tf, "TRANSFORMERS_CACHE", str(tmp_path / "hf"))
