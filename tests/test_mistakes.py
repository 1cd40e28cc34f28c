"""Every user mistake is caught before the work: one line on stderr, exit code 2, nothing written, and no network
call made first (counted with a global torch forward hook). Inputs outside what the model was trained for run, with
one warning line each."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import _lr, _pipe

from gen_sr.cli import main
from gen_sr.model_card import ModelCard
from gen_sr.pipelines.pipeline_latent_sr import LatentDiffusionSRPipeline, OutsideTrainingWarning
from gen_sr.volume import Volume, save_volume


@contextlib.contextmanager
def _network_calls() -> Iterator[list[str]]:
    """The names of every torch module run inside the block (any network evaluation shows up here)."""
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    _pipe(2).save_pretrained(folder)
    return folder


@pytest.fixture
def lr_file(tmp_path: Path) -> Path:
    return save_volume(_lr(), tmp_path / "lr.nii.gz")


def _mistake(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """Run ``gen-sr argv``, assert one line and exit 2 with no network call, and return the line."""
    with _network_calls() as calls:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's refusals
            code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert calls == [], f"sampled before refusing: {calls[:3]}"
    return err


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_missing_input_is_named_as_such(capsys, tmp_path: Path, model_dir: Path) -> None:
    """A mistyped scan name is "no such file" for one scan too, not taken for a folder or pattern of scans."""
    missing = tmp_path / "mistyped.nii.gz"
    for argv in (["--output", tmp_path / "sr.nii.gz"], ["--output-dir", tmp_path / "out"]):
        err = _mistake(capsys, "super-resolve", "--model", model_dir, "--input", missing, *argv)
        assert "no such file" in err and str(missing) in err and "pattern of scans" not in err
    assert _files(tmp_path) == []


def test_unwritable_outputs_are_refused_before_any_work(capsys, tmp_path: Path, model_dir: Path, lr_file: Path,
                                                        unwritable: Path) -> None:
    before = _files(tmp_path)
    err = _mistake(capsys, "super-resolve", "--model", model_dir, "--input", lr_file, "--output",
                   unwritable / "sr.nii.gz", "--samples", "2", "--steps", "2")
    assert "not writable" in err and str(unwritable) in err
    err = _mistake(capsys, "degrade", "--input", lr_file, "--output", unwritable / "lr.nii.gz", "--axis", "0",
                   "--slice-thickness", "2")
    assert "not writable" in err
    err = _mistake(capsys, "audit", "--model", model_dir, "--input", lr_file, "--output-dir", unwritable / "audit")
    assert "not writable" in err
    err = _mistake(capsys, "super-resolve", "--model", model_dir, "--input", lr_file, "--output",
                   tmp_path / "sr.nii.gz", "--std", unwritable / "std.nii.gz")
    assert "not writable" in err
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("argv", "fragment"), [
    (["super-resolve", "--eta", "nan"], "--eta: expected a finite number >= 0, got 'nan'"),
    (["super-resolve", "--noise-std", "-1"], "--noise-std: expected a finite number >= 0"),
    (["super-resolve", "--noise-std", "guess"], "--noise-std: expected a finite number >= 0 or auto, got 'guess'"),
    (["super-resolve", "--seed", "-1"], "--seed: expected a seed"),
    (["super-resolve", "--profile", "trapezoid"], "expected gaussian, rect, auto or a profile file, got 'trapezoid'"),
    (["degrade", "--seed", "-1", "--axis", "0", "--slice-thickness", "2"], "--seed: expected a seed"),
    (["calibrate", "--alpha", "2", "--data", "mni152"], "--alpha: expected a number strictly between 0 and 1"),
    (["calibrate", "--delta", "0", "--data", "mni152"], "--delta: expected a number strictly between 0 and 1"),
    (["audit", "--eta", "inf", "--output-dir", "x"], "--eta: expected a finite number >= 0"),
    (["super-resolve", "--risk-threshold", "0.2"], "gen-sr super-resolve: error: unrecognized arguments: "
                                                   "--risk-threshold 0.2"),
])
def test_bad_parameters_are_one_line(capsys, tmp_path: Path, model_dir: Path, lr_file: Path, argv: list[str],
                                     fragment: str) -> None:
    paths = {"super-resolve": ["--model", model_dir, "--input", lr_file, "--output", tmp_path / "sr.nii.gz"],
             "degrade": ["--input", lr_file, "--output", tmp_path / "lr2.nii.gz"],
             "calibrate": ["--model", model_dir], "audit": ["--model", model_dir, "--input", lr_file]}[argv[0]]
    err = _mistake(capsys, *argv, *paths)
    assert fragment in err and f"see gen-sr {argv[0]} --help" in err
    assert _files(tmp_path) == ["lr.nii.gz"]


@pytest.mark.parametrize("size", ["30,30", "64,64,64"])
def test_a_patch_size_the_model_cannot_tile_with_is_one_line(capsys, tmp_path: Path, model_dir: Path, lr_file: Path,
                                                              size: str) -> None:
    err = _mistake(capsys, "super-resolve", "--model", model_dir, "--input", lr_file, "--output",
                   tmp_path / "sr.nii.gz", "--patch-size", size)
    assert f"patch size {size} does not fit this 2D model (give 2 sizes (H,W), each a multiple of" in err
    assert _files(tmp_path) == ["lr.nii.gz"]


def test_a_missing_model_folder_a_bad_device_and_one_file_for_two_outputs_are_one_line(
        capsys, tmp_path: Path, model_dir: Path, lr_file: Path) -> None:
    run = ["super-resolve", "--input", lr_file, "--output", tmp_path / "sr.nii.gz"]
    err = _mistake(capsys, *run, "--model", tmp_path / "no_model")
    assert "no_model: no such model folder (paths are relative to the current folder" in err
    err = _mistake(capsys, *run, "--model", model_dir / "model_index.json")
    assert f"model_index.json: is a file, not a model folder (pass the folder that holds it, {model_dir})" in err
    assert "expected cpu, cuda, cuda:N or auto, got 'gpu'" in _mistake(capsys, *run, "--model", model_dir,
                                                                      "--device", "gpu")
    err = _mistake(capsys, *run, "--model", model_dir, "--std", tmp_path / "sr.nii.gz")
    assert "sr.nii.gz: --output and --std name the same file" in err
    assert _files(tmp_path) == ["lr.nii.gz"]


def test_calibration_with_too_few_volumes_is_refused_before_sampling(capsys, tmp_path: Path, model_dir: Path,
                                                                     lr_file: Path) -> None:
    hr = save_volume(Volume(np.random.default_rng(0).random((12, 10, 16)).astype(np.float32) + 1, np.eye(4)),
                     tmp_path / "hr.nii.gz")
    err = _mistake(capsys, "calibrate", "--model", model_dir, "--data", hr, "--slice-thickness", "3")
    assert "at least 2 units" in err and "1 volume(s) x 1 block(s)" in err
    err = _mistake(capsys, "calibrate", "--model", model_dir, "--data", hr, "--slice-thickness", "3", "--blocks", "4",
                   "--interval", "auto")
    assert "needs at least 3 volumes" in err
    assert not (model_dir / "calibration.json").exists()


def test_a_grid_that_cannot_fit_in_memory_is_refused_before_sampling(capsys, tmp_path: Path, model_dir: Path,
                                                                     lr_file: Path) -> None:
    err = _mistake(capsys, "super-resolve", "--model", model_dir, "--input", lr_file, "--output",
                   tmp_path / "sr.nii.gz", "--target-spacing", "0.01,0.01,0.01")
    assert "the output grid would be 1200 x 1000 x" in err and "of memory" in err and "coarser --target-spacing" in err
    assert _files(tmp_path) == ["lr.nii.gz"]


def test_pickled_weights_are_refused_unless_allowed(capsys, tmp_path: Path, lr_file: Path, model_dir: Path) -> None:
    folder = tmp_path / "pickled"
    _pipe(2).save_pretrained(folder, safe_serialization=False)
    assert list((folder / "unet").glob("*.bin")) and not list((folder / "unet").glob("*.safetensors"))
    out = tmp_path / "sr.nii.gz"
    argv = ["super-resolve", "--model", folder, "--input", lr_file, "--output", out, "--samples", "2", "--steps", "2"]
    err = _mistake(capsys, *argv)
    assert "pickled weights" in err and "refused for safety" in err and "--allow-pickle" in err
    assert not out.exists()
    assert main([str(a) for a in [*argv, "--allow-pickle"]]) == 0
    err = capsys.readouterr().err
    assert "WARNING: --allow-pickle" in err and out.exists()
    for folder_, allow, warned in ((folder, True, True), (model_dir, False, False)):  # the library warns likewise
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            LatentDiffusionSRPipeline.from_pretrained(folder_, allow_pickle=allow)
        assert any("loading pickled weights" in str(w.message) for w in caught) == warned


def test_inputs_outside_the_trained_regime_warn_in_one_line_each(capsys, tmp_path: Path) -> None:
    pipe = _pipe(2)
    pipe.model_card = replace(ModelCard(), in_plane_spacing=(1.0, 1.0), intensity_range=(80.0, 120.0))
    inside = _lr()  # 1 x 1 x 3 mm, intensities 50..150
    run = {"num_samples": 1, "num_inference_steps": 1, "guidance": "none", "noise_std": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideTrainingWarning)
        assert pipe(inside, **run).metadata["outside_training"] == []
    cases = {"slice thickness 8 mm along S is outside the trained 2-6 mm":
             Volume(np.tile(inside.data, (1, 1, 2)), np.diag([1.0, 1.0, 8.0, 1.0])),
             "in-plane spacing 0.5 x 0.5 mm is outside the trained 1 mm":
             Volume(inside.data, np.diag([0.5, 0.5, 3.0, 1.0])),
             "more than 10x away from the trained 80-120": inside.with_data(inside.data * 1000)}
    for fragment, lr in cases.items():  # the fine in-plane scan kept at its own spacing (by default it is resampled)
        with pytest.warns(OutsideTrainingWarning, match=fragment):
            out = pipe(lr, target_spacing=[min(lr.spacing)] * 3, **run)
        assert len(out.metadata["outside_training"]) == 1 and fragment in out.metadata["outside_training"][0]
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    lr_path = save_volume(cases["in-plane spacing 0.5 x 0.5 mm is outside the trained 1 mm"], tmp_path / "lr.nii.gz")
    code = main(["super-resolve", "--model", str(folder), "--input", str(lr_path), "--output",
                 str(tmp_path / "sr.nii.gz"), "--samples", "1", "--steps", "1", "--guidance", "none",
                 "--target-spacing", "0.5,0.5,0.5"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "outside the trained regime" in line]
    assert code == 0 and len(lines) == 1 and lines[0].startswith("gen-sr: warning: outside the trained regime: ")


@pytest.mark.parametrize("flag", ["--adapt-noise", "--adapt-target-noise"])
def test_a_given_noise_without_the_noise_std_is_refused_before_fine_tuning(capsys, tmp_path: Path, model_dir: Path,
                                                                          lr_file: Path, flag: str) -> None:
    err = _mistake(capsys, "fit", "--model", model_dir, "--input", lr_file, "--output-model", tmp_path / "adapted",
                   flag, "given", "--steps", "2")
    assert f"{flag} given needs the scan's noise std" in err and str(lr_file) in err
    assert _files(tmp_path) == ["lr.nii.gz"]


def test_a_slice_profile_file_that_is_not_numbers_is_one_line(capsys, tmp_path: Path, lr_file: Path) -> None:
    profile = tmp_path / "profile.txt"
    profile.write_text("0 1 one 0\n")
    err = _mistake(capsys, "degrade", "--input", lr_file, "--output", tmp_path / "out.nii.gz", "--axis", "0",
                   "--slice-thickness", "2", "--profile", profile)
    assert f"{profile}: a slice profile file holds numbers only" in err
    assert _files(tmp_path) == ["lr.nii.gz", "profile.txt"]


def test_info_on_a_file_a_model_cannot_run_on_says_one_line_without_the_header_first(capsys, tmp_path: Path,
                                                                                       model_dir: Path) -> None:
    """``info FILE --model DIR`` on a 4D series without ``--volume``, or on a scan with no thick axis: the one error
    line (exit 2), not the file's header and then the error (a walkthrough); the header where the file is fine."""
    import nibabel as nib

    lr = _lr()
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([lr.data, lr.data], axis=-1), lr.affine), series)
    iso = save_volume(Volume(lr.data, np.eye(4)), tmp_path / "iso.nii.gz")
    for path, said in ((series, "series.nii.gz: is a 4D series of 2 volumes (pick one with --volume N"),
                       (iso, "iso.nii.gz: has no coarse axis")):
        assert main(["info", str(path), "--model", str(model_dir)]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and len(printed.err.strip().splitlines()) == 1 and said in printed.err, printed
    assert main(["info", str(series), "--model", str(model_dir), "--volume", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"file:        {series}") and "output grid:" in printed
