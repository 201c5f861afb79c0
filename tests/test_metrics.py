"""`rece evaluate`: NudeNet (real detector), CLIP score, FID, LPIPS, ResNet-50 accuracy, caching, tables, bad inputs."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rece.cli import main
from rece.errors import ReceError
from rece.metrics import check_metrics, default_metrics, evaluate
from rece.metrics.fid import feature_stats, fid_from_features, frechet_distance, sqrtm_psd
from rece.metrics.lpips import to_lpips_tensor
from rece.metrics.nudenet import NUDE_CLASSES, NUDENET_CACHE, load_nudenet_detector, summarise_nudity
from rece.networks.inception import FIDInception, load_fid_inception
from rece.networks.lpips import ALEX_CHANNELS, LPIPS, alexnet_slices, load_lpips
from rece.networks.resnet import load_classifier, resnet50
from rece.runs import load_run


def make_run(folder: Path, images: dict, labels: dict | None = None) -> Path:
    """A run folder as `rece generate` writes it: images/NAME.png, prompts.csv (prompt + label columns), manifest.json."""
    (folder / "images").mkdir(parents=True)
    labels = labels or {}
    columns = ["case_number", "k", "seed", "prompt", "guidance", "image", *labels]
    with open(folder / "prompts.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, (name, (pixels, prompt)) in enumerate(images.items()):
            Image.fromarray(pixels).save(folder / "images" / name)
            writer.writerow([name.split("_")[0], 0, 100 + i, prompt, 7.5, f"images/{name}", *(v[i] for v in labels.values())])
    (folder / "manifest.json").write_text(json.dumps({"format": "rece-generate"}))
    return folder


def pattern(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random RGB picture (uint8)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def solid(rgb, size: int = 64) -> np.ndarray:
    return np.full((size, size, 3), rgb, np.uint8)


PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(autouse=True)
def _torch_cache(tmp_path, monkeypatch):
    """torch's hub cache in a fresh folder: no test reads or fills the user's (~/.cache/torch/hub)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture
def run_a(tmp_path):
    return make_run(tmp_path / "a", {f"{i}_0.png": (pattern(i), p) for i, p in enumerate(PROMPTS)})


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- Fréchet distance -----------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # diagonal covariances: |mu1-mu2|² + Σ (√a - √b)²
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general covariances: tr((S1 S2)^½) = Σ √eig(S1 S2); identical Gaussians → 0
    x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = x @ x.T + 0.1 * np.eye(5), y @ y.T
    cross = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)))
    assert frechet_distance(mu1, s1, mu1, s2) == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * cross, rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # singular covariances (fewer samples than dimensions) stay finite and non-negative
    f = rng.normal(size=(3, 8))
    assert frechet_distance(*feature_stats(f), *feature_stats(f + 1)) == pytest.approx(
        8.0, abs=1e-5
    )  # √ of ~1e-16 eigenvalues: ~1e-7 error
    assert np.allclose(sqrtm_psd(s1) @ sqrtm_psd(s1), s1)
    # the low-rank route (fewer samples than dimensions) agrees with the covariance route
    g1, g2 = rng.normal(size=(4, 8)), rng.normal(size=(6, 8)) * 2 + 1
    assert fid_from_features(g1, g2) == pytest.approx(frechet_distance(*feature_stats(g1), *feature_stats(g2)), rel=1e-6)
    assert fid_from_features(f, f + 1) == pytest.approx(8.0, abs=1e-9)
    big1, big2 = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    assert fid_from_features(big1, big2) == frechet_distance(*feature_stats(big1), *feature_stats(big2))


# -- NudeNet --------------------------------------------------------------------------------------
class CountingDetector:
    """The real NudeNet detector, counting the images it is asked about."""

    def __init__(self):
        self.inner, self.seen = load_nudenet_detector(), []

    def detect(self, path):
        self.seen.append(Path(path).name)
        return self.inner.detect(path)


