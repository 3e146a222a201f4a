import pytest

from spruce.models.resolve import resolve_model


def test_alias_resolves_to_gguf_in_package():
    r = resolve_model("smollm2-135m")
    assert r.kind == "gguf" and r.path.name.endswith(".gguf") and r.path.is_file()


def test_hub_id_without_network_says_what_failed(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="(?s)could not fetch 'some-org/some-model'.*local directory"):
        resolve_model("some-org/some-model")


def test_unknown_name_lists_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known alias"):
        resolve_model("no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
