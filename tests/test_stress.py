"""The hallucination stress test: lesions go where and are as big as their records say; the measurements give known
answers on hand-made arrays; one tiny end-to-end run writes its reports."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import oblique_affine
from scipy import ndimage
from test_pipeline import _pipe

from gen_sr.eval.stress import (
    Lesion,
    erasure_rate,
    false_structure_rate,
    flagging,
    insert_lesions,
    measure_sites,
    run_stress_test,
    summarize_sites,
)
from gen_sr.eval.uncertainty import auroc
from gen_sr.physics import AcquisitionOperator, SliceAcquisition
from gen_sr.volume import IntensityNormalization, Volume

AFFINES = {"identity": np.eye(4), "anisotropic": np.diag([0.8, 1.0, 1.3, 1.0]), "oblique": oblique_affine()}


def _smooth(shape=(24, 24, 24), seed=0) -> np.ndarray:
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return 100.0 + 10.0 * field / np.abs(field).max()


def _ellipsoid(volume: Volume, lesion: Lesion, grow_mm: float = 0.0) -> np.ndarray:
    """An independent brute-force mask from every voxel's world position."""
    semi = np.asarray(lesion.semi_axes_mm) + grow_mm
    return (((volume.world_coordinates() - lesion.centre_mm) / semi) ** 2).sum(axis=-1) <= 1 + 1e-9


@pytest.mark.parametrize("name", list(AFFINES))
def test_insertion_puts_lesions_where_and_how_big_it_says(name: str) -> None:
    volume = Volume(np.random.default_rng(1).normal(100.0, 5.0, (26, 26, 26)), AFFINES[name])
    truth, lesions = insert_lesions(volume, diameters_mm=(3.0, 8.0, (4.0, 6.0, 10.0)), contrast=-0.25,
                                    n_per_size=1, controls=1, mask=np.ones(volume.shape, bool), seed=3)
    assert [les.kind for les in lesions] == ["added", "control"] * 3
    assert sorted({les.label for les in lesions}) == ["3 mm", "4x6x10 mm", "8 mm"]
    change = truth.data - volume.data
    scale = IntensityNormalization.fit(volume.data).scale
    voxel_mm3 = abs(np.linalg.det(volume.affine[:3, :3]))
    union = np.zeros(volume.shape, bool)
    for les in lesions:
        inside = les.mask(volume.affine, volume.shape)
        assert np.array_equal(inside, _ellipsoid(volume, les))  # how big, voxel by voxel
        world = np.argwhere(inside) @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        np.testing.assert_allclose(world.mean(axis=0), les.centre_mm, atol=1e-9)  # where: the centroid
        np.testing.assert_allclose(volume.affine[:3, :3] @ les.centre_index + volume.affine[:3, 3], les.centre_mm)
        if min(les.semi_axes_mm) >= 2:  # lattice counts approach the analytic volume for all but tiny sites
            assert inside.sum() * voxel_mm3 == pytest.approx(les.volume_mm3, rel=0.12)
        expected = -0.25 * scale if les.kind == "added" else 0.0
        assert les.contrast == pytest.approx(expected)
        np.testing.assert_allclose(change[inside], expected, atol=1e-9)
        assert not (union & _ellipsoid(volume, les, grow_mm=2.0)).any()  # no shell touches another site
        union |= inside
    assert not change[~union].any()  # nothing changes outside the sites


def test_extent_and_shapes_of_an_ellipsoid() -> None:
    les = Lesion("added", (0, 0, 0), (0.0, 0.0, 0.0), (2.0, 3.0, 5.0), 1.0)
    assert les.extent_mm() == 10.0 and les.extent_mm((0, 0, 1)) == 10.0 and les.extent_mm((2, 0, 0)) == 4.0
    assert les.extent_mm((1, 1, 0)) == pytest.approx(2 * math.sqrt((4 + 9) / 2))
    assert les.volume_mm3 == pytest.approx(4 / 3 * math.pi * 30)