def test_nudenet_real_detector_results_and_cache(run_a):
    det = CountingDetector()
    out = evaluate(run_a, ["nudenet"], detector=det, progress=False)["nudenet"]
    assert sorted(det.seen) == ["0_0.png", "1_0.png", "2_0.png"]
    assert list(out["summary"]) == [*NUDE_CLASSES.values(), "total", "nudity rate %"]
    assert out["params"]["threshold"] == 0.6 and out["images"] == 3
    assert out["summary"]["nudity rate %"] == 0.0  # smooth colour fields are not nudity
    saved = json.loads((run_a / "metrics.json").read_text())
    assert saved["nudenet"]["summary"] == out["summary"]
    with open(run_a / "metrics_nudenet.csv") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["0_0.png", "1_0.png", "2_0.png"]
    cache = json.loads((run_a / NUDENET_CACHE).read_text())["images"]
    assert set(cache) == {"0_0.png", "1_0.png", "2_0.png"} and all("detections" in v for v in cache.values())
    # a rerun with another threshold reads the cache only; a changed and a new image are the only ones detected
    det.seen.clear()
    again = evaluate(run_a, ["nudenet"], detector=det, threshold=0.3, progress=False)["nudenet"]
    assert det.seen == [] and again["params"]["threshold"] == 0.3
    Image.fromarray(pattern(7)).save(run_a / "images" / "1_0.png")
    os.utime(run_a / "images" / "1_0.png", ns=(1, 1))
    Image.fromarray(solid((200, 150, 120))).save(run_a / "images" / "3_0.png")
    evaluate(run_a, ["nudenet"], detector=det, progress=False)
    assert sorted(det.seen) == ["1_0.png", "3_0.png"]


def test_nudity_threshold_and_counting():
    detections = {
        "a.png": [{"class": "FEET_EXPOSED", "score": 0.7}, {"class": "FEET_EXPOSED", "score": 0.9}],
        "b.png": [{"class": "BELLY_EXPOSED", "score": 0.5}, {"class": "FACE_FEMALE", "score": 0.99}],
        "c.png": [{"class": "FEMALE_BREAST_COVERED", "score": 0.95}],
        "d.png": [],
    }
    summary, rows = summarise_nudity(detections, 0.6)
    assert summary["feet"] == 1 and summary["belly"] == 0 and summary["total"] == 1 and summary["nudity rate %"] == 25.0
    assert [r["nude"] for r in rows] == [1, 0, 0, 0]
    summary, _ = summarise_nudity(detections, 0.45)
    assert summary["belly"] == 1 and summary["total"] == 2 and summary["nudity rate %"] == 50.0


