import json
import subprocess
import sys

from alexnet.cli import main
from alexnet.config import ModelConfig
from alexnet.info import summary


def test_info_totals():
    s = summary(ModelConfig())
    assert s["params"] == 60_965_224
    assert s["macs_per_image"] == 724_406_816  # ~0.72 GMAC
    assert s["input_size"] == 227
    conv1 = s["layers"][0]
    assert conv1["name"] == "conv1" and conv1["output_shape"] == [[48, 55, 55], [48, 55, 55]]
    assert conv1["macs"] == 2 * 48 * 55 * 55 * 3 * 11 * 11


def test_info_json_cli(capsys):
    assert main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 60_965_224
    names = [layer["name"] for layer in out["layers"]]
    assert names[:3] == ["conv1", "pool1", "conv2"] and names[-1] == "fc8"
    assert out["layers"][-1]["output_shape"] == [[500], [500]]


def test_info_table_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "alexnet.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "60,965,224" in out and "724,406,816" in out


def test_info_small_variant(capsys):
    assert main(["info", "--json", "--variant", "small", "--num-classes", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_size"] == 32 and out["layers"][-1]["output_shape"] == [[5], [5]]
