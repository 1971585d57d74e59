"""Image data: augmentation (exact crops and flips, seeded per example and epoch, through the
loader with exact resume), image folders (decoding, errors as one line), tfds image datasets on
mock data (configs/resnet18_cifar10.yaml resolves and builds), predict on paths and arrays."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from bigjax.build import one_device
from bigjax.cli import run as cli_run
from bigjax.config import load_config
from bigjax.data.augment import Augment, crop, flip
from bigjax.data.image_sources import ImageExamples
from bigjax.data.loader import TrainLoader
from bigjax.data.pipeline import build_data
from bigjax.resolve import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flip_twice_is_identity_and_crops_stay_within_the_padding():
    rng = np.random.default_rng(0)
    img = rng.integers(1, 256, (6, 5, 3)).astype(np.uint8)  # no zero pixel: padding is visible
    assert np.array_equal(flip(flip(img)), img)
    assert np.array_equal(flip(img)[:, 0], img[:, -1])
    assert np.array_equal(crop(img, 2, 2, 2), img)  # the centre window is the image
    aug = Augment(crop_padding=2, flip=True, seed=3)
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
    offsets, flips = set(), set()
    for i in range(60):
        out = aug(img, i, 0)
        assert np.array_equal(out, aug(img, i, 0))  # deterministic per (example, epoch)
        # the output is one of the 5 x 5 windows of the padded image, maybe mirrored
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if np.array_equal(out, (flip if f else (lambda a: a))(padded[dy:dy + 6, dx:dx + 5]))]
        assert found, i
        offsets.add(found[0][:2])
        flips.add(found[0][2])
    assert len(offsets) > 12 and flips == {False, True}  # random, not fixed
    changed = sum(not np.array_equal(aug(img, i, 0), aug(img, i, 1)) for i in range(20))
    assert changed >= 15  # another epoch, another augmentation (1/50 chance each to repeat)
    assert np.array_equal(Augment(0, False, 3)(img, 1, 1), img)


class Raw:
    """A raw source: image i is filled with i (so an example is recognisable after cropping)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def raw(self, i):
        return np.full((4, 4, 1), 10 * (i + 1), np.uint8), i % 3


