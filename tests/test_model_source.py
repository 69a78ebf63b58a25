import pytest

from backpropagate.errors import ConfigError, InputError
from backpropagate.model_source import resolve_model


def test_tiny_name_and_local_folder_resolve_to_the_same_folder(tiny_llama):
    assert resolve_model("tiny-llama") == tiny_llama
    assert resolve_model(str(tiny_llama)) == tiny_llama


def test_folder_without_model_files_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_model(tmp_path)
    assert err.value.code == "INPUT_MODEL_LOAD_FAILED" and str(tmp_path) in err.value.message


def test_unknown_names_are_config_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("./missing-folder", "not-a-model", "nobody/surely-missing-model-xyz"):
        with pytest.raises(ConfigError) as err:
            resolve_model(name)
        assert err.value.code == "CONFIG_UNKNOWN_MODEL"