# -- CLIP score -----------------------------------------------------------------------------------
def test_clip_score_matches_direct_computation(run_a, tiny_clip):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    out = evaluate(run_a, ["clip-score"], clip_model=str(tiny_clip), batch_size=2, progress=False)["clip-score"]
    assert out["params"]["clip_model"] == str(tiny_clip)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok, proc = CLIPTokenizer.from_pretrained(tiny_clip), CLIPImageProcessorPil.from_pretrained(tiny_clip)
    images = [Image.open(run_a / "images" / f"{i}_0.png").convert("RGB") for i in range(3)]
    inputs = dict(
        tok(PROMPTS, padding=True, return_tensors="pt"), pixel_values=proc(images=images, return_tensors="pt")["pixel_values"]
    )
    with torch.no_grad():
        cos = model(**inputs).logits_per_image.diag() / model.logit_scale.exp()
    expected = (100 * cos.clamp(min=0)).tolist()
    with open(run_a / "metrics_clip-score.csv") as f:
        got = [float(r["clip_score"]) for r in csv.DictReader(f)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert out["summary"]["clip score"] == pytest.approx(np.mean(expected), abs=1e-3)


def test_clip_model_missing_offline(run_a, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("openai/clip-vit-large-patch14-not-cached", str(tmp_path)):
        with pytest.raises(ReceError, match="--clip-model") as info:
            evaluate(run_a, ["clip-score"], clip_model=name, progress=False)
        assert name in str(info.value) and "\n" not in str(info.value)


# -- FID ------------------------------------------------------------------------------------------
def test_fid_clip_features_and_errors(run_a, tiny_clip, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(4):
        Image.fromarray(solid((60 * i, 255 - 60 * i, 90))).save(ref / f"r{i}.png")
    opts = dict(fid_features="clip", clip_model=str(tiny_clip), progress=False)
    fid = evaluate(run_a, ["fid"], reference=ref, **opts)["fid"]
    assert fid["summary"]["fid"] > 0 and fid["params"]["reference_images"] == 4 and fid["params"]["features"] == "clip"
    self_fid = evaluate(run_a, ["fid"], reference=run_a / "images", **opts)["fid"]["summary"]["fid"]
    assert abs(self_fid) < 1e-3
    with pytest.raises(ReceError, match="--reference"):
        evaluate(run_a, ["fid"], **opts)
    with pytest.raises(ReceError, match="reference folder .* does not exist"):
        evaluate(run_a, ["fid"], reference=tmp_path / "nope", **opts)
    with pytest.raises(ReceError, match=r"pt_inception-2015-12-05-6726825d.pth is not in torch's cache .*--fid-features clip"):
        evaluate(run_a, ["fid"], reference=ref, progress=False)  # offline, nothing cached


def test_fid_inception_architecture_and_weights_file(run_a, tmp_path):
    torch.manual_seed(0)
    net = FIDInception()
    # torchvision's Inception v3 without AuxLogits and fc has 21,785,568 parameters; pytorch-fid's head has 1008 classes
    assert sum(v.numel() for k, v in net.named_parameters() if not k.startswith("fc.")) == 21_785_568
    assert net.fc.weight.shape == (1008, 2048)
    for mod in net.modules():  # variance-preserving random weights, so the pool3 features are not all ~0
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as in the 2015 file
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, weights)
    run = make_run(tmp_path / "run", {f"{i}_0.png": (pattern(i, 40), "x") for i in range(2)})
    ref = make_run(tmp_path / "ref", {f"{i}_0.png": (solid((90 * i, 90, 200 - 80 * i), 48 + 8 * i), "x") for i in range(2)})
    out = evaluate(run, ["fid"], reference=ref, fid_weights=str(weights), progress=False)["fid"]  # image sizes differ
    assert out["summary"]["fid"] > 0 and out["params"]["features"] == "inception" and out["params"]["fid_weights"] == str(weights)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(ReceError, match="not pytorch-fid's Inception state dict"):
        load_fid_inception(tmp_path / "bad.pth")


# -- LPIPS ----------------------------------------------------------------------------------------
def tiny_lpips() -> LPIPS:
    torch.manual_seed(0)
    nn = torch.nn
    slices = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())]
    )
    model = LPIPS(slices, (8, 8))
    for lin in model.lins:
        nn.init.uniform_(lin.weight, 0.1, 1.0)  # LPIPS's lin weights are non-negative
    return model.eval()


def test_lpips_properties():
    model = tiny_lpips()
    a, b = to_lpips_tensor(Image.fromarray(pattern(1))), to_lpips_tensor(Image.fromarray(pattern(2)))
    near = to_lpips_tensor(Image.fromarray(np.clip(pattern(1).astype(int) + 8, 0, 255).astype(np.uint8)))
    with torch.no_grad():
        assert model(a, a).item() == 0
        assert model(a, b).item() == pytest.approx(model(b, a).item(), rel=1e-6)
        assert 0 < model(a, near).item() < model(a, b).item()


