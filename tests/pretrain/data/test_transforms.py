"""Two-view augmentations: parameter distributions, fast pipeline vs the PIL reference."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pretrain.data.fast_augment import (
    _gaussian_blur,
    _hue_shift,
    device_augment,
    draft_factor,
    fast_crops,
    params_to_tensors,
)
from pretrain.data.transforms import (
    AugmentConfig,
    reference_two_views,
    sample_crop,
    sample_generator,
    sample_two_views,
)


def _jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    f = rng.uniform(1, 6, 3)
    chans = [
        np.sin(2 * np.pi * (f[c] * x + f[(c + 1) % 3] * y * y) + rng.uniform(0, 6))
        for c in range(3)
    ]
    arr = (127 + 90 * np.stack(chans, -1) + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _both(data, cfg, seed, index):
    img = Image.open(io.BytesIO(data))
    params = sample_two_views(seed, 0, index, img.size[0], img.size[1], cfg)
    ref = reference_two_views(img.convert("RGB"), params, cfg)
    crops = fast_crops(Image.open(io.BytesIO(data)), params, cfg)
    fast = [
        device_augment(torch.from_numpy(np.stack([c])), params_to_tensors([p]), cfg)[0]
        for c, p in zip(crops, params)
    ]
    return params, ref, fast


def test_crop_distribution_matches_torchvision():
    n, w, h = 3000, 500, 375
    rng = sample_generator(0, 0, 0)
    ours = np.array([sample_crop(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    torch.manual_seed(0)
    img = Image.new("RGB", (w, h))
    tv = np.array(
        [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    for crops in (ours, tv):
        assert (crops[:, 0] >= 0).all() and (crops[:, 0] + crops[:, 2] <= h).all()
        assert (crops[:, 1] >= 0).all() and (crops[:, 1] + crops[:, 3] <= w).all()

    def stats(c):
        area = c[:, 2] * c[:, 3] / (w * h)
        logr = np.log(c[:, 3] / c[:, 2])
        centre = (c[:, 1] + c[:, 3] / 2) / w
        return np.array(
            [
                area.mean(),
                np.median(area),
                area.std(),
                logr.mean(),
                logr.std(),
                centre.mean(),
                centre.std(),
            ]
        )

    # Standard errors at n=3000 are ~0.005 for these statistics.
    np.testing.assert_allclose(stats(ours), stats(tv), atol=0.03)


def test_colour_parameter_distributions():
    cfg = AugmentConfig()
    n = 4000
    views = [sample_two_views(1, 0, i, 64, 64, cfg) for i in range(n)]
    for v, (p_blur, p_sol) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        ps = [pair[v] for pair in views]
        tol = 4 * math.sqrt(0.25 / n)
        assert abs(np.mean([p.flip for p in ps]) - 0.5) < tol
        assert abs(np.mean([p.jitter for p in ps]) - 0.8) < tol
        assert abs(np.mean([p.gray for p in ps]) - 0.2) < tol
        assert abs(np.mean([p.blur for p in ps]) - p_blur) < tol
        assert abs(np.mean([p.solarize for p in ps]) - p_sol) < tol
        sig = np.array([p.sigma for p in ps])
        assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.03
        fac = np.array([p.factors for p in ps])
        torch.manual_seed(0)
        tv = np.array(
            [
                T.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))[1:]
                for _ in range(n)
            ],
            dtype=np.float64,
        )
        np.testing.assert_allclose(fac.mean(0), tv.mean(0), atol=0.02)
        np.testing.assert_allclose(fac.std(0), tv.std(0), atol=0.02)
        np.testing.assert_allclose(fac.min(0), [0.6, 0.6, 0.8, -0.1], atol=0.01)
        np.testing.assert_allclose(fac.max(0), [1.4, 1.4, 1.2, 0.1], atol=0.01)
        # Jitter op order: every op lands in every position equally often.
        orders = np.array([p.order for p in ps])
        for pos in range(4):
            counts = np.bincount(orders[:, pos], minlength=4) / n
            assert np.abs(counts - 0.25).max() < 0.04


def test_params_are_pure_function_of_seed_epoch_index():
    cfg = AugmentConfig()
    a = sample_two_views(5, 2, 17, 300, 200, cfg)
    assert a == sample_two_views(5, 2, 17, 300, 200, cfg)
    assert a != sample_two_views(5, 3, 17, 300, 200, cfg)
    assert a != sample_two_views(5, 2, 18, 300, 200, cfg)
    assert a != sample_two_views(6, 2, 17, 300, 200, cfg)


def test_hue_shift_matches_torchvision():
    x = torch.rand(3, 3, 17, 19)
    x[0, :, :2] = 0.5  # grey pixels (zero chroma)
    shifts = torch.tensor([-0.1, 0.03, 0.1])
    ours = _hue_shift(x, shifts)
    for i in range(3):
        ref = F.adjust_hue(x[i], float(shifts[i]))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_blur_matches_gaussian_in_the_interior():
    x = torch.rand(2, 3, 40, 40)
    sig = torch.tensor([0.7, 1.6])
    ours = _gaussian_blur(x, sig)
    for i in range(2):
        ref = F.gaussian_blur(x[i], kernel_size=[11, 11], sigma=[float(sig[i])] * 2)
        torch.testing.assert_close(ours[i, :, 5:-5, 5:-5], ref[:, 5:-5, 5:-5], atol=2e-3, rtol=0)
    blurred = ours[0]
    assert blurred.std() < x[0].std()


def test_fast_matches_reference_per_image_and_in_distribution():
    cfg = AugmentConfig(size=64)
    refs, fasts = [], []
    for i in range(24):
        params, ref, fast = _both(_jpeg(120, 90, i), cfg, seed=0, index=i)
        for r, f in zip(ref, fast):
            assert f.shape == r.shape == (3, 64, 64) and f.dtype == torch.float32
            # Same parameters: per-image difference of at most a few grey levels on average.
            assert (r - f).abs().mean() < 0.06
            refs.append(r)
            fasts.append(f)
    r, f = torch.stack(refs), torch.stack(fasts)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    r01, f01 = (r * std + mean).clamp(0, 1), (f * std + mean).clamp(0, 1)
    torch.testing.assert_close(f01.mean(dim=(0, 2, 3)), r01.mean(dim=(0, 2, 3)), atol=5e-3, rtol=0)
    torch.testing.assert_close(f01.std(dim=(0, 2, 3)), r01.std(dim=(0, 2, 3)), atol=5e-3, rtol=0)
    hr = torch.histc(r01, bins=32, min=0, max=1) / r01.numel()
    hf = torch.histc(f01, bins=32, min=0, max=1) / f01.numel()
    assert (hr - hf).abs().sum() < 0.05  # total-variation distance of pixel histograms


def test_draft_decoding_used_when_crops_allow_and_stays_close():
    cfg = AugmentConfig(size=32, scale=(0.5, 1.0))
    data = _jpeg(640, 480, 3)
    img = Image.open(io.BytesIO(data))
    params = sample_two_views(0, 0, 1, 640, 480, cfg)
    assert draft_factor(img, params, 32) >= 4
    params, ref, fast = _both(data, cfg, 0, 1)
    for r, f in zip(ref, fast):
        assert (r - f).abs().mean() < 0.08
    # Never draft when a crop is smaller than twice the output.
    assert draft_factor(img, params, 224) == 1
    png = Image.new("RGB", (640, 480))
    assert draft_factor(png, params, 32) == 1


def test_solarize_and_grayscale_flags():
    cfg = AugmentConfig(size=8)
    views = torch.full((2, 8, 8, 3), 200, dtype=torch.uint8)
    views[:, :, :, 0] = 10
    p = {
        "jitter": torch.tensor([False, False]),
        "factors": torch.zeros(2, 4),
        "order": torch.tensor([[0, 1, 2, 3]] * 2),
        "gray": torch.tensor([True, False]),
        "blur": torch.tensor([False, False]),
        "sigma": torch.ones(2),
        "solarize": torch.tensor([False, True]),
    }
    out = device_augment(views, p, cfg)
    x = out * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    g = (0.299 * 10 + 0.587 * 200 + 0.114 * 200) / 255
    torch.testing.assert_close(x[0], torch.full_like(x[0], g), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[1, 0], torch.full_like(x[1, 0], 10 / 255), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[1, 1], torch.full_like(x[1, 1], 55 / 255), atol=1e-5, rtol=0)


def test_bad_augment_config():
    with pytest.raises(ValueError, match="interpolation"):
        AugmentConfig(interpolation="lanczos")
    with pytest.raises(ValueError, match="crop scale"):
        AugmentConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="blur_prob"):
        AugmentConfig(blur_prob=(1.5, 0.1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_stage_on_gpu_matches_cpu():
    cfg = AugmentConfig(size=32)
    params = [sample_two_views(0, 0, i, 32, 32, cfg)[0] for i in range(16)]
    views = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    cpu = device_augment(views, params_to_tensors(params), cfg)
    gpu = device_augment(views.cuda(), params_to_tensors(params), cfg).cpu()
    # float rounding differs slightly between devices; 1e-3 is 0.06 grey levels
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=0)
