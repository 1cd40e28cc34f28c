"""The hallucination-audit report: clusters at the right world position and size, a self-contained and escaped HTML
page, a JSON twin with the same figures, and a real render in headless Chromium (Debian's chromium and
chromium-driver; see .ci/install_chromium.sh)."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import typing
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from helpers import oblique_affine
from markupsafe import escape
from PIL import Image

from gen_sr.audit import figures
from gen_sr.audit.clusters import PeakRule, ranked_peaks
from gen_sr.audit.page import card_rows
from gen_sr.audit.report import BACKGROUND, build_report, risk_clusters, risk_peaks
from gen_sr.audit.summary import coords, flag_meaning, grouped
from gen_sr.model_card import Adaptation
from gen_sr.risk import (
    MISMATCH_WORDING,
    Calibration,
    IntervalShape,
    Mismatch,
    SamplingSettings,
    mismatch_text,
    risk_map,
)
from gen_sr.run_record import describe_risk
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
    payload = build_report(out, **inputs, card=CARD, risk_threshold=THRESHOLD, calibration=CALIBRATED,
                           calibration_mismatch=None, metrics=METRICS, calibration_curve=CURVE,
                           input_name="sub-01_T1w_lr.nii.gz", sr_axis=2)
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
    assert v["n_clusters"] == 1 and v["largest_cluster"]["voxels"] == len(BLOB)  # the two others lie outside it
    assert len(payload["clusters"]) == payload["n_clusters"] == 3  # the clusters table is the whole volume's
    assert ("3 connected component(s) (26-connectivity) of risk &gt; 0.3 over the whole volume; 1 cluster(s) when only "
            "the flagged voxels inside the brain are counted (the verdict's largest cluster is one of them);"
            in " ".join(page.split()))  # a count of clusters, not of voxels
    assert payload["views"]["centred_on"] == "the peak of the highest-risk cluster"
    assert f"{v['flagged_percent']:.1f} % of the brain flagged high-risk (risk &gt; 0.3, calibrated)" in page
    assert "not for diagnosis" in page
    assert "HFEN: the NRMSE of Laplacian-of-Gaussian filtered images" in page  # each column said
    assert "spearman: rank correlation" not in page  # a column the table does not have
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
    assert "\x00" not in page and "Input outside the trained regime" not in page  # not checked: no box
    assert payload["outside_training"] is None and payload["peak_rule"]["fallback"] is False
    assert payload["views"]["rule"] == payload["peak_rule"]["text"] and payload["peak_rule"]["text"] in page
    assert "scanner (world) coordinates in mm, RAS+" in page


def test_user_strings_are_escaped(tmp_path) -> None:
    inputs = _inputs()
    masks = {"<b>GM</b>": inputs["masks"]["GM"], "WM": inputs["masks"]["WM"]}
    name = "<script>alert(1)</script>.nii.gz"
    payload = build_report(tmp_path, lr=inputs["lr"], mean=inputs["mean"], std=inputs["std"], risk=inputs["risk"],
                           dc_residual=inputs["dc_residual"], card={"operator": "<img src=x onerror=alert(1)>",
                           "<i>model</i>": "a & b"}, risk_threshold=THRESHOLD, calibration=None,
                           calibration_mismatch=None, masks=masks,
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
                           calibration=None, calibration_mismatch=None, input_name="x.nii.gz", sr_axis=1)
    assert payload["clusters"] == [] and payload["verdict"]["flagged_voxels"] == 0
    assert payload["verdict"]["text"].startswith("0.0 % of the foreground flagged high-risk")
    assert payload["views"]["centred_on"] == "the volume centre"
    assert 'class="verdict ok"' in (tmp_path / "new" / "dir" / "report.html").read_text(encoding="utf-8")



def test_without_a_brain_mask_or_tissue_maps_the_texts_say_foreground_not_brain(tmp_path) -> None:
    """With no brain mask or tissue maps the verdict counts the SR mean's foreground (the head, scalp and skull too):
    every text names it so; a brain mask makes it the brain."""
    inputs = _inputs()
    common = {k: inputs[k] for k in ("lr", "mean", "std", "risk", "dc_residual", "reference")}
    payload = build_report(tmp_path / "fg", **common, card={}, risk_threshold=THRESHOLD, calibration=CALIBRATED,
                           calibration_mismatch=None, intensity_range=1.0, input_name="x", sr_axis=2)
    v = payload["verdict"]
    page = " ".join((tmp_path / "fg" / "report.html").read_text(encoding="utf-8").split())
    assert v["region"] == "foreground" and v["foreground"].startswith("foreground (SR mean above")
    assert v["text"].startswith(f"{v['flagged_percent']:.1f} % of the foreground flagged") and v["flagged_voxels"] > 0
    assert "% of the foreground) can be off by" in v["meaning"]
    assert "unflagged voxels of the foreground" in v["observed"]
    assert "inside the foreground are counted" in page and "inside the foreground, more than" in page
    assert "brain" not in page and "brain" not in json.dumps(payload)
    brain = inputs["masks"]["GM"].with_data((inputs["masks"]["GM"].data + inputs["masks"]["WM"].data >= 0.5)
                                            .astype(np.float32))
    masked = build_report(tmp_path / "brain", **common, brain_mask=brain, card={}, risk_threshold=THRESHOLD,
                          calibration=CALIBRATED, calibration_mismatch=None, intensity_range=1.0, input_name="x",
                          sr_axis=2)
    assert masked["verdict"]["region"] == "brain" and "% of the brain flagged" in masked["verdict"]["text"]
    assert "inside the brain mask, more than" in masked["peak_rule"]["text"]


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


# ----------------------------------------------------------------------------------------------------- peak rule
def _planted(shape=(40, 40, 30)) -> tuple[Volume, np.ndarray, dict[str, tuple[int, int, int]]]:
    """A 1 mm grid with a brain ellipsoid and three planted maxima: the highest at the edge of the field of view,
    the next on the brain's rim, the lowest deep inside."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    brain = (((idx - (19.5, 19.5, 14.5)) / (15.0, 15.0, 11.0)) ** 2).sum(-1) <= 1
    at = {"border": (0, 20, 15), "rim": (20, 20, 25), "deep": (14, 22, 12)}
    risk = np.full(shape, 0.01)
    for v, value in zip(at.values(), (0.9, 0.8, 0.5), strict=True):
        risk[v] = value
    assert brain[at["rim"]] and not brain[20, 20, 26] and brain[at["deep"]] and not brain[at["border"]]
    return Volume(risk.astype(np.float32), np.eye(4)), brain, at