def test_removal_changes_only_its_site() -> None:
    data = _smooth()
    blob = np.zeros_like(data)
    blob[11, 12, 13] = 1.0
    data += 400.0 * ndimage.gaussian_filter(blob, 1.2)  # a bright local structure, 3 mm across
    volume = Volume(data, oblique_affine())
    truth, lesions = insert_lesions(volume, diameters_mm=(4.0,), n_per_size=0, controls=0, removed=1,
                                    mask=np.ones(data.shape, bool))
    (site,) = lesions
    assert site.kind == "removed" and np.abs(np.asarray(site.centre_index) - (11, 12, 13)).max() <= 1
    inside = site.mask(volume.affine, volume.shape)
    change = truth.data - data
    assert not change[~inside].any() and change[inside].any()
    assert site.contrast == pytest.approx(float(change[inside].mean())) and site.contrast < 0
    before, after = (measure_sites(a, a, lesions, volume.affine)[0]["true_contrast"] for a in (data, truth.data))
    assert before > 4 and abs(after) < 0.2 * before  # the structure is gone


def test_placement_is_seeded_and_stays_in_the_mask() -> None:
    volume = Volume(_smooth(), np.eye(4))
    mask = np.zeros(volume.shape, bool)
    mask[:, :, 8:] = True
    runs = [insert_lesions(volume, diameters_mm=(2.0, 4.0), mask=mask, seed=s)[1] for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for les in runs[0]:
        assert not (les.mask(volume.affine, volume.shape, grow_mm=2.0) & ~mask).any()
    with pytest.raises(ValueError, match="no room"):
        insert_lesions(volume, diameters_mm=(12.0,), mask=mask)


def test_measurements_give_known_answers() -> None:
    clean = Volume(_smooth(), np.eye(4))
    truth, lesions = insert_lesions(clean, diameters_mm=(2.0, 6.0), contrast=0.5, n_per_size=2, seed=0,
                                    mask=np.ones(clean.shape, bool))
    t, affine = truth.data, truth.affine
    assert erasure_rate(t, t, lesions, affine) == 0.0 and false_structure_rate(t, t, lesions, affine) == 0.0
    sites = measure_sites(t, t, lesions, affine)
    assert all(s["recovered"] == pytest.approx(1.0) for s in sites if s["kind"] == "added")
    assert erasure_rate(clean.data, t, lesions, affine) == 1.0  # the lesion-free volume erases every lesion
    assert all(abs(s["recovered"]) < 1e-9 for s in measure_sites(clean.data, t, lesions, affine)
               if s["kind"] == "added")

    controls = [les for les in lesions if les.kind == "control"]
    blobbed = t + 0.8 * lesions[0].contrast * controls[0].mask(affine, t.shape)  # a blob at one control site
    assert false_structure_rate(blobbed, t, lesions, affine) == 0.25  # 1 of 4 control sites

    error = np.abs(clean.data - t)
    tau = 0.5 * lesions[0].contrast
    assert auroc(error, error > tau) == 1.0
    flags = flagging(clean.data, error, t, lesions, affine, tau=tau, risk_threshold=tau, thickness_mm=4.0)
    assert flags["auroc"] == 1.0 and flags["n_lesions"] == 2
    assert flags["recall_recovered"] == 0.0 and flags["recall_recovered_or_flagged"] == 1.0
    summary = summarize_sites(measure_sites(clean.data, t, lesions, affine, risk=error, slice_direction=(0, 0, 1)),
                              thickness_mm=4.0, risk_threshold=tau)
    assert summary["below"]["n_added"] == 2 and summary["above"]["n_added"] == 2
    assert summary["2 mm"]["size_class"] == "below" and summary["6 mm"]["size_class"] == "above"
    assert summary["all"]["erasure"] == 1.0 and summary["all"]["n_controls"] == 4


def test_data_alone_is_what_the_slices_carry() -> None:
    """The image that knows the lesion-free volume and takes the lesions from the slices alone (the lesion-free
    volume projected onto the measurements of the one with lesions) recovers each lesion by its ``data_alone``, up
    to the other lesions' faint tails; through 4 mm Gaussian slices a 2 mm lesion keeps less than half its contrast,
    a 6 mm one more; ``data_alone`` does not depend on the image measured, and is nan but for added lesions."""
    clean = Volume(_smooth((24, 24, 40)), np.eye(4))
    truth, lesions = insert_lesions(clean, diameters_mm=(2.0, 6.0), contrast=0.5, n_per_size=2, seed=0,
                                    mask=np.ones(clean.shape, bool))
    op = AcquisitionOperator([SliceAcquisition(2, 4.0)], truth.shape, truth.spacing)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float64))[None, None]  # noqa: E731
    sr = op.project(as_tensor(clean.data), op(as_tensor(truth.data)))[0, 0].numpy()
    sites = measure_sites(sr, truth.data, lesions, truth.affine, operator=op)
    added = [s for s in sites if s["kind"] == "added"]
    assert len(added) == 4
    for s in added:
        assert s["recovered"] == pytest.approx(s["data_alone"], abs=1e-3)
    kept = {label: [s["data_alone"] for s in added if s["label"] == label] for label in ("2 mm", "6 mm")}
    assert max(kept["2 mm"]) < 0.5 < min(kept["6 mm"])
    assert all(math.isnan(s["data_alone"]) for s in sites if s["kind"] != "added")
    perfect = measure_sites(truth.data, truth.data, lesions, truth.affine, operator=op)
    assert [s["data_alone"] for s in perfect if s["kind"] == "added"] == [s["data_alone"] for s in added]
    summary = summarize_sites(sites, thickness_mm=4.0)
    assert summary["2 mm"]["mean_data_alone"] == pytest.approx(np.mean(kept["2 mm"]))
    assert math.isnan(summarize_sites(measure_sites(sr, truth.data, lesions, truth.affine),
                                      thickness_mm=4.0)["all"]["mean_data_alone"])  # no operator, no figure