def lpips_package_state(model: LPIPS) -> dict:
    """Our LPIPS-AlexNet weights under the lpips package's key names."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("slices."):
            _, s, rest = key.split(".", 2)
            state[f"net.slice{int(s) + 1}.{rest}"] = value
        elif key.startswith("lins."):
            state[f"lin{key.split('.')[1]}.model.1.weight"] = value
        else:
            state[f"scaling_layer.{key}"] = value
    return state


def test_lpips_between_runs_and_errors(run_a, tmp_path):
    torch.manual_seed(0)
    alex = LPIPS(alexnet_slices(), ALEX_CHANNELS)
    for lin in alex.lins:
        torch.nn.init.uniform_(lin.weight, 0.1, 1.0)
    weights = tmp_path / "lpips_alex.pth"
    torch.save(lpips_package_state(alex), weights)
    run_b = make_run(tmp_path / "b", {f"{i}_0.png": (pattern(10 + i), p) for i, p in enumerate(PROMPTS)})
    out = evaluate(run_a, ["lpips"], against=run_b, lpips_weights=str(weights), progress=False)["lpips"]
    assert out["summary"]["lpips"] > 0 and out["params"]["net"] == "alex"
    same = evaluate(run_a, ["lpips"], against=run_a, lpips_weights=str(weights), progress=False)["lpips"]
    assert same["summary"]["lpips"] == 0
    with pytest.raises(ReceError, match="--lpips-weights"):
        evaluate(run_a, ["lpips"], against=run_b, progress=False)
    short = make_run(tmp_path / "short", {"0_0.png": (pattern(3), "x")})
    with pytest.raises(ReceError, match="lacks 2 of the 3 images .*first: 1_0.png"):
        evaluate(run_a, ["lpips"], against=short, lpips_weights=str(weights), progress=False)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ReceError, match="not an LPIPS-AlexNet state dict"):
        evaluate(run_a, ["lpips"], against=run_b, lpips_weights=str(tmp_path / "bad.pth"), progress=False)


# -- ResNet-50 accuracy ---------------------------------------------------------------------------
def test_classify_rigged_resnet50_via_cli(capsys, tmp_path):
    run = make_run(
        tmp_path / "objects",
        {f"{i}_0.png": (pattern(i, 48), f"an image of a {c}") for i, c in enumerate(["church", "Church", "tench"])},
        {"class": ["church", "Church", "tench"]},
    )
    model = resnet50()
    with torch.no_grad():  # always predict ImageNet index 497, 'church'
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[497] = 1
    weights = tmp_path / "resnet50.pth"
    torch.save(model.state_dict(), weights)
    code, out, err = run_cli(capsys, "evaluate", run, "--classifier-weights", weights)  # `class` column → classify
    assert code == 0, err
    saved = json.loads((run / "metrics.json").read_text())["classify"]
    assert saved["summary"]["accuracy %"] == pytest.approx(200 / 3, abs=1e-3)
    assert saved["summary"]["acc tench %"] == 0 and saved["summary"]["acc church %"] == 100
    assert "accuracy %" in out and "66.67" in out
    with open(run / "metrics_classify.csv") as f:
        assert [r["predicted"] for r in csv.DictReader(f)] == ["church"] * 3
    code, _, err = run_cli(capsys, "evaluate", run, "--metric", "classify")
    assert code == 2 and "--classifier-weights" in err and err.count("\n") == 1
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "partial.pth")
    code, _, err = run_cli(capsys, "evaluate", run, "--metric", "classify", "--classifier-weights", tmp_path / "partial.pth")
    assert code == 2 and "not a torchvision ResNet-50 state dict" in err
    odd = make_run(tmp_path / "odd", {"0_0.png": (pattern(0), "a cat")}, {"class": ["tabby cat"]})
    with pytest.raises(ReceError, match="'tabby cat'.*--class-names"):
        evaluate(odd, ["classify"], model=model, progress=False)


def test_resnet50_matches_torchvision_layout():
    state = resnet50().state_dict()
    assert len([k for k in state if k.endswith("num_batches_tracked")]) == 53
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 25_557_032
    assert "layer4.2.bn3.weight" in state and "layer1.0.downsample.0.weight" in state


# -- weights downloaded when online (torch's hub cache), a one-line error offline ---------------------
FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"


def fake_torch_hub(monkeypatch, files: dict) -> list[dict]:
    """Replace torch.hub.load_state_dict_from_url by a lookup in `files` (URL → state dict); return the calls it gets."""
    calls = []

    def load(url, model_dir=None, map_location=None, progress=True, check_hash=False, file_name=None, weights_only=False):
        calls.append(dict(url=url, file_name=file_name, map_location=map_location, weights_only=weights_only, hash=check_hash))
        if url not in files:
            raise OSError(f"<urlopen error [Errno -3] Temporary failure in name resolution> ({url})")
        return dict(files[url])

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load)
    return calls


def torchvision_alexnet() -> tuple[torch.nn.Sequential, dict]:
    """torchvision's AlexNet.features (randomly initialised) and the state dict of the whole model as its file holds it."""
    nn = torch.nn
    features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    # the classifier head (Linear 9216→4096→4096→1000) is in the file but LPIPS never reads it: small stand-ins
    state.update({f"classifier.{i}.{p}": torch.zeros(2) for i in (1, 4, 6) for p in ("weight", "bias")})
    return features, state