def test_peak_rule_keeps_peaks_off_the_field_of_view_edge_and_the_brain_rim() -> None:
    risk, brain, at = _planted()
    rule = PeakRule(border_voxels=2, rim_mm=3.0)
    allowed = rule.allowed(brain, (1.0, 1.0, 1.0))
    assert not allowed[at["border"]] and not allowed[at["rim"]] and allowed[at["deep"]]
    assert not allowed[2, 2, 2] and not allowed[1, 20, 15]  # background far from the brain, the edge
    assert not allowed[20, 20, 23] and allowed[20, 20, 22]  # 2.5 mm and 3.5 mm inside the rim (boundary at 25.5)
    whole = PeakRule(border_voxels=2, rim_mm=3.0).allowed(np.ones_like(brain), (1.0, 1.0, 1.0))
    assert whole[2, 2, 2] and not whole[1, 2, 2]  # no foreground boundary: only the edge of the field of view
    slab = rule.allowed(np.ones((20, 4, 20), bool), (1.0, 1.0, 1.0))  # 4 voxels thick, as the demo's slab
    assert slab[10, 0, 10] and slab[10, 3, 10] and not slab[1, 2, 10]  # cut faces qualify, the in-plane edge not
    assert [q["risk"] for q in risk_peaks(risk, 0.3)] == pytest.approx([0.9, 0.8, 0.5])  # unrestricted
    peaks, record = ranked_peaks(risk, 0.3, brain, rule, "brain mask")
    assert [q["position_mm"] for q in peaks] == [list(map(float, at["deep"]))]
    assert record["fallback"] is False and record["max_qualifies"] is False and record["max_risk"] == pytest.approx(0.9)
    assert record["max_at_mm"] == list(map(float, at["border"]))
    assert record["text"].startswith("ranked only among voxels inside the brain mask, more than 3 mm from its "
                                     "boundary, and at least 2 voxel(s) inside the edge of the field of view")
    # nothing qualifies above the threshold: the unrestricted maxima
    peaks, record = ranked_peaks(risk, 0.6, brain, rule, "brain mask")
    assert record["fallback"] is True and [q["risk"] for q in peaks] == pytest.approx([0.9, 0.8])
    # without the distances, every maximum inside the brain qualifies (the rim's), the one outside still does not
    peaks, record = ranked_peaks(risk, 0.3, brain, PeakRule(border_voxels=0, rim_mm=0), "brain mask")
    assert [q["risk"] for q in peaks] == pytest.approx([0.8, 0.5]) and record["max_qualifies"] is False