def test_loader_passes_the_epoch_and_resumes_exactly():
    n = 10
    ex = ImageExamples(Raw(n), np.arange(n), [0.0], [1.0], Augment(1, True, seed=0))
    loader = TrainLoader(ex, 4, seed=0, shuffle=True, sharding=None)
    batches = [next(loader) for _ in range(8)]  # 32 examples: three epochs and a bit
    seen = np.concatenate([b["labels"] for b in batches])
    # the examples themselves come through the augmentation (a crop of the image, zero borders)
    for b in batches:
        for img in b["images"]:
            vals = set(np.unique(np.round(img * 255)).tolist()) - {0.0}
            assert len(vals) == 1
    # each example in the first epoch equals example_at_epoch(i, 0), in the second (i, 1)
    order = [int(np.round(b.max() * 255)) // 10 - 1 for batch in batches for b in batch["images"]]
    flat = np.concatenate([b["images"] for b in batches])
    for pos in (0, 5, 12, 25):
        want = ex.example_at_epoch(order[pos], pos // n)["images"]
        assert np.array_equal(flat[pos], want), pos
    assert len(seen) == 32
    state = {**loader.state(), "batches_taken": 3}
    again = TrainLoader(ex, 4, seed=0, shuffle=True, sharding=None)
    again.restore(state)
    for b in batches[3:]:
        got = next(again)
        assert all(np.array_equal(got[k], b[k]) for k in b)


def _folder(root, classes=("cat", "dog"), n=6, size=(8, 8), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


FOLDER = ["task.name=image_classification", "model.name=cnn", "model.channels=[4]",
          "train.seq_len=1", "train.batch_size=4", "data.val_fraction=0.25"]


def test_image_folder_reads_decodes_and_normalises(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    cfg = load_config(None, FOLDER + [f"data.source={root}", "data.pixel_mean=[0.5,0.5,0.5]",
                                      "data.pixel_std=[0.25,0.25,0.25]"])
    data = build_data(cfg, str(tmp_path / "run"))
    assert data.sizes == {"num_labels": 2, "image_height": 8, "image_width": 8, "image_channels": 3}
    assert len(data.train) + len(data.eval) == 12 and len(data.eval) == 3
    ex = data.eval[0]
    src = data.eval.source
    path = src.files[int(data.eval.indices[0])]
    pixels = np.asarray(Image.open(path), np.float32) / 255
    np.testing.assert_allclose(ex["images"], (pixels - 0.5) / 0.25, rtol=0, atol=1e-6)
    assert int(ex["labels"]) == (0 if "/cat/" in path else 1)
    meta = json.loads((tmp_path / "run" / "image_data.json").read_text())
    assert meta["class_names"] == ["cat", "dog"] and meta["image_shape"] == [8, 8, 3]
    cfg = resolve(cfg, data)
    assert (cfg.model.image_height, cfg.task.num_labels) == (8, 2)
    # a validation folder: every training image trains, its images (one class only) evaluate
    val_root = _folder(tmp_path / "val", classes=("dog",), n=2)
    data = build_data(load_config(None, FOLDER + [f"data.source={root}",
                                                  f"data.eval_split={val_root}"]), "")
    assert (len(data.train), len(data.eval)) == (12, 2)
    assert [int(data.eval[i]["labels"]) for i in range(2)] == [1, 1]  # "dog" is class 1 of 2


def _one_line_exit_2(tmp_path, capsys, *over):
    rc = cli_run(["train", "configs/cnn_digits.yaml", f"run.dir={tmp_path}/run", "train.steps=1",
                  "model.channels=[4]", *over])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_image_folder_errors_are_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    os.makedirs(root / "empty")
    err = _one_line_exit_2(tmp_path, capsys, f"data.source={root}")
    assert err == (f"bigjax: error: image folder: class folder '{root}/empty' holds no readable "
                   ".png/.jpg/.jpeg image; add images or remove it"), err
    os.rmdir(root / "empty")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    err = _one_line_exit_2(tmp_path, capsys, f"data.source={root}", "data.on_bad_rows=error")
    assert err.startswith(f"bigjax: error: image folder: cannot decode {root}/dog/broken.png: "), err
    # skip (the default): counted, the other images used
    cfg = load_config(None, FOLDER + [f"data.source={root}"])
    data = build_data(cfg, "")
    assert data.info["images_skipped"] == 1 and len(data.train) + len(data.eval) == 12
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "cat" / "tall.png")
    err = _one_line_exit_2(tmp_path, capsys, f"data.source={root}")
    assert "images of different sizes (8x8 " in err and "set data.image_size" in err, err
    data = build_data(load_config(None, FOLDER + [f"data.source={root}", "data.image_size=6"]), "")
    assert data.eval[0]["images"].shape == (6, 6, 3)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resnet18_cifar10_config_resolves_and_builds_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    from bigjax.models.resnet import forward_flops
    cfg = load_config(os.path.join(ROOT, "configs/resnet18_cifar10.yaml"),
                      [f"run.dir={tmp_path}/run", "data.workers=0"])
    with tfds.testing.mock_data(num_examples=24):
        data = build_data(cfg, str(tmp_path / "run"))
        cfg = resolve(cfg, data)
        assert (cfg.model.image_height, cfg.model.image_width, cfg.model.image_channels,
                cfg.task.num_labels) == (32, 32, 3, 10)
        ex = data.train.example_at_epoch(0, 0)
        assert ex["images"].shape == (32, 32, 3) and ex["images"].dtype == np.float32
        raw = data.train.source.raw(0)[0].astype(np.float32) / 255
        plain = data.train[0]["images"]  # no augmentation: exactly the normalised pixels
        np.testing.assert_allclose(plain * np.float32([0.2470, 0.2435, 0.2616]) +
                                   np.float32([0.4914, 0.4822, 0.4465]), raw, rtol=0, atol=1e-6)
        assert len(data.eval) == 24  # eval_split: test
    parts = one_device(cfg)
    # torchvision's resnet18(num_classes=10) has 11,181,642 parameters; the cifar stem's 3x3
    # kernel has 64 x 3 x (49 - 9) fewer
    assert parts.n_params == 11_181_642 - 64 * 3 * 40
    assert forward_flops(cfg.model, 10) == _torch_macs_cifar_resnet18() * 2


def _torch_macs_cifar_resnet18() -> int:
    """Multiply-adds of torchvision's ResNet-18 with the CIFAR stem, counted by forward hooks."""
    import torch
    from torchvision_ref import import_torchvision
    model = import_torchvision().models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    macs = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: macs.append(
                o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]))
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.in_features))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return sum(macs)


def test_predict_on_paths_and_arrays(tmp_path):
    """Trainer.predict on image files and on pixel arrays agrees, and an image is prepared
    exactly as the training pipeline prepares it (the run's saved normalisation)."""
    from bigjax.data.images import load_meta
    from bigjax.predict import prepare_image
    from bigjax.trainer import Trainer
    root = _folder(tmp_path / "imgs")
    t = Trainer(None, FOLDER + [f"data.source={root}", f"run.dir={tmp_path}/run",
                                "train.progress=false", "train.batch_size=8"])
    meta = load_meta(str(tmp_path / "run"))
    for i in range(3):
        path = t.data.eval.source.files[int(t.data.eval.indices[i])]
        np.testing.assert_allclose(prepare_image(path, meta), t.data.eval[i]["images"],
                                   rtol=0, atol=1e-6)
    paths = [str(root / "cat" / "0.png"), str(root / "dog" / "3.png")]
    arrays = [np.asarray(Image.open(p)) for p in paths]
    by_path, by_array = t.predict(paths), t.predict(arrays)
    assert [lbl for lbl, _ in by_path] == [lbl for lbl, _ in by_array]
    assert all(lbl in ("cat", "dog") for lbl, _ in by_path)
    np.testing.assert_allclose([p for _, p in by_path], [p for _, p in by_array], rtol=1e-6)
    with pytest.raises(Exception, match=r"an image of shape \(5, 5, 3\), but the run was trained "
                                        r"on 8x8x3 images"):
        t.predict([np.zeros((5, 5, 3), np.uint8)])
