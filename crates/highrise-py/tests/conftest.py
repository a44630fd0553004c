"""Shared fixtures: the default model (f32 weights, as the HF reference was made, and the file's own
Q4_1 weights, as the CLI runs it), HuggingFace's reference outputs, the CLI binary."""

import json
import os
from pathlib import Path

import pytest

import highrise

ROOT = Path(__file__).resolve().parents[3]


def skip(reason: str):
    # The project's convention: a test that cannot run says "skipped: <reason>".
    print(f"skipped: {reason}")
    pytest.skip(f"skipped: {reason}")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    d = Path(os.environ.get("HIGHRISE_FIXTURES", ROOT / "../shared/fixtures/smollm2"))
    if not (d / "reference.json").is_file():
        skip(f"no HF reference outputs at {d}")
    return d


@pytest.fixture(scope="session")
def reference(fixtures) -> dict:
    return json.loads((fixtures / "reference.json").read_text())


@pytest.fixture(scope="session")
def model():
    """The default model with f32 weights (the HF fixtures' precision)."""
    try:
        m = highrise.Model.load(weights="f32", kv_cache="256M")
    except (OSError, ValueError, highrise.HighriseError) as e:
        skip(f"the default model could not be loaded: {e}")
    yield m
    m.close()


@pytest.fixture(scope="session")
def quant_model():
    """The default model as the CLI runs it (the file's Q4_1 weights)."""
    try:
        m = highrise.Model.load(kv_cache="256M")
    except (OSError, ValueError, highrise.HighriseError) as e:
        skip(f"the default model could not be loaded: {e}")
    yield m
    m.close()


@pytest.fixture(scope="session")
def cli() -> Path:
    exe = Path(os.environ.get("HIGHRISE_BIN", ROOT / "target/release/highrise"))
    if not exe.is_file():
        skip(f"no highrise binary at {exe} (cargo build --release)")
    return exe