def test_views_follow_the_peak_rule_and_say_so(tmp_path) -> None:
    risk, brain, at = _planted((40, 40, 30))
    vol = lambda a: Volume(np.asarray(a, dtype=np.float32), risk.affine)  # noqa: E731
    mean = vol(np.where(brain, 1.0, 0.0))
    payload = build_report(tmp_path, lr=mean, mean=mean, std=vol(risk.data / 2), risk=risk,
                           dc_residual=vol(0 * brain), card={}, risk_threshold=0.3, calibration=None,
                           calibration_mismatch=None,
                           masks={"GM": vol(brain)}, input_name="x", sr_axis=2)
    page = " ".join((tmp_path / "report.html").read_text(encoding="utf-8").split())
    assert payload["clusters"][0]["peak_mm"] == list(map(float, at["border"]))  # cluster #1 is the edge voxel
    np.testing.assert_allclose(payload["views"]["centre_mm"], at["deep"])  # the views are not centred on it
    assert payload["views"]["centred_on"] == "the first of the highest-risk places (risk 0.5, in cluster #3)"
    assert [q["cluster"] for q in payload["peaks"]] == [3]
    assert "The map's overall maximum, risk 0.9 at (0.0, 20.0, 15.0) mm, lies in the excluded zone." in page
    # the verdict names the place the views point at, not a cluster's peak in the excluded zone
    deep = "({})".format(", ".join(f"{x:.1f}" for x in at["deep"]))
    assert payload["verdict"]["text"].endswith(f"highest-risk place away from the brain's rim at {deep} mm")
    assert "({})".format(", ".join(f"{x:.1f}" for x in at["border"])) not in payload["verdict"]["text"]
    assert "The input is not oblique" in page and payload["geometry"]["oblique"] is False
    assert coords(at["rim"]) not in payload["verdict"]["text"]  # the brain's largest cluster's peak, on its rim
    # where nothing qualifies under the rule, the headline says the place was ranked over the whole volume
    whole = build_report(tmp_path / "whole", lr=mean, mean=mean, std=vol(risk.data / 2), risk=risk,
                         dc_residual=vol(0 * brain), card={}, risk_threshold=0.6, calibration=None,
                         calibration_mismatch=None, masks={"GM": vol(brain)}, input_name="x", sr_axis=2)
    assert whole["peak_rule"]["fallback"] and whole["verdict"]["text"].endswith(
        f"; highest-risk place over the whole volume at {coords(at['border'])} mm")


# ----------------------------------------------------------------------------------------------------- wording
CALIBRATION = {"scale": 0.4525472352276444, "alpha": 0.1, "delta": 0.1, "method": "crc", "bound": "hb",
               "num_volumes": 96, "risk_hat": 0.0902, "risk_upper": 0.1636,
               "details": {"data": ["runs/subjects/calibration"], "units": 96, "volumes": [f"s{i}" for i in range(8)]},
               "shape": {"smoothing": 1.0, "noise_floor": 0.0, "edge_weight": 3.2}}
CALIBRATED = Calibration(**CALIBRATION)
AUDIT_CARD = {"input": "sub-01_T1w_lr.nii.gz", "model": "models/heads2d",
              "operator": "axis 2: 4 mm slices every 4 mm, gaussian profile", "lr_spacing_mm": [1.0, 0.9, 2.2],
              "sr_spacing_mm": [1.0, 0.9, 1.1], "sampler": "DPMSolverDataConsistencyScheduler(trailing)", "steps": 50,
              "samples": 8, "seeds": list(range(8)),
              "guidance": "projection", "noise_std": 0.03, "relative_residual_max": 0.0021,
              "calibration": CALIBRATION, "interval": "mean ± 0.4525 × (std smoothed over 1 voxel + 3.2 × |∇ mean|)",
              "risk": {"calibrated": True, "holds": True, "mismatch": None, "scale": 0.4525, "alpha": 0.1,
                       "definition": "the half-width ..."},
              "timings_s": {"prepare_s": 2.2, "denoise_s": 180.4, "decode_s": 10.1, "stitch_uncertainty_s": 0.41}}


