"""The hallucination-audit report: clusters at the right world position and size, a self-contained and escaped HTML
page, a JSON twin with the same figures, and a real render in headless Chromium (Debian's chromium and
chromium-driver; see .ci/install_chromium.sh)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import oblique_affine
from PIL import Image

from gen_sr.audit.report import BACKGROUND, build_report, risk_clusters, risk_peaks
from gen_sr.volume import Volume

SHAPE = (12, 14, 10)
THRESHOLD = 0.3
BLOB = [(i, j, k) for i in (4, 5, 6) for j in (5, 6, 7) for k in (3, 4, 5)] + [(7, 8, 6)]  # + a corner-only neighbour
PAIR = [(1, 12, 1), (1, 12, 2)]  # two voxels, peak 0.5, outside the brain
SINGLE = (10, 1, 8)  # one voxel, peak 0.5, outside the brain
AFFINE = oblique_affine()


def _world(index) -> np.ndarray:
    return AFFINE[:3, :3] @ np.asarray(index, dtype=float) + AFFINE[:3, 3]


def _inputs() -> dict:
    """Tiny seeded volumes on an oblique (LAS-like) grid: an ellipsoid 'brain', a planted high-risk blob in GM."""
    rng = np.random.default_rng(0)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    brain = (((idx - (5.5, 6.5, 4.5)) / (5.0, 6.0, 4.0)) ** 2).sum(-1) <= 1
    truth = np.where(brain, 1.0 + 0.3 * np.sin(idx[..., 0]) * np.cos(idx[..., 1] / 2), 0.05)
    mean = truth + 0.02 * rng.standard_normal(SHAPE)
    risk = rng.uniform(0, 0.05, SHAPE)
    for v in BLOB:
        risk[v] = 0.6
    risk[5, 6, 4], risk[7, 8, 6] = 0.9, 0.4
    for v in [*PAIR, SINGLE]:
        risk[v] = 0.5
    gm = np.zeros(SHAPE)
    gm[3:9, 4:10, 2:8] = 0.9
    wm = np.where(brain & (gm == 0), 0.8, 0.0)
    lr_affine = AFFINE @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0.5], [0, 0, 0, 1]])  # 2 HR slices per LR
    vol = lambda a: Volume(np.asarray(a, dtype=np.float32), AFFINE)  # noqa: E731
    return {
        "lr": Volume(truth.reshape(12, 14, 5, 2).mean(-1).astype(np.float32), lr_affine), "mean": vol(mean),
        "std": vol(np.abs(rng.normal(0.05, 0.02, SHAPE))), "risk": vol(risk),
        "dc_residual": vol(np.abs(0.01 * rng.standard_normal(SHAPE))), "reference": vol(truth),
        "masks": {"GM": vol(gm), "WM": vol(wm)},
    }


CARD = {"operator": {"axis": 2, "thickness_mm": 2.0, "profile": "gaussian"}, "hr_spacing_mm": [1.0, 0.9, 1.1],
        "lr_spacing_mm": [1.0, 0.9, 2.2], "model": "runs/tiny/diffusion/model", "steps": 50, "samples": 8,
        "seeds": [0, 1, 2, 3, 4, 5, 6, 7], "calibration": "conformal, α = 0.1"}
METRICS = {"gen_sr": {"PSNR": 31.25, "SSIM": 0.912, "NRMSE": 0.081, "HFEN": 0.21},
           "trilinear": {"PSNR": 28.5, "SSIM": 0.87, "NRMSE": 0.11, "HFEN": 0.33},
           "cubic": {"PSNR": 29.0, "SSIM": 0.88, "NRMSE": 0.10, "HFEN": 0.30},
           "sinc": {"PSNR": 29.4, "SSIM": 0.89, "NRMSE": 0.095, "HFEN": math.nan}}
CURVE = {"nominal": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "observed": [0.46, 0.58, 0.71, 0.79, 0.88, 0.96],
         "alpha": 0.1, "lambda": 2.3}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("audit")
    inputs = _inputs()
    payload = build_report(out, **inputs, card=CARD, risk_threshold=THRESHOLD, calibrated=True, metrics=METRICS,
                           calibration_curve=CURVE, input_name="sub-01_T1w_lr.nii.gz", sr_axis=2)
    return out, payload, inputs


# ----------------------------------------------------------------------------------------------------- clusters
def test_risk_clusters_finds_the_planted_blob_in_world_coordinates() -> None:
    inputs = _inputs()
    clusters = risk_clusters(inputs["risk"], THRESHOLD, masks=inputs["masks"])
    assert [c["voxels"] for c in clusters] == [len(BLOB), 2, 1]  # 26-connected blob; equal peaks: larger first
    top = clusters[0]
    voxel_mm3 = abs(np.linalg.det(AFFINE[:3, :3]))
    np.testing.assert_allclose(top["centroid_mm"], _world(np.mean(BLOB, axis=0)), atol=1e-9)
    np.testing.assert_allclose(top["peak_mm"], _world((5, 6, 4)), atol=1e-9)
    assert top["size_mm3"] == pytest.approx(len(BLOB) * voxel_mm3)
    assert top["peak_risk"] == pytest.approx(0.9)
    assert top["mean_risk"] == pytest.approx((0.6 * 26 + 0.9 + 0.4) / 28)
    assert top["bbox"] == {"start": [4, 5, 3], "stop": [8, 9, 7]}
    assert top["tissue"] == "GM" and top["tissue_mean"]["GM"] == pytest.approx(0.9, abs=1e-6)
    assert [c["tissue"] for c in clusters[1:]] == [BACKGROUND, BACKGROUND]
    np.testing.assert_allclose(clusters[2]["centroid_mm"], _world(SINGLE), atol=1e-9)
    assert [c["rank"] for c in clusters] == [1, 2, 3]


def test_risk_clusters_options_and_orientation() -> None:
    inputs = _inputs()
    risk = inputs["risk"]
    assert [c["voxels"] for c in risk_clusters(risk, THRESHOLD, min_voxels=2)] == [len(BLOB), 2]
    assert len(risk_clusters(risk, THRESHOLD, top=1)) == 1
    assert risk_clusters(risk, 1.0) == []
    assert risk_clusters(risk, THRESHOLD)[0]["tissue"] is None  # no masks, no tissue
    # the same clusters, world positions and sizes from the RAS+ reoriented volume (masks left on the oblique grid)
    canon = risk_clusters(risk.canonical(), THRESHOLD, masks=inputs["masks"])
    for a, b in zip(risk_clusters(risk, THRESHOLD, masks=inputs["masks"]), canon, strict=True):
        np.testing.assert_allclose(a["centroid_mm"], b["centroid_mm"], atol=1e-9)
        assert (a["size_mm3"], a["voxels"], a["tissue"]) == pytest.approx((b["size_mm3"], b["voxels"], b["tissue"]))


def test_risk_peaks_are_local_maxima_kept_apart_in_mm() -> None:
    inputs = _inputs()
    risk, masks = inputs["risk"], inputs["masks"]
    # 1.2 mm apart: the blob's 0.9 (its 0.6 plateau is no maximum), one of the pair's two 0.5 voxels (0.9-1 mm
    # apart), the single voxel
    peaks = risk_peaks(risk, THRESHOLD, masks=masks, min_distance_mm=1.2)
    assert [(q["rank"], q["cluster"], q["tissue"]) for q in peaks] == [(1, 1, "GM"), (2, 2, BACKGROUND),
                                                                          (3, 3, BACKGROUND)]
    assert [q["risk"] for q in peaks] == pytest.approx([0.9, 0.5, 0.5])
    np.testing.assert_allclose([q["position_mm"] for q in peaks], [_world(v) for v in ((5, 6, 4), PAIR[0], SINGLE)],
                               atol=1e-9)
    assert len(risk_peaks(risk, THRESHOLD, min_distance_mm=0.5)) == 4  # both voxels of the pair
    (only,) = risk_peaks(risk, THRESHOLD, min_distance_mm=100.0)
    assert only["cluster"] == 1 and only["tissue"] is None  # no masks, no tissue
    assert len(risk_peaks(risk, THRESHOLD, min_distance_mm=0.5, top=2)) == 2
    assert risk_peaks(risk, 1.0) == []


# ----------------------------------------------------------------------------------------------------- report
def test_report_is_self_contained_and_json_matches(full_report) -> None:
    out, payload, inputs = full_report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # no temporary file left
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page.lower()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == page.count("<img") == len(payload["figures"]) == 9  # 7 view rows, profile, calibration
    assert "url(" not in page and "@import" not in page and "@font-face" not in page

    text = (out / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == payload
    assert payload["metrics"]["sinc"]["HFEN"] is None and payload["metrics"]["gen_sr"] == METRICS["gen_sr"]
    assert payload["card"]["seeds"] == CARD["seeds"] and payload["calibration_curve"] == CURVE

    # the verdict, counted independently: flagged voxels inside the brain (GM + WM ≥ 0.5)
    fg = (inputs["masks"]["GM"].data + inputs["masks"]["WM"].data) >= 0.5
    flagged = (inputs["risk"].data > THRESHOLD) & fg
    v = payload["verdict"]
    assert v["flagged_voxels"] == flagged.sum() == len(BLOB)
    assert v["flagged_percent"] == pytest.approx(100 * flagged.sum() / fg.sum())
    assert v["n_clusters"] == 3 and v["largest_cluster"]["voxels"] == len(BLOB)
    assert payload["views"]["centred_on"] == "the peak of the highest-risk cluster"
    assert f"{v['flagged_percent']:.1f} % of the brain flagged high-risk (risk &gt; 0.3, calibrated)" in page
    assert "not for diagnosis" in page
    top = payload["clusters"][0]
    np.testing.assert_allclose(top["centroid_mm"], _world(np.mean(BLOB, axis=0)), atol=1e-9)
    np.testing.assert_allclose(payload["views"]["centre_mm"], _world((5, 6, 4)), atol=1e-6)  # nearest voxel
    assert "".join(f'<td class="n">{x:.1f}</td>' for x in top["centroid_mm"]) in page
    assert "<td>({})</td>".format(", ".join(f"{x:.1f}" for x in top["peak_mm"])) in page
    assert [q["cluster"] for q in payload["peaks"]] == [1]  # the pair and the single voxel lie within 10 mm of it
    assert "<h2>Highest-risk places</h2>" in page
    assert "".join(f'<td class="n">{x:.1f}</td>' for x in payload["peaks"][0]["position_mm"]) in page

    profile = payload["profile"]
    assert len(profile["mean_risk"]) == len(profile["flagged_fraction"]) == SHAPE[2]
    k = 4  # slice 4 along axis 2 holds 9 blob voxels inside the brain
    assert profile["flagged_fraction"][k] == pytest.approx(9 / fg[:, :, k].sum())
    for cell in ('<th class="n">PSNR [dB]</th>', '<td class="n"><b>31.25</b></td>', '<td class="n"><b>0.081</b></td>',
                 '<td class="n">—</td>'):
        assert cell in page  # units, best value per column in bold, NaN as a dash
    assert "<td>lambda</td><td class=\"n\">2.3</td>" in page and "<td class=\"n\">0.46</td>" in page


def test_user_strings_are_escaped(tmp_path) -> None:
    inputs = _inputs()
    masks = {"<b>GM</b>": inputs["masks"]["GM"], "WM": inputs["masks"]["WM"]}
    name = "<script>alert(1)</script>.nii.gz"
    payload = build_report(tmp_path, lr=inputs["lr"], mean=inputs["mean"], std=inputs["std"], risk=inputs["risk"],
                           dc_residual=inputs["dc_residual"], card={"operator": "<img src=x onerror=alert(1)>",
                           "<i>model</i>": "a & b"}, risk_threshold=THRESHOLD, calibrated=False, masks=masks,
                           metrics={"<em>m</em>": {"<u>PSNR</u>": 1.0}}, input_name=name, sr_axis=0)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>GM" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;.nii.gz") == 2  # title and heading
    for escaped in ("&lt;img src=x onerror=alert(1)&gt;", "&lt;i&gt;model&lt;/i&gt;", "a &amp; b",
                    "&lt;b&gt;GM&lt;/b&gt;", "&lt;em&gt;m&lt;/em&gt;", "&lt;u&gt;PSNR&lt;/u&gt;"):
        assert escaped in page
    assert payload["input_name"] == name and payload["clusters"][0]["tissue"] == "<b>GM</b>"
    assert "uncalibrated" in payload["verdict"]["text"] and len(payload["profile"]["slice"]) == SHAPE[0]
    assert page.count("<img") == len(payload["figures"]) == 6  # 5 view rows and the profile


def test_report_without_clusters_or_masks(tmp_path) -> None:
    inputs = _inputs()
    payload = build_report(tmp_path / "new" / "dir", lr=inputs["lr"], mean=inputs["mean"], std=inputs["std"],
                           risk=inputs["risk"], dc_residual=inputs["dc_residual"], card={}, risk_threshold=2.0,
                           calibrated=False, input_name="x.nii.gz", sr_axis=1)
    assert payload["clusters"] == [] and payload["verdict"]["flagged_voxels"] == 0
    assert payload["verdict"]["text"].startswith("0.0 % of the foreground flagged high-risk")
    assert payload["views"]["centred_on"] == "the volume centre"
    assert 'class="verdict ok"' in (tmp_path / "new" / "dir" / "report.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------- browser
def _chromium() -> tuple[str | None, str | None]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).is_file()), None)
    return browser, driver


def test_report_renders_in_headless_chromium(full_report, tmp_path) -> None:
    browser, driver_path = _chromium()
    if browser is None or driver_path is None:
        pytest.skip(f"headless browser check needs Chromium and chromedriver (found browser={browser}, "
                    f"driver={driver_path}); on Debian: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out, payload, _ = full_report
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get((out / "report.html").as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        assert driver.title == "Hallucination audit: sub-01_T1w_lr.nii.gz"
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight, i.currentSrc])")
        assert driver.execute_script("return document.scripts.length") == 0
        assert payload["verdict"]["text"] in driver.execute_script("return document.body.innerText")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, height)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        console = driver.get_log("browser")
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    finally:
        driver.quit()

    assert [e for e in console if e["level"] == "SEVERE"] == []
    assert len(images) == len(payload["figures"]) == 9
    for complete, width, img_height, src in images:
        assert complete and width > 0 and img_height > 0 and src.startswith("data:image/png;base64,")
    sent = [m["params"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert not [p["request"]["url"] for p in sent if p["request"]["url"].startswith(("http", "ws"))]
    ours = [p["request"]["url"] for p in sent if p.get("documentURL") == (out / "report.html").as_uri()]
    assert ours and all(u.split(":", 1)[0] in ("file", "data") for u in ours), ours  # the page loads only itself
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= 2000 and pixels.std() > 10  # a long, non-blank page