def reference_lpips(features: torch.nn.Sequential, lins: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """LPIPS as the lpips package computes it: scaling layer, relu1..relu5 of AlexNet.features, unit-normalised, lin, mean."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = (1, 4, 7, 9, 11)  # lpips' slice1..slice5 end after these modules of torchvision's AlexNet.features
    hx, hy, total = (x - shift) / scale, (y - shift) / scale, 0.0
    for i, layer in enumerate(features[: taps[-1] + 1]):
        hx, hy = layer(hx), layer(hy)
        if i in taps:
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += float(torch.nn.functional.conv2d((nx - ny) ** 2, lins[taps.index(i)]).mean())
    return total


def test_lpips_weights_downloaded_when_online(monkeypatch, run_a, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torch.manual_seed(0)
    features, alexnet = torchvision_alexnet()
    lins = [torch.rand(1, c, 1, 1) for c in (64, 192, 384, 256, 256)]
    calls = fake_torch_hub(
        monkeypatch, {ALEXNET_URL: alexnet, LPIPS_URL: {f"lin{i}.model.1.weight": w for i, w in enumerate(lins)}}
    )
    model = load_lpips()
    assert [(c["url"], c["file_name"], c["hash"]) for c in calls] == [
        (ALEXNET_URL, "alexnet-owt-7be5be79.pth", True),
        (LPIPS_URL, "lpips-v0.1-alex.pth", False),
    ]
    assert all(c["map_location"] == "cpu" and c["weights_only"] for c in calls)
    a, b = to_lpips_tensor(Image.fromarray(pattern(1))), to_lpips_tensor(Image.fromarray(pattern(2)))
    with torch.no_grad():
        assert model(a, b).item() == pytest.approx(reference_lpips(features, lins, a, b), rel=1e-5)
    run_b = make_run(tmp_path / "b", {f"{i}_0.png": (pattern(10 + i), p) for i, p in enumerate(PROMPTS)})
    out = evaluate(run_a, ["lpips"], against=run_b, progress=False)["lpips"]
    assert out["summary"]["lpips"] > 0 and out["params"]["weights"] == f"{ALEXNET_URL} + {LPIPS_URL}"


def test_fid_and_classifier_weights_downloaded_when_online(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torch.manual_seed(0)
    inception = {k: v for k, v in FIDInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    resnet = resnet50()
    with torch.no_grad():  # always predict ImageNet index 497, 'church'
        resnet.fc.weight.zero_()
        resnet.fc.bias.zero_()
        resnet.fc.bias[497] = 1
    calls = fake_torch_hub(monkeypatch, {FID_URL: inception, RESNET50_URL: resnet.state_dict()})
    net = load_fid_inception()
    assert [(c["url"], c["file_name"], c["hash"]) for c in calls] == [(FID_URL, "pt_inception-2015-12-05-6726825d.pth", False)]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in inception.items())
    run = make_run(
        tmp_path / "objects", {f"{i}_0.png": (pattern(i, 48), "a church") for i in range(2)}, {"class": ["church"] * 2}
    )
    code, out, err = run_cli(capsys, "evaluate", run)  # `class` column → classify, ResNet-50 downloaded
    assert code == 0, err
    assert calls[-1]["url"] == RESNET50_URL and calls[-1]["file_name"] == "resnet50-11ad3fa6.pth" and calls[-1]["hash"]
    saved = json.loads((run / "metrics.json").read_text())["classify"]
    assert saved["summary"]["accuracy %"] == 100 and saved["params"]["weights"] == RESNET50_URL


def test_weights_offline_or_unreachable_are_one_line_errors(capsys, monkeypatch, run_a):
    calls = fake_torch_hub(monkeypatch, {})
    cases = [
        (load_fid_inception, "pt_inception-2015-12-05-6726825d.pth", FID_URL, "--fid-weights FILE (or --fid-features clip)"),
        (load_lpips, "alexnet-owt-7be5be79.pth", ALEXNET_URL, "--lpips-weights FILE"),
        (load_classifier, "resnet50-11ad3fa6.pth", RESNET50_URL, "--classifier-weights FILE"),
    ]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(cache).startswith(os.environ["TORCH_HOME"])
    for load, file, url, flag in cases:
        with pytest.raises(ReceError) as info:  # offline (conftest sets HF_HUB_OFFLINE=1), nothing in torch's cache
            load()
        message = str(info.value)
        assert f"weights file {file} is not in torch's cache and HF_HUB_OFFLINE=1 stops its download" in message
        assert f"download {url} to {cache / file}, or pass {flag}" in message and "\n" not in message
    assert calls == []
    code, _, err = run_cli(capsys, "evaluate", run_a, "--metric", "fid", "--reference", run_a)
    assert code == 2 and err.count("\n") == 1 and FID_URL in err and "--fid-weights" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, but the download fails
    for load, file, url, flag in cases:
        with pytest.raises(ReceError) as info:
            load()
        message = str(info.value)
        assert f"cannot download weights file {file} (<urlopen error" in message and url in message and flag in message
    cache.mkdir(parents=True)  # offline with the files already in torch's cache: they are used
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("alexnet-owt-7be5be79.pth", "lpips-v0.1-alex.pth"):
        (cache / name).touch()
    _, alexnet = torchvision_alexnet()
    fake_torch_hub(
        monkeypatch,
        {
            ALEXNET_URL: alexnet,
            LPIPS_URL: {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(ALEX_CHANNELS)},
        },
    )
    assert isinstance(load_lpips(), LPIPS)


# -- command line: tables, merging, bad inputs -----------------------------------------------------
def test_cli_table_of_runs_and_merged_metrics(capsys, run_a, tmp_path, tiny_clip):
    run_b = make_run(tmp_path / "b", {"0_0.png": (solid((0, 0, 0)), "nudity"), "1_0.png": (solid((230, 180, 150)), "nudity")})
    code, out, err = run_cli(capsys, "evaluate", run_a, run_b, "--metric", "nudenet", "--threshold", "0.5")
    assert code == 0, err
    header, _, row_a, row_b = out.splitlines()[:4]
    assert header.split()[:2] == ["run", "armpits"] and "total" in header and "nudity rate %" in header
    assert row_a.startswith(str(run_a)) and row_b.startswith(str(run_b))
    code, out, err = run_cli(capsys, "evaluate", run_a, "--metric", "clip-score", "--clip-model", tiny_clip, "--json")
    assert code == 0, err
    assert set(json.loads(out)[str(run_a)]) == {"clip-score"}
    saved = json.loads((run_a / "metrics.json").read_text())
    assert set(saved) == {"nudenet", "clip-score"} and saved["nudenet"]["params"]["threshold"] == 0.5
    assert not [p for p in run_a.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "{tmp}/missing", "--metric", "nudenet"], "does not exist"),
        (["evaluate", "{run}", "--metric", "bleu"], "unknown metric 'bleu'"),
        (["evaluate", "{run}"], "pass --metric"),
        (["evaluate", "{run}", "--metric", "lpips"], "--against"),
        (["evaluate", "{run}", "--metric", "lpips", "--against", "{tmp}/missing"], "does not exist"),
        (["evaluate", "{run}", "--metric", "nudenet", "--threshold", "2"], "between 0 and 1"),
        (["evaluate", "{run}", "--metric", "fid", "--reference", "{run}", "--fid-features", "sift"], "unknown --fid-features"),
        (["evaluate", "{run}", "--metric", "classify", "--classifier-weights", "{tmp}/missing.pth"], "`class`"),
    ],
)
def test_cli_bad_inputs(capsys, run_a, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *[a.format(run=run_a, tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_empty_run_and_defaults(tmp_path, run_a):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ReceError, match="has no images"):
        load_run(tmp_path / "empty")
    i2p = make_run(tmp_path / "i2p", {"0_0.png": (pattern(0), "x")}, {"categories": ["sexual"]})
    assert default_metrics(load_run(i2p)) == ["nudenet"]
    assert check_metrics(["nudenet,fid", "nudenet"]) == ["nudenet", "fid"]


def test_generate_evaluate_all_metrics_report_end_to_end(capsys, sd_path, tmp_path, tiny_clip):
    """The researcher's path on a tiny model: rece generate (original, edited) → rece evaluate with all five metrics
    (local stand-in weights) → rece report, all through the CLI."""
    prompts = tmp_path / "set.csv"
    prompts.write_text("case_number,prompt,evaluation_seed,class\n0,a church,1,church\n1,a tench in a river,2,tench\n")
    edit = tmp_path / "church.safetensors"
    fast = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]
    assert run_cli(capsys, "erase", sd_path, "-c", "church", "--method", "uce", "-o", edit)[0] == 0
    before, after = tmp_path / "before", tmp_path / "after"
    for out, extra in ((before, []), (after, ["--edit", edit])):
        code, _, err = run_cli(capsys, "generate", sd_path, *extra, "--prompts", prompts, "-o", out, *fast)
        assert code == 0, err
    torch.manual_seed(0)
    alex = LPIPS(alexnet_slices(), ALEX_CHANNELS)
    for lin in alex.lins:
        torch.nn.init.uniform_(lin.weight, 0.1, 1.0)  # LPIPS's lin weights are non-negative
    torch.save(lpips_package_state(alex), tmp_path / "lpips.pth")
    torch.save(resnet50().state_dict(), tmp_path / "resnet50.pth")
    metrics = "nudenet,clip-score,fid,lpips,classify"
    options = ["--clip-model", tiny_clip, "--fid-features", "clip", "--reference", before, "--against", before]
    options += ["--lpips-weights", tmp_path / "lpips.pth", "--classifier-weights", tmp_path / "resnet50.pth"]
    for run in (before, after):
        code, out, err = run_cli(capsys, "evaluate", run, "--metric", metrics, *options)
        assert code == 0, err
        saved = json.loads((run / "metrics.json").read_text())
        assert set(saved) >= {"nudenet", "clip-score", "fid", "lpips", "classify"}
        for name in ("nudenet", "clip-score", "fid", "lpips", "classify"):
            assert all(np.isfinite(v) for v in saved[name]["summary"].values() if isinstance(v, (int, float)))
    assert json.loads((before / "metrics.json").read_text())["lpips"]["summary"]["lpips"] == 0  # a run against itself
    assert json.loads((after / "metrics.json").read_text())["lpips"]["summary"]["lpips"] > 0  # the edit changed images
    report = tmp_path / "report.html"
    code, _, err = run_cli(capsys, "report", before, after, "-o", report)
    assert code == 0, err
    page = report.read_text(encoding="utf-8")
    assert page.count("<img ") == 4 and "uce: church" in page
    for column in ("nudity rate", "clip score", "fid", "lpips", "accuracy %"):
        assert column in page.lower(), column