def test_card_rows_are_short_and_labelled() -> None:
    rows = dict(card_rows(AUDIT_CARD))
    assert rows["Calibration"] == ("conformal risk control (crc), α = 0.1 (coverage 90 %), from 96 units of 8 volumes; "
                                   "miss rate on the calibration data 0.090")
    unknown = dict(card_rows({**AUDIT_CARD, "noise_std": 0.0, "noise_std_estimated": True}))
    assert unknown["Measurement noise std"].startswith("not known: the scan has no background air")
    assert "Noise std" not in unknown  # one row says it: not known, the slices fitted exactly
    counted = card_rows({**AUDIT_CARD, "noise_std": 0.0, "noise_std_estimated": True, "noise_std_in_plane": 0.02})
    said = dict(counted)["Measurement noise std"]
    assert "the calibrated interval counts the noise read in-plane from its slices (0.02)" in said
    assert [label for label, _ in counted].count("Measurement noise std") == 1 and "Noise std" not in dict(counted)
    assert "noise_std_in_plane" not in dict(counted) and "under-covers" in unknown["Measurement noise std"]
    assert dict(card_rows({**AUDIT_CARD, "noise_std_estimated": True}))["Noise std"].startswith("read from the scan's")
    per_grid = dict(card_rows({**AUDIT_CARD, "calibration": {**CALIBRATION, "grid_spacing": 1.5}}))["Calibration"]
    assert "from 96 units of 8 volumes (the record for 1.5 mm grids); miss" in per_grid
    per_mm = {**CALIBRATION, "grid_spacing": 1.5, "scale_per_mm": 3.16, "scale": 4.74, "fitted_grids": [1.0, 1.5]}
    per_mm = dict(card_rows({**AUDIT_CARD, "calibration": per_mm}))["Calibration"]
    assert ("8 volumes (one scale per mm of the output voxel size, fitted on 1-1.5 mm grids together: 3.16 per mm, "
            "4.74 on this run's 1.5 mm grid); miss") in per_mm
    no_grid = {**CALIBRATION, "scale_per_mm": 3.16, "scale": 3.16}  # a run record without its grid
    no_grid = dict(card_rows({**AUDIT_CARD, "calibration": no_grid}))["Calibration"]
    assert "one scale per mm of the output voxel size, fitted on every grid together: 3.16 per mm); miss" in no_grid
    assert rows["Interval"] == "mean ± 0.4525 × (std smoothed over 1 voxel + 3.2 × |∇ mean|)"
    # the sampler in words, with its steps (report.json keeps its recorded name)
    assert rows["Sampler"] == "DPM-Solver++, 50 steps, trailing spacing" and "Sampler steps" not in rows
    assert not any("DataConsistencyScheduler" in v for v in rows.values())
    sde = {**AUDIT_CARD, "sampler": "DPMSolverDataConsistencyScheduler(sde-dpmsolver++, linspace)", "steps": 1}
    assert dict(card_rows(sde))["Sampler"] == "SDE-DPM-Solver++, 1 step, linspace spacing"
    assert dict(card_rows({**AUDIT_CARD, "sampler": "DDIMDataConsistencyScheduler"}))["Sampler"] == "DDIM, 50 steps"
    other = dict(card_rows({**AUDIT_CARD, "sampler": "EulerDiscreteScheduler", "steps": None}))
    assert other["Sampler"] == "EulerDiscreteScheduler" and other["Sampler steps"] == "—"
    assert rows["Timings"] == "prepare 2.2 s, denoise 180 s, decode 10 s, stitch uncertainty 0.41 s"
    adapted = {"adapt_s": 95.2, "calibrate_s": 40.3, "compare_s": 38.9, **AUDIT_CARD["timings_s"]}
    assert dict(card_rows({**AUDIT_CARD, "timings_s": adapted}))["Timings"] == (
        "adaptation: adapt 95 s, compare with the pretrained UNet 39 s, calibrate on the scan 40 s; sampling: prepare "
        "2.2 s, denoise 180 s, decode 10 s, stitch uncertainty 0.41 s")
    assert rows["Risk"] == "the calibrated interval's half-width ÷ the input's robust intensity range"
    assert rows["LR voxel spacing"] == "1 × 0.9 × 2.2 mm" and rows["Seeds"] == "0, 1, 2, …, 7 (8 seeds)"
    seeds = dict(card_rows({**AUDIT_CARD, "seeds": [818103936, 1180039872]}))["Seeds"]
    assert seeds == "818103936, 1180039872"  # whole numbers, to run it again
    assert rows["Measurement noise std"] == "0.03 (input intensity units)"
    assert not any("{" in v or "runs/" in v for v in rows.values())
    assert dict(card_rows({"calibration": "none (uncalibrated)", "interval": "none (uncalibrated)",
                           "x": {"a": 1, "b": [1, 2]}})) == {"Calibration": "none (uncalibrated)",
                                                             "Interval": "none (uncalibrated)", "x": "a: 1; b: 1, 2"}
    assert [grouped(v) for v in (37968.4, 123.0, 27.71, 0.5)] == ["37,968", "123", "27.7", "0.5"]
    # an adaptation record, as report.json holds it: the model card's line; a record it cannot read, as it stands
    adapted = Adaptation(source="lr.nii.gz", held_out_slices=[3, 8], steps=200, seconds=95.0,
                         heldout_loss=(0.2, 0.17), heldout_rmse=(3.0, 2.5), heldout_reference="noisy")
    row = dict(card_rows({"adaptation": json.loads(json.dumps(asdict(adapted)))}))["Adaptation"]
    assert row == " ".join(adapted.describe()) and row.startswith("adapted on lr.nii.gz (200 steps, 95 s")
    assert dict(card_rows({"adaptation": {"steps": "many"}}))["Adaptation"] == "steps: many"


