from __future__ import annotations

import pytest

from ichat.backends.argmap import rename_flags
from ichat.backends.vllm_backend import VLLMBackend
from ichat.errors import ConfigError

VLLM_NAMES = VLLMBackend.FLAG_NAMES


def test_unified_names_map_to_vllm_flags() -> None:
    argv = ["--model-path", "/m", "--tokenizer-path", "/t", "--context-length", "1024"]
    assert rename_flags(argv, VLLM_NAMES) == [
        "--model",
        "/m",
        "--tokenizer",
        "/t",
        "--max-model-len",
        "1024",
    ]


def test_equals_form_and_underscore_spelling() -> None:
    argv = ["--model_path=/m", "--context-length=2048"]
    assert rename_flags(argv, VLLM_NAMES) == ["--model=/m", "--max-model-len=2048"]


def test_shared_names_and_arbitrary_flags_pass_untouched_in_order() -> None:
    argv = [
        "--served-model-name",
        "a",
        "b",
        "--trust-remote-code",
        "--tensor-parallel-size",
        "2",
        "--enable-prefix-caching",
        "--override-generation-config",
        '{"temperature": 0.5}',
        "-O3",
        "--",
        "--model-path",
    ]
    # after "--" everything is positional: nothing there is renamed
    assert rename_flags(argv, VLLM_NAMES) == argv


def test_values_that_look_like_ichat_flags_are_values_only_after_equals() -> None:
    argv = ["--served-model-name=--model-path"]
    assert rename_flags(argv, VLLM_NAMES) == argv


def test_both_spellings_of_one_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--model-path and --model"):
        rename_flags(["--model-path", "/a", "--model", "/b"], VLLM_NAMES)


def test_flag_value_reads_both_spellings_and_the_last_one_wins() -> None:
    from ichat.backends.argmap import flag_value

    assert flag_value(["--model-path", "/a", "--x", "1"], "--model-path") == "/a"
    assert flag_value(["--model_path=/b"], "--model-path") == "/b"
    assert flag_value(["--model-path", "/a", "--model-path=/c"], "--model-path") == "/c"
    assert flag_value(["--other", "/a"], "--model-path") is None
    assert flag_value(["--", "--model-path", "/a"], "--model-path") is None
