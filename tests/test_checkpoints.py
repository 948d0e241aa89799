"""PyTorch checkpoints read without torch and without running anything they name (brainzoo.checkpoints)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import SHARED

from brainzoo.checkpoints import Opaque, module_state_dict, read_pickled
from brainzoo.convert.state_dict import read_checkpoint
from brainzoo.errors import BrainzooError

torch = pytest.importorskip("torch", reason="writing checkpoints in torch's formats needs torch")
SEEDS = SHARED / "fixtures" / "seeds"


def tensors() -> dict:
    """Tensors of several types, a non-contiguous view and a view sharing another tensor's storage."""
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    return {"conv.weight": base.transpose(0, 2), "conv.bias": torch.nn.Parameter(torch.linspace(-1, 1, 3)),
            "half": torch.ones(5, dtype=torch.float16) / 3, "bfloat": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
            "steps": torch.tensor(7), "flags": torch.tensor([True, False]), "slice": base[1, :, 1:3],
            "double": torch.rand(2, 2, dtype=torch.float64)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_read_as_torch_reads_them(tmp_path, legacy):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": tensors()}, path, _use_new_zipfile_serialization=not legacy)
    content = read_pickled(path)
    expected = torch.load(path, weights_only=True)
    assert content["epoch"] == 3 and list(content["state_dict"]) == list(expected["state_dict"])
    for key, tensor in expected["state_dict"].items():
        want = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).detach().numpy()
        np.testing.assert_array_equal(content["state_dict"][key], want)
        assert content["state_dict"][key].dtype == want.dtype, key
    assert read_checkpoint(path).keys() == expected["state_dict"].keys()  # found inside the training dict


MODULE = textwrap.dedent("""
    import torch

    class AgeNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
            self.fc = torch.nn.Linear(4, 2)

        def __setstate__(self, state):
            open(MARKER, "w").close()  # runs if anything unpickles this class for real
            super().__setstate__(state)
""")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_whole_pickled_module_gives_its_state_dict_without_importing_its_class(tmp_path, legacy):
    """The upstream ml_MRI checkpoints are whole nn.Modules pickled from a module or a notebook."""
    (tmp_path / "agenet.py").write_text(f"MARKER = {str(tmp_path / 'ran')!r}\n" + MODULE)
    path = tmp_path / "whole.pt"
    script = (f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import agenet; net = agenet.AgeNet(); "
              f"net.features[1].running_mean += 0.5; torch.save(net, {str(path)!r}, "
              f"_use_new_zipfile_serialization={not legacy}); "
              f"print(__import__('json').dumps({{k: v.tolist() for k, v in net.state_dict().items()}}))")
    expected = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                         check=True).stdout)
    module = read_pickled(path)
    assert isinstance(module, Opaque) and module.name == "agenet.AgeNet"
    state = read_checkpoint(path)
    assert state.keys() == expected.keys()
    for key, values in expected.items():
        np.testing.assert_array_equal(state[key], np.asarray(values, dtype=state[key].dtype))
    assert module_state_dict(module).keys() == state.keys()
    assert "agenet" not in sys.modules and not (tmp_path / "ran").exists()


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with torch.serialization._open_zipfile_writer(str(path)) as archive:  # torch's own layout, our payload
        payload = pickle.dumps({"weight": Exploit(str(marker))}, protocol=2)
        archive.write_record("data.pkl", payload, len(payload))
    content = read_pickled(path)
    assert isinstance(content["weight"], Opaque) and content["weight"].name == "io.open"
    assert not marker.exists()
    with pytest.raises(BrainzooError, match="evil.pth: holds no state_dict of tensors"):
        read_checkpoint(path)
    legacy = tmp_path / "evil-legacy.pth"
    legacy.write_bytes(pickle.dumps(Exploit(str(marker)), protocol=2))  # where the magic number should be
    with pytest.raises(BrainzooError, match="evil-legacy.pth: not a PyTorch checkpoint"):
        read_pickled(legacy)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "storage cut short"])
def test_damaged_files_are_named_errors(tmp_path, damage):
    path = tmp_path / "model.pth"
    torch.save(tensors(), path, _use_new_zipfile_serialization=damage != "storage cut short")
    content = path.read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "text": b"hello\n", "empty": b"",
                      "storage cut short": content[:-8]}[damage])
    with pytest.raises(BrainzooError, match=r"model\.pth: "):
        read_pickled(path)


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"{SEEDS} is absent (upstream-format ml_MRI checkpoints)")
@pytest.mark.parametrize("name", ["s500mri_clf_2class", "s500mri_clf_4class"])
def test_the_upstream_ml_mri_pickles_give_every_tensor(name):
    module = read_pickled(SEEDS / f"{name}.full.pt")
    assert module.name in ("models.S500MRI_clf", "__main__.S500MRI_clf")
    fixture = json.loads((SEEDS / f"{name}.json").read_text())
    expected = {entry["key"]: entry["shape"] for entry in fixture["state_dict"]}
    state = module_state_dict(module)
    assert {key: list(array.shape) for key, array in state.items()} == expected