def test_run_stress_test_end_to_end(tmp_path: Path) -> None:
    data = _smooth((16, 16, 16), seed=2)
    for corner in np.ndindex(2, 2, 2):  # a little background, as around a brain
        data[tuple(slice(0, 2) if c == 0 else slice(-2, None) for c in corner)] = 0.0
    volume = Volume(data.astype(np.float32), np.eye(4), source="phantom")
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, num_inference_steps=2)  # the steps: the folder's default
    result = run_stress_test(pipe, [volume], thickness_mm=4.0, diameters_mm=(2.0, 5.0), n_per_size=1,
                             removed=1, num_samples=2, seed=0, output_dir=tmp_path, progress=False,
                             guidance_interval=1)
    for name in ("stress_test.md", "stress_test.csv", "stress_test.json", "stress_test.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob(".*partial*"))
    saved = json.loads((tmp_path / "stress_test.json").read_text())
    assert saved["settings"]["num_samples"] == 2 and len(saved["sites"]) == 6
    assert saved["settings"]["num_inference_steps"] == 2 and saved["settings"]["scheduler"] == pipe.sampler_name
    assert f"2 steps of {pipe.sampler_name}" in (tmp_path / "stress_test.md").read_text()
    assert (tmp_path / "stress_test.csv").read_text().splitlines()[0].startswith("group,size_class,n_added")
    assert 0.0 < result["summary"]["2 mm"]["mean_data_alone"] < result["summary"]["5 mm"]["mean_data_alone"] <= 1.0
    summary = result["summary"]
    assert set(summary) == {"2 mm", "5 mm", "below", "above", "all"}
    assert summary["all"]["n_added"] == 2 and summary["all"]["n_controls"] == 2 and summary["all"]["n_removed"] == 2
    for stats in summary.values():
        for key in ("erasure", "recall_recovered", "recall_recovered_or_flagged", "false_structure", "restored"):
            assert math.isnan(stats[key]) or 0.0 <= stats[key] <= 1.0
        if stats["n_added"]:
            assert stats["erasure"] + stats["recall_recovered"] == pytest.approx(1.0)
            assert stats["recall_recovered_or_flagged"] >= stats["recall_recovered"]
    assert math.isnan(result["auroc"]) or 0.0 <= result["auroc"] <= 1.0
    assert max(result["volumes"][0]["relative_residual"]) < 1e-3  # the SR matched the simulated acquisition