def test_colour_bars_name_their_units(monkeypatch) -> None:
    labels = {}
    monkeypatch.setattr(figures, "view_row", lambda volume, centre, layers, label, contour=None: labels.setdefault(
        len(labels), label))
    inputs = _inputs()
    maps = {k: inputs[k].canonical() for k in ("mean", "std", "risk", "reference")}
    maps |= {"lr": maps["mean"], "dc": inputs["dc_residual"].canonical()}
    figures.orthogonal_views(maps, np.array([5, 6, 4]), THRESHOLD)
    assert len(labels) == 7 and all(figures.INTENSITY_UNIT in v for k, v in labels.items() if k != 3)
    assert figures.RISK_UNIT in labels[3].replace("\n", " ")
    assert figures.RISK_UNIT == "fraction of the input's robust intensity range"
    # a colour bar shows where the map runs past its scale (a risk peak of 0.5 on a scale that ends at 0.3)
    risk = np.array([0.0, 0.1, 0.5])
    assert figures.saturated(risk, {"vmin": 0, "vmax": 0.3}) == "max"
    assert figures.saturated(risk, {"vmin": 0, "vmax": 0.5}) == "neither" and figures.saturated(risk, {}) == "neither"
    assert figures.saturated(risk - 0.2, {"vmin": 0, "vmax": 0.2}) == "both"


def _per_scan(noise_known: bool) -> Calibration:
    """A per-scan record as :func:`gen_sr.eval.scan_calibration.calibrate_on_scan` writes it: 9 of the 11 held-out
    slices with foreground (2 directions, 4 blocks each), for runs whose noise std is known or not."""
    details = {"per_scan": True, "assumption": "per-scan: ...", "held_out_slices": [2, 7, 12, 17, 22, 27, 32, 37, 42,
                                                                                   47, 52],
               "slices_with_foreground": [7, 12, 17, 22, 27, 32, 37, 42, 47], "units": 72, "blocks_per_volume": 4,
               "volumes": [f"slice {k} degraded along {a}" for k in range(7, 48, 5) for a in "RS"]}
    if noise_known:
        details["measured_coverage"] = [0.84, 0.96]
    return Calibration(scale=2.72, alpha=0.1, delta=0.1, method="crc", bound="", num_volumes=72, risk_hat=0.087,
                       risk_upper=(72 * 0.087 + 1) / 73, details=details,
                       shape=IntervalShape() if noise_known else IntervalShape(noise_floor=0.5),
                       sampling=SamplingSettings("DPMSolverDataConsistencyScheduler(trailing)", 3, 8,
                                                 noise_known=noise_known))


def test_a_per_scan_calibrations_summary_says_what_it_was_fitted_on_assumes_and_measured(tmp_path) -> None:
    """After ``audit --adapt``: the summary (risk note, flag meaning) and the card's calibration row say the scale was
    fitted on this scan's own held-out in-plane slices (how many of how many), the assumption that carries it
    through-plane, and the coverage measured for such calibrations, or, for one made for runs whose noise std is not
    known, that it was not measured: one wording, shared. The card has one row for a noise std not known."""
    inputs = _inputs()
    said = {}
    for known in (False, True):
        cal = _per_scan(known)
        card = {**AUDIT_CARD, "noise_std": 0.03 if known else 0.0, "noise_std_estimated": not known,
                "noise_std_in_plane": None if known else 2.24, "calibration": json.loads(json.dumps(asdict(cal))),
                "interval": cal.describe()}
        payload = build_report(tmp_path / str(known), **inputs, card=card, risk_threshold=THRESHOLD, calibration=cal,
                               calibration_mismatch=None, input_name="t2_lr.nii.gz", sr_axis=2, intensity_range=0.5)
        rows, v = card_rows(payload["card"]), payload["verdict"]
        page = " ".join((tmp_path / str(known) / "report.html").read_text(encoding="utf-8").split())
        basis = ("fitted on 9 (of 11; the others hold no foreground) held-out in-plane slices of the scan the model "
                 "was adapted on, degraded along each in-plane axis with its slices; it assumes the scan's statistics "
                 "in-plane and through-plane are alike")
        assert v["risk_note"].startswith(f"Calibrated: the risk scale comes from the model's per-scan calibration "
                                         f"(card), {basis}; ")
        calibration = dict(rows)["Calibration"]
        assert f"Per-scan: {basis}" in calibration and "from 72 units of 18 volumes" in calibration
        assert "inputs like the calibration data" not in v["meaning"]
        assert ("(calibrated on this scan's own held-out in-plane slices, it is a guarantee on average over in-plane "
                "problems like theirs, and holds through-plane as far as the scan's statistics in-plane and "
                "through-plane are alike; ") in v["meaning"]
        assert str(escape(v["risk_note"])) in page and str(escape(v["meaning"])) in page
        said[known] = v["risk_note"] + v["meaning"] + calibration
        noise = [value for label, value in rows if "noise std" in label.lower()]  # one row says it is not known
        if not known:
            assert len(noise) == 1 and noise[0].startswith("not known: the scan has no background")
    measured = "the per-scan 90 % interval covered 84-96 % of voxels through-plane"
    not_measured = "coverage through-plane was not measured for scans whose noise std is not known"
    assert said[True].count(measured) == 3 and not_measured not in said[True]
    assert said[False].count(not_measured) == 3 and "covered" not in said[False]
    # a record made before the slices with foreground were recorded claims none of them
    older = replace(_per_scan(True), details={k: v for k, v in _per_scan(True).details.items()
                                              if k != "slices_with_foreground"})
    assert "fitted on the held-out in-plane slices with foreground (11 held out) of the scan" in dict(card_rows(
        {"calibration": json.loads(json.dumps(asdict(older)))}))["Calibration"]


