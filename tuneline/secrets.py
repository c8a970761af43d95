"""Credentials never reach a log, a terminal or MLflow: `redact` masks them.

A leaf module (it imports nothing of tuneline), so errors, config and tracking can all
use it without importing each other.
"""

from __future__ import annotations

import os
import re

_URI_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")  # user:password@ in URIs
_HF_TOKEN = re.compile(r"\b(hf_[A-Za-z0-9]{20,})\b")  # a Hugging Face token, wherever it came from
# Environment variables whose values are credentials: never logged, printed or tagged.
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DATABRICKS_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "PGPASSWORD",
    "WANDB_API_KEY",
)


def redact(text: str) -> str:
    """`text` without credentials: URI passwords, HF tokens and the values of SECRET_ENV."""
    text = _HF_TOKEN.sub("hf_***", _URI_PASSWORD.sub(r"\1***@", text))
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 6:  # short values would redact ordinary words
            text = text.replace(value, "***")
    return text
