"""Fixtures of the e2e tests: `rec`, the recording, validating HTTP clients of the OpenAI-conformance tests."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.conformance_validation import Recorder


@pytest.fixture
def rec() -> Iterator[Recorder]:
    """Every response body of the test, validated; the test fails if any broke the OpenAI types."""
    recorder = Recorder()
    yield recorder
    recorder.assert_clean()