def test_report_says_what_a_flag_means_and_warns(tmp_path) -> None:
    inputs = _inputs()
    outside = ["slice thickness 8 mm along S is outside the trained 2-6 mm"]
    payload = build_report(tmp_path, **inputs, card=AUDIT_CARD, risk_threshold=THRESHOLD, calibration=CALIBRATED,
                           calibration_mismatch=None,
                           input_name="sub-01_T1w_lr.nii.gz", sr_axis=2, intensity_range=0.5,
                           outside_training=outside)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    v = payload["verdict"]
    fg = (inputs["masks"]["GM"].data + inputs["masks"]["WM"].data) >= 0.5
    flagged = (inputs["risk"].data > THRESHOLD) & fg
    bound = 100 * 0.1 / (1 - flagged.sum() / fg.sum())
    assert v["error_size"] == pytest.approx(0.15) and v["unflagged_miss_bound_percent"] == pytest.approx(bound)
    sentence = ("Where flagged, the truth may differ from the shown intensity by more than 0.15 input intensity units "
                "(the threshold 0.3 × the input's robust intensity range 0.5): there the calibrated 90 % interval is "
                "wider than ±0.15, so an error of that size cannot be ruled out.")
    assert v["meaning"].startswith(sentence) and sentence.replace("'", "&#39;") in page
    assert f"at most {bound:.3g} % of the unflagged voxels" in v["meaning"]
    off = np.abs(inputs["mean"].data - inputs["reference"].data) > 0.15
    assert v["observed_exceedance"]["flagged_percent"] == pytest.approx(100 * off[flagged].mean())
    assert v["observed_exceedance"]["unflagged_percent"] == pytest.approx(100 * off[fg & ~flagged].mean())
    assert v["observed"] in page
    # outside the trained regime: a warning box, and the list in report.json
    assert payload["outside_training"] == outside and json.loads((tmp_path / "report.json").read_text())[
        "outside_training"] == outside
    assert '<div class="warning"><b>Input outside the trained regime</b>' in page and f"<li>{outside[0]}</li>" in page
    # oblique input: said, with the angle
    from nibabel.affines import obliquity
    worst = float(np.degrees(obliquity(inputs["lr"].affine)).max())
    assert payload["geometry"]["oblique"] and payload["geometry"]["max_obliquity_deg"] == pytest.approx(worst)
    assert f"The input is oblique: its voxel axes are rotated by up to {worst:.1f}° from the scanner axes" in page
    # the card is readable on the page and complete in report.json
    assert "conformal risk control (crc), α = 0.1" in page and "|∇ mean|" in page and "runs/subjects" not in page
    assert payload["card"]["calibration"]["details"]["data"] == ["runs/subjects/calibration"]
    assert "&#34;" not in page and "\x00" not in page


