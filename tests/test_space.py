import pytest

from autotune.errors import SearchSpaceError
from autotune.space import Config, load_spaces


def test_load_and_enumerate(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[gemm.blocked]\nBLOCK_M = [32, 64]\nloop_order = ["mnk", "kmn", "nkm"]\n')
    spaces = load_spaces(f)
    space = spaces[("gemm", "blocked")]
    assert space.size() == 6
    configs = list(space.configs())
    assert len(configs) == 6 and {"BLOCK_M": 64, "loop_order": "nkm"} in configs


@pytest.mark.parametrize("text, message", [
    ("[gemm.blocked\n", "not valid TOML"),
    ("[gemm]\nblocked = 3\n", "table of knob"),
    ("[gemm.blocked]\nBLOCK_M = []\n", "non-empty list"),
    ("[gemm.blocked]\nBLOCK_M = 32\n", "non-empty list"),
    ("[gemm.blocked]\nBLOCK_M = [32, 32]\n", "twice"),
    ("[gemm.blocked]\nBLOCK_M = [[1]]\n", "only numbers"),
    ("gemm = 1\n", "table of algorithms"),
])
def test_malformed_files(tmp_path, text, message):
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(SearchSpaceError, match=message):
        load_spaces(f)


def test_unreadable_file(tmp_path):
    with pytest.raises(SearchSpaceError, match="cannot read"):
        load_spaces(tmp_path / "missing.toml")


def test_config_key_is_stable_and_hashable():
    a = Config.make("blocked", {"BLOCK_N": 64, "BLOCK_M": 32})
    b = Config.make("blocked", {"BLOCK_M": 32, "BLOCK_N": 64})
    assert a == b and hash(a) == hash(b) and a.key() == b.key()
    assert a.as_dict() == {"BLOCK_M": 32, "BLOCK_N": 64}
