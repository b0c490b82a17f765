"""The model side of ``alexnet predict`` / ``export`` (:mod:`alexnet.infer`) and conv1's kernel
picture (:mod:`alexnet.filters`): pure, no checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.config import ModelConfig
from alexnet.data.transforms import center_crop, to_model_input
from alexnet.data.writer import resize_center_crop
from alexnet.filters import kernel_grid
from alexnet.infer import InferenceNet, crops, image_files, load_image, run_batches
from alexnet.model import FusedAlexNet
from alexnet.scoring import average_crops

CFG = ModelConfig.small(num_classes=7, input_size=32)


def _net(layer: str = "fc8") -> tuple[InferenceNet, torch.Tensor]:
    mean = torch.rand(3, 32, 32) * 255
    return InferenceNet(FusedAlexNet(CFG).eval(), mean, 1 / 64, layer).eval(), mean


def test_inference_net_is_the_model_on_the_runs_normalisation():
    net, mean = _net()
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        want = net.net(to_model_input(u8, torch.zeros(4, 3), mean, 1 / 64))
        assert torch.equal(net(u8), want)  # the same float32 arithmetic as validation's
        fc7 = InferenceNet(net.net, mean, 1 / 64, "fc7")(u8)
    assert want.shape == (4, 7) and fc7.shape == (4, 2 * CFG.fc_units)
    assert bool((fc7 >= 0).all())  # after its ReLU
    with pytest.raises(ValueError, match="--features fc9: use one of conv1, .*fc8"):
        InferenceNet(net.net, mean, 1.0, "fc9")


def test_image_files_expand_folders_and_name_what_is_missing(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/2.png", "a/sub/1.JPG", "a/x.jpeg"):
        Image.new("RGB", (9, 7)).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    got = image_files([tmp_path / "a", tmp_path / "a" / "2.png"])
    rel = [str(p.relative_to(tmp_path)) for p in got]
    assert rel == ["a/2.png", "a/sub/1.JPG", "a/x.jpeg", "a/2.png"]
    with pytest.raises(ValueError, match="nope: no such file or folder"):
        image_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files in"):
        image_files([tmp_path / "empty"])
    with pytest.raises(ValueError, match="notes.txt: not an image Pillow can read"):
        load_image(tmp_path / "a" / "notes.txt", 40)


def test_load_image_scales_and_crops_as_the_shards_do(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)  # landscape, 80 wide
    Image.fromarray(arr).save(tmp_path / "i.png")
    got = load_image(tmp_path / "i.png", 40)
    want = np.asarray(resize_center_crop(Image.fromarray(arr), 40))
    assert got.shape == (3, 40, 40) and got.dtype == torch.uint8
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)
    # a file already at the stored side is left as it is (a PNG written from a shard scores as in the run)
    Image.fromarray(arr[:40, :40]).save(tmp_path / "s.png")
    assert np.array_equal(load_image(tmp_path / "s.png", 40).permute(1, 2, 0).numpy(), arr[:40, :40])


def test_center_and_ten_crop_batches():
    net, _ = _net()
    images = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8) for _ in range(3)]
    center = torch.cat(list(run_batches(net, images, 32, "center", batch_size=2)))
    with torch.no_grad():
        want = torch.log_softmax(net(torch.stack([center_crop(im, 32) for im in images])), dim=1)
    torch.testing.assert_close(center, want)
    ten = torch.cat(list(run_batches(net, images, 32, "ten", batch_size=2)))
    x = torch.stack([crops(im, 32, "ten") for im in images]).transpose(0, 1).flatten(0, 1)  # crop-major
    with torch.no_grad():
        torch.testing.assert_close(ten, average_crops(net(x), 10))
    assert not torch.allclose(ten, center)
    with pytest.raises(ValueError, match="crop='five'"):
        crops(images[0], 32, "five")


def test_kernel_grid_shows_the_weights_on_one_symmetric_scale():
    w = torch.zeros(5, 3, 4, 4)
    w[0, 0] = 2.0  # the largest magnitude: full red, the others of kernel 0 at 0 (grey)
    w[1, 1] = -2.0
    w[2, 2] = 1.0
    img = kernel_grid(w, scale=1)
    assert img.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and img.dtype == np.uint8  # 2 rows of 3, 4 px + 1 px gaps
    assert tuple(img[1, 1]) == (255, 128, 128)  # kernel 0 at (1, 1)
    assert tuple(img[1, 6]) == (128, 0, 128)  # kernel 1, next cell
    assert tuple(img[1, 11]) == (128, 128, 191)  # kernel 2: half the largest magnitude
    assert tuple(img[0, 0]) == (128, 128, 128)  # background
    assert kernel_grid(w, scale=3).shape == (33, 48, 3)
    with pytest.raises(ValueError, match=r"\(K, 3, k, k\)"):
        kernel_grid(torch.zeros(5, 1, 4, 4))