def test_uncalibrated_flags_promise_no_coverage(tmp_path) -> None:
    inputs = _inputs()
    payload = build_report(tmp_path, **{k: inputs[k] for k in ("lr", "mean", "std", "risk", "dc_residual")},
                           card={}, risk_threshold=THRESHOLD, calibration=None, calibration_mismatch=None,
                           input_name="x", sr_axis=2,
                           intensity_range=2.0, outside_training=[])
    v = payload["verdict"]
    assert v["meaning"].startswith("Where flagged, the samples' standard deviation exceeds 0.6 input intensity units")
    assert "no flagged fraction is expected" in v["meaning"] and v["unflagged_miss_bound_percent"] is None
    assert v["observed"] is None and payload["outside_training"] == []
    assert "Input outside the trained regime" not in (tmp_path / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("mismatch", ["settings", "grid", "scan", "noise_unknown", "noise_known"])
def test_a_calibration_not_made_for_the_run_says_why_and_promises_no_coverage(tmp_path, mismatch) -> None:
    """A run whose calibration was made for other settings, another grid, another scan (per-scan) or a known noise std
    keeps its scale without its coverage: the verdict's label, the risk note and the card's risk row each say which,
    in the one wording of gen_sr.risk, and no bound is given."""
    inputs = _inputs()
    cal = Calibration(**CALIBRATION)
    payload = build_report(tmp_path, **{k: inputs[k] for k in ("lr", "mean", "std", "risk", "dc_residual")},
                           card={"risk": describe_risk(cal, mismatch, calibration_region=False).to_dict()},
                           risk_threshold=THRESHOLD, calibration=cal, calibration_mismatch=mismatch, input_name="x",
                           sr_axis=2, intensity_range=2.0, outside_training=[])
    v, wording = payload["verdict"], MISMATCH_WORDING[mismatch]
    assert f"calibrated {wording.label})" in v["text"] and v["unflagged_miss_bound_percent"] is None
    assert v["risk_note"].startswith(f"Calibrated {wording.label}: ") and mismatch_text(mismatch) in v["risk_note"]
    assert not payload["calibration_holds"] and payload["calibration_mismatch"] == mismatch
    page = " ".join((tmp_path / "report.html").read_text(encoding="utf-8").split())
    assert str(escape(mismatch_text(mismatch))) in page and wording.advice in mismatch_text(mismatch)
    others = [w for k, w in MISMATCH_WORDING.items() if k != mismatch]
    assert not any(str(escape(w.made_for)) in page for w in others)  # only this run's reason
    held = build_report(tmp_path / "held", **{k: inputs[k] for k in ("lr", "mean", "std", "risk", "dc_residual")},
                        card={"risk": describe_risk(cal, None, calibration_region=False).to_dict()},
                        risk_threshold=THRESHOLD, calibration=cal, calibration_mismatch=None, input_name="x", sr_axis=2,
                        intensity_range=2.0, outside_training=[])
    assert "calibrated)" in held["verdict"]["text"] and held["verdict"]["unflagged_miss_bound_percent"] is not None
    assert held["calibration_holds"] and "coverage does not hold" not in (tmp_path / "held" / "report.html").read_text()
    assert "on average over inputs like the calibration data" in held["verdict"]["meaning"]
    assert held["verdict"]["risk_note"] == "Calibrated: the risk scale comes from the model's calibration (card)."


def test_a_per_scan_calibration_is_said_to_be_made_on_the_scan() -> None:
    """The verdict's risk note and the flag's meaning say where a per-scan calibration was made and on what
    assumption, not "the model's calibration" and "inputs like the calibration data" (a walkthrough's report)."""
    inputs = _inputs()
    cal = Calibration(**{**CALIBRATION, "details": {**CALIBRATION["details"], "per_scan": True}})
    for mismatch in (None, "scan"):
        with tempfile.TemporaryDirectory() as folder:
            v = build_report(Path(folder), **{k: inputs[k] for k in ("lr", "mean", "std", "risk", "dc_residual")},
                             card={"risk": describe_risk(cal, mismatch, calibration_region=False).to_dict()},
                             risk_threshold=THRESHOLD, calibration=cal, calibration_mismatch=mismatch, input_name="x",
                             sr_axis=2, intensity_range=2.0, outside_training=[])["verdict"]
        where = ("per-scan calibration (card), fitted on held-out in-plane slices of the scan" if mismatch is None
                 else "per-scan calibration, on held-out in-plane slices of the scan it was adapted on")
        assert where in v["risk_note"] and "model's calibration (card)" not in v["risk_note"]
        assert ("this scan's own held-out in-plane slices" in v["meaning"]) == (mismatch is None)
        assert "inputs like the calibration data" not in v["meaning"]


def test_the_card_says_of_a_runs_risk_only_what_its_record_says() -> None:
    """The card's risk row reads the record (RiskRecord): a calibration's coverage and why it does not hold are said
    where the record says them; an older record that does not (no ``holds``, or ``holds`` without ``mismatch``) is
    shown as it stands."""
    cal = Calibration(**CALIBRATION)
    claims = "the calibrated interval's half-width ÷ the input's robust intensity range"
    held = describe_risk(cal, None, calibration_region=False).to_dict()
    assert dict(card_rows({"risk": held}))["Risk"] == claims
    grid = dict(card_rows({"risk": describe_risk(cal, "grid", calibration_region=False).to_dict()}))["Risk"]
    assert grid == f"{claims}; {mismatch_text('grid')}"
    assert dict(card_rows({"risk": describe_risk(None, None, calibration_region=False).to_dict()}))["Risk"].endswith(
        "(uncalibrated)")
    for older in ({k: v for k, v in held.items() if k not in ("holds", "mismatch")},
                  {**{k: v for k, v in held.items() if k != "mismatch"}, "holds": False}):
        row = dict(card_rows({"risk": older}))["Risk"]
        assert row.startswith("calibrated: yes; ") and claims not in row  # the record as it stands


def test_a_flag_under_a_calibration_that_does_not_hold_is_explained_at_the_scale_applied(tmp_path) -> None:
    """A risk map made with a calibration made for other settings (λ̂ = 3.16 on the std) flags where the std exceeds
    the error size ÷ 3.16: the text gives that std, says that a calibration was applied whose coverage does not hold
    and why, and claims no coverage; it does not call the run uncalibrated. Each scale of a calibration fitted per
    region, and a spread other than the std, are said too."""
    inputs = _inputs()
    cal = Calibration(scale=3.16, alpha=0.1, delta=0.1, method="crc", bound="hb", num_volumes=30, risk_hat=0.09,
                      risk_upper=0.1)
    std, mean = inputs["std"], inputs["mean"]
    risk = std.with_data(risk_map(std.data, mean.data, cal, intensity_range=0.5))
    payload = build_report(tmp_path, **{**{k: inputs[k] for k in ("lr", "mean", "std", "dc_residual")}, "risk": risk},
                           card={}, risk_threshold=THRESHOLD, calibration=cal, calibration_mismatch="settings",
                           input_name="x", sr_axis=2, intensity_range=0.5, outside_training=[])
    meaning = payload["verdict"]["meaning"]
    at = THRESHOLD * 0.5 / 3.16  # the std a flag stands for
    assert meaning.startswith("Where flagged, the interval of the model's calibration, mean ± 3.16 × (std), is wider "
                              "than ±0.15 input intensity units (the threshold 0.3 × the input's robust intensity "
                              f"range 0.5): the samples' standard deviation exceeds {at:.3g} input intensity units "
                              "(0.15 ÷ the scale 3.16), so the shown intensity is uncertain there.")
    assert f"The risk map uses that calibration, but {mismatch_text('settings')}." in meaning
    assert "no flagged fraction is expected" in meaning and "Without a calibration" not in meaning
    fg = payload["verdict"]["foreground_voxels"]
    assert 0 < payload["verdict"]["flagged_voxels"] < fg
    assert np.mean((risk.data > THRESHOLD) == (std.data > at)) > 0.999  # what the text says is what was flagged
    per_region = replace(cal, outside_scale=4.0, shape=IntervalShape(smoothing=1.0))
    text, bound = flag_meaning(0.1, calibration=per_region, mismatch="grid", intensity_range=None,
                               unflagged_fraction=0.9, region="brain")
    assert bound is None and mismatch_text("grid") in text
    assert ("the spread std smoothed over 1 voxel exceeds 0.0316 × the input's robust intensity range in the "
            "calibration region and 0.025 × the input's robust intensity range outside it") in text


def test_each_mismatch_is_worded_once_and_a_build_without_the_reason_is_refused(tmp_path) -> None:
    """The five reasons read differently (what the calibration was made for, and what to do), and a report cannot
    be built without saying whether the calibration holds (it defaulted to holding)."""
    wordings = MISMATCH_WORDING.values()
    assert len({w.label for w in wordings}) == len({w.made_for for w in wordings}) == len({w.advice for w in wordings})
    assert len(wordings) == len(typing.get_args(Mismatch)) == 5
    assert "adapted" in MISMATCH_WORDING["scan"].made_for and "--adapt" in MISMATCH_WORDING["scan"].advice
    assert "--noise-std" in MISMATCH_WORDING["noise_unknown"].advice
    assert "--target-spacing" in MISMATCH_WORDING["grid"].advice and "this grid" in MISMATCH_WORDING["grid"].advice
    inputs = _inputs()
    with pytest.raises(TypeError, match="calibration_mismatch"):
        build_report(tmp_path, **{k: inputs[k] for k in ("lr", "mean", "std", "risk", "dc_residual")}, card={},
                     risk_threshold=THRESHOLD, calibration=CALIBRATED, input_name="x", sr_axis=2)
    # a card's risk record that does not say whether it holds is shown as it stands, not as holding
    row = dict(card_rows({"risk": {"calibrated": True, "definition": "d"}}))["Risk"]
    assert row == "calibrated: yes; definition: d"
