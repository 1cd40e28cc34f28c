"""The ``gen-sr`` command: degrade with exact geometry, info, help, and one clear line for every bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import oblique_affine, write_nifti

from gen_sr.cli import build_parser, main
from gen_sr.physics import SliceAcquisition
from gen_sr.volume import Volume, load_volume


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "axis,thickness,spacing,profile",
    [(2, "4", None, "gaussian"), (1, "3.3", "2.7", "rect"), (0, "2.5", "3.1", "gaussian"), (2, "5", "3", "rect")],
)
def test_lr_voxel_centres_are_the_profile_weighted_mean_of_the_hr_voxels(
    tmp_path: Path, capsys, axis: int, thickness: str, spacing: str | None, profile: str
) -> None:
    """Degrading an image whose intensity *is* a world coordinate gives, at each LR voxel, the profile-weighted
    mean world position of the HR voxels it integrates; that must equal the LR voxel centre from the written
    affine, to 1e-4 mm, with an oblique affine and non-integer factors, for every slice whose profile lies within the
    grid. An end slice whose profile reaches past it sees the object continued by the end voxel
    (``benchmarks/END_SLICES.md``): its mean lies inwards, within its own slice spacing."""
    shape, hr_spacing = (18, 20, 22), (1.0, 0.9, 1.1)
    hr = Volume(np.zeros(shape), oblique_affine(spacing=hr_spacing))
    slices = SliceAcquisition(axis, float(thickness), float(spacing or thickness), profile)
    h = hr_spacing[axis]
    centres = slices._first(h) + slices.slice_spacing * np.arange(slices.out_size(shape[axis], h))
    within = (centres - slices._half_support() >= -1e-9) & (centres + slices._half_support() <= (shape[axis] - 1) * h)
    assert within.any() and not within.all()  # both kinds of slice are tested
    world = hr.world_coordinates()
    for coord in range(3):
        src = write_nifti(tmp_path / f"coord{coord}.nii", world[..., coord].astype(np.float64), hr.affine)
        out = tmp_path / f"lr{coord}.nii.gz"
        args = ["degrade", "--input", src, "--output", out, "--slice-thickness", thickness, "--axis", str(axis),
                "--profile", profile]
        code, stdout, _ = _run(capsys, *args, *(["--slice-spacing", spacing] if spacing else []))
        assert code == 0 and str(out) in stdout
        lr = load_volume(out)
        assert lr.data.dtype == np.float64
        error = np.moveaxis(np.abs(lr.data - lr.world_coordinates()[..., coord]), axis, 0)
        assert error[within].max() < 1e-4 and error.max() < 0.5 * slices.slice_spacing
        assert lr.shape[axis] < shape[axis]
        assert [lr.shape[a] for a in range(3) if a != axis] == [shape[a] for a in range(3) if a != axis]
        expected_spacing = float(spacing or thickness)
        assert lr.spacing[axis] == pytest.approx(expected_spacing, abs=1e-6)
        assert nib.load(out).header.get_zooms()[axis] == pytest.approx(expected_spacing, abs=1e-5)
        bids = json.loads((tmp_path / f"lr{coord}.json").read_text())  # the sidecar super-resolve reads
        assert bids["SliceThickness"] == float(thickness) and bids["SpacingBetweenSlices"] == expected_spacing


def test_degrade_with_noise_is_seeded_and_leaves_the_input_alone(tmp_path: Path, capsys, hr_file: Path) -> None:
    before = _digest(hr_file)
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.nii.gz"
        code, stdout, _ = _run(capsys, "degrade", "--input", hr_file, "--output", out, "--slice-thickness", "2",
                               "--axis", "0", "--snr", "20", "--seed", str(seed), "--save-operator",
                               tmp_path / f"{name}.json")
        assert code == 0 and "SNR 20" in stdout
        outs.append(load_volume(out).data)
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    assert _digest(hr_file) == before
    saved = json.loads((tmp_path / "a.json").read_text())  # --save-operator named the sidecar: one file holds both
    assert json.dumps(saved).count('"slice"') == 1 and saved["SliceThickness"] == 2.0
    same = tmp_path / "same.nii.gz"  # the operator over the image itself, and slices finer than the voxels: refused
    code, _, err = _run(capsys, "degrade", "--input", hr_file, "--output", same, "--slice-thickness", "2", "--axis",
                        "0", "--save-operator", same)
    assert code == 2 and "--output and --save-operator name the same file" in err and not same.exists()
    code, _, err = _run(capsys, "degrade", "--input", hr_file, "--output", same, "--slice-thickness", "0.5",
                        "--axis", "0")
    assert code == 2 and "is finer than the input's" in err and not same.exists()
    code, _, err = _run(capsys, "degrade", "--input", hr_file, "--output", same, "--slice-thickness", "2",
                        "--axis", "0", "--noise", "gaussian")  # a noise kind without a noise level
    assert code == 2 and "no --snr was given" in err and not same.exists()


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (input file, extra args, expected message fragment)."""
    rng = np.random.default_rng(0)
    good = rng.random((8, 9, 10)).astype(np.float32)
    cases: dict[str, tuple[Path, list[str], str]] = {}
    text = tmp / "notes.txt"
    text.write_text("not an image")
    cases["not-nifti"] = (text, [], "not a readable NIfTI")
    fake = tmp / "fake.nii.gz"
    fake.write_bytes(b"\x00" * 400)
    cases["garbage-with-nifti-suffix"] = (fake, [], "not a readable NIfTI")
    full = write_nifti(tmp / "full.nii.gz", rng.random((30, 30, 30)).astype(np.float32))
    raw = gzip.decompress(full.read_bytes())
    truncated = tmp / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    cases["truncated"] = (truncated, [], "truncated or corrupt")
    cut_gzip = tmp / "cut_gzip.nii.gz"
    cut_gzip.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    cases["truncated-gzip-stream"] = (cut_gzip, [], "truncated or corrupt")
    cases["2d"] = (write_nifti(tmp / "slice2d.nii.gz", good[:, :, 0]), [], "not a 3D volume")
    cases["4d"] = (write_nifti(tmp / "series.nii.gz", np.stack([good, good], -1)), [], "--volume N")
    cases["4d-bad-index"] = (tmp / "series.nii.gz", ["--volume", "5"], "out of range")
    nan = good.copy()
    nan[1, 2, 3] = np.nan
    nan[2, 2, 3] = np.inf
    cases["nan"] = (write_nifti(tmp / "nan.nii.gz", nan), [], "2 NaN or Inf voxels")
    for name, value in (("zero-pixdim", 0.0), ("negative-pixdim", -1.0)):
        img = nib.Nifti1Image(good, np.eye(4))
        img.header["pixdim"][3] = value
        nib.save(img, tmp / f"{name}.nii.gz")
        cases[name] = (tmp / f"{name}.nii.gz", [], "zero or negative voxel size")
    cases["constant"] = (write_nifti(tmp / "constant.nii.gz", np.full((8, 8, 8), 7.0, np.float32)), [], "constant")
    ok = write_nifti(tmp / "ok.nii.gz", good)
    cases["too-thick"] = (ok, ["--slice-thickness", "50"], "does not fit")
    cases["missing"] = (tmp / "missing.nii.gz", [], "no such file")
    return cases


def test_bad_inputs_give_one_line_exit_2_and_no_output(tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (src, extra, fragment) in _bad_inputs(inputs).items():
        outdir = tmp_path / name
        outdir.mkdir()
        out = outdir / "lr.nii.gz"
        args = ["degrade", "--input", src, "--output", out, "--axis", "2"]
        if "--slice-thickness" not in extra:
            args += ["--slice-thickness", "2"]
        code, _, err = _run(capsys, *args, *extra)
        assert code == 2, name
        assert fragment in err and str(src) in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert list(outdir.iterdir()) == [], name


def test_existing_output_is_refused_without_overwrite(tmp_path: Path, capsys, hr_file: Path) -> None:
    out = tmp_path / "lr.nii.gz"
    out.write_bytes(b"precious")
    args = ["degrade", "--input", hr_file, "--output", out, "--slice-thickness", "2", "--axis", "1"]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == b"precious"
    assert _run(capsys, *args, "--overwrite")[0] == 0
    assert load_volume(out).shape[1] < 14
    code, _, err = _run(capsys, "degrade", "--input", hr_file, "--output", hr_file, "--slice-thickness", "2",
                        "--axis", "1", "--overwrite")
    assert code == 2 and "same file as an input" in err
    again = tmp_path / "twice.nii.gz"  # the thick-slice output degraded again along its coarse axis: said
    code, _, err = _run(capsys, "degrade", "--input", out, "--output", again, "--slice-thickness", "4", "--axis", "1")
    assert code == 0 and "is already coarse along voxel axis 1" in err and "a second time" in err


def test_volume_option_takes_one_volume_of_a_series(tmp_path: Path, capsys) -> None:
    data = np.random.default_rng(0).random((8, 9, 10, 3)).astype(np.float32)
    src = write_nifti(tmp_path / "series.nii.gz", data)
    out = tmp_path / "lr.nii.gz"
    code, _, _ = _run(capsys, "degrade", "--input", src, "--output", out, "--slice-thickness", "2", "--axis", "2",
                      "--volume", "1")
    assert code == 0 and load_volume(out).shape == (8, 9, 5)


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="no such file"):
        main(["degrade", "--input", str(tmp_path / "nope.nii"), "--output", str(tmp_path / "o.nii"),
              "--slice-thickness", "2", "--axis", "0", "--debug"])


def test_info(capsys, hr_file: Path, tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "info", hr_file)
    assert code == 0
    for fragment in ("shape:       12 x 14 x 16", "spacing:", "orientation:", "oblique", "intensity:   min"):
        assert fragment in out
    series = write_nifti(tmp_path / "s.nii.gz", np.zeros((4, 5, 6, 3), np.float32))
    assert "3 volumes" in _run(capsys, "info", series)[1]
    code, _, err = _run(capsys, "info", tmp_path / "absent.nii.gz")
    assert code == 2 and "no such file" in err


def test_sample_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gm.nii.gz"
    code, stdout, _ = _run(capsys, "sample-data", "--kind", "gm", "--output", out)
    assert code == 0 and "MNI152" in stdout
    assert load_volume(out).shape == (197, 233, 189)
    subject = tmp_path / "subject_gm.nii.gz"
    code, stdout, _ = _run(capsys, "sample-data", "--kind", "gm", "--subject", "5", "--output", subject)
    assert code == 0 and "synthetic subject 5" in stdout
    assert not np.allclose(load_volume(subject).data, load_volume(out).data, atol=0.05)
    with pytest.raises(SystemExit) as exc:  # a seed numpy cannot take: argparse's one line, exit 2
        main(["sample-data", "--subject", "-1", "--output", str(tmp_path / "bad.nii.gz")])
    assert exc.value.code == 2 and "from 0 to 2**32 - 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.nii.gz").exists()


def test_help_for_every_subcommand(capsys) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"degrade", "info", "sample-data", "demo"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: gen-sr " + name in capsys.readouterr().out



def test_options_are_given_in_full_and_resolved_to_the_option_they_set(capsys) -> None:
    """No parser takes an abbreviation (``--sam 4`` would slip past what the command line is checked for), and the
    options given are resolved to the option each sets: an alias or a ``--no-`` form is that option."""
    parser = build_parser()
    assert not parser.allow_abbrev and all(not sub.allow_abbrev for sub in parser.subcommands.values())
    for argv, abbreviation in ((["degrade", "--input", "a", "--output", "b", "--slice-thickness", "4", "--axis", "2",
                                 "--save", "op.json"], "--save op.json"),  # --save-operator
                               (["info", "x.nii", "--mod", "m"], "--mod m"), (["--deb", "info", "x.nii"], "--deb")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and f"unrecognized arguments: {abbreviation} (see" in capsys.readouterr().err
    audit = parser.subcommands["audit"]
    assert audit.given(["audit", "--slice-profile=rect", "--no-share-first-call", "--input", "x", "--", "--seed"]) == {
        "--slice-profile": "--profile", "--no-share-first-call": "--share-first-call", "--input": "--input"}


_RUN_FLAGS = ("--target-spacing", "--slice-thickness", "--profile", "--noise-std", "--samples", "--steps",
              "--scheduler", "--timestep-spacing", "--eta", "--strength", "--share-first-call", "--no-share-first-call",
              "--guidance", "--refit-disagreement", "--no-refit-disagreement", "--seed", "--batch-size",
              "--skip-background", "--patch-size", "--adapt")
"""The hand-written list of ``audit``'s run options that ``--reuse`` refused before they were read off the parser."""


def test_audits_run_settings_are_read_off_its_parser_and_lose_none_of_the_old_list() -> None:
    audit = build_parser("audit").subcommands["audit"]
    options = {flag: action for action in audit._actions for flag in action.option_strings}
    run = {options[name] for name in audit.run_settings}
    assert run == {options[flag] for flag in _RUN_FLAGS}  # the same options: none lost, none added
    assert {flag for action in run for flag in action.option_strings} == {*_RUN_FLAGS, "--slice-profile"}
    for kept_out in ("--device", "--allow-pickle", "--volume", "--reuse", "--adapt-steps", "--calibration-region"):
        assert options[kept_out] not in run  # no effect on the result, or not how a run is made


def _args_read() -> dict[str, tuple[set[str], set[str]]]:
    """For each function of ``gen_sr/cli.py``: the attributes it reads off ``args``, and the module's functions it
    passes ``args`` to. A ``getattr`` or ``hasattr`` on ``args`` fails: a command's arguments are read as they are."""
    import ast

    import gen_sr.cli as cli

    tree = ast.parse(Path(cli.__file__).read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    reads = {}
    for name, function in functions.items():
        attributes, callees = set(), set()
        for node in ast.walk(function):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"
                    and isinstance(node.ctx, ast.Load)):
                attributes.add(node.attr)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                passed = [a for a in [*node.args, *(k.value for k in node.keywords)]
                          if isinstance(a, ast.Name) and a.id == "args"]
                assert not (passed and node.func.id in ("getattr", "hasattr")), f"{name}: {node.func.id}(args, ...)"
                if passed and node.func.id in functions:
                    callees.add(node.func.id)
        reads[name] = attributes, callees
    return reads


def _required_arguments(parser) -> list[str]:
    """A command line that gives each required option of ``parser`` a value it takes (its first choice, else 1)."""
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:
            value = str(action.choices[0]) if action.choices else "1"
            argv += [action.option_strings[0], *[value] * (action.nargs if isinstance(action.nargs, int) else 1)]
    return argv


def test_every_subcommands_arguments_have_what_its_helpers_read() -> None:
    """Each subcommand's parse result has every attribute that its command function, and the shared helpers it passes
    its arguments to, read off them (``_load_pipeline``'s ``--device`` for ``info``, which has no such option): a
    helper shared by commands with different options cannot read one that a command lacks, nor default a typo."""
    from gen_sr.cli import _COMMANDS, _parse_args

    reads = _args_read()
    parser = build_parser()
    for command, (func, _, _) in _COMMANDS.items():
        needed, todo = set(), [func.__name__]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo += reads[name][1]
        args = _parse_args([command, *_required_arguments(parser.subcommands[command])])
        attributes = set().union(*(reads[name][0] for name in needed))
        assert attributes - set(vars(args)) == set(), command
    # the reads are found where they are: info's plan loads the model, which reads how to load it
    assert {"device", "allow_pickle", "scheduler", "timestep_spacing"} <= reads["_load_pipeline"][0]
    assert "_load_pipeline" in reads["_plan"][1] and {"_plan", "_print_plan"} <= reads["cmd_info"][1]


def _help_sections(command: str, capsys) -> dict[str, list[str]]:
    """``gen-sr COMMAND --help``'s sections (``options``, then each argument group's title), each with the first
    flag of each option it lists."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    sections: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if re.fullmatch(r"\S.*:", line):
            sections[line[:-1]] = flags = []
        elif line.startswith("  -") and sections:
            flags.append(line.split()[0].rstrip(","))
    return sections


def test_calibrate_help_lists_the_simulated_acquisition_and_the_rule_under_their_titles(capsys) -> None:
    """``calibrate``'s options sit in titled sections as ``super-resolve``'s do: the volumes and the acquisition
    simulated from them (as ``evaluate`` and ``stress-test`` list them), the calibration's rule, the sampling; only
    the model, the overwrite, the device and the weights' format are left as plain options."""
    simulation = ["--data", "--region", "--slab", "--slice-thickness", "--slice-spacing", "--profile", "--snr",
                  "--operator"]
    sections = _help_sections("calibrate", capsys)
    assert list(sections) == ["options", "simulated acquisition", "calibration", "sampling"]
    assert sections["options"] == ["-h", "--debug", "--model", "--overwrite", "--device", "--allow-pickle"]
    assert sections["simulated acquisition"] == simulation
    assert sections["calibration"] == ["--alpha", "--delta", "--method", "--noise-unknown", "--per-grid", "--per-mm",
                                       "--blocks", "--interval"]
    for command in ("evaluate", "stress-test"):
        assert _help_sections(command, capsys)["simulated acquisition"] == simulation
    assert {"sampling", "acquisition", "adaptation"} <= set(_help_sections("super-resolve", capsys))

def test_console_script_runs_and_reports_usage_errors_with_exit_2() -> None:
    ok = subprocess.run([sys.executable, "-m", "gen_sr.cli", "--help"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "degrade" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gen_sr.cli", "degrade", "--axis", "7"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_help_and_info_import_no_torch(hr_file: Path) -> None:
    """``gen-sr --help``, every subcommand's ``--help``, a usage error and ``gen-sr info FILE`` answer without
    importing torch, diffusers or MONAI (seconds each): only the subcommand run gets its options, their defaults come
    from modules that import nothing heavy, and the package imports its names on first use."""
    check = ("import sys\nfrom gen_sr.cli import _COMMANDS, main\n"
             "for argv in (['--help'], ['degarde'], ['info', sys.argv[1]], *([c, '--help'] for c in _COMMANDS)):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "heavy = sorted({'torch', 'diffusers', 'monai', 'accelerate'} & set(sys.modules))\n"
             "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", check, str(hr_file)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "usage: gen-sr" in run.stdout and "shape:" in run.stdout and "invalid choice: 'degarde'" in run.stderr


def test_info_shows_what_a_model_was_trained_for(capsys, tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "info", "--model", Path(__file__).parents[1] / "models" / "heads2d")
    assert code == 0
    for fragment in ("super-resolves:   any RAS+ axis", "slice thickness:  2-8 mm", "in-plane spacing: 0.7-1.5 mm",
                     "held out:         the last 20%",
                     "objective:        diffusion, 3 sampling step(s) by default, the first network call shared by all"
                     " samples",
                     "sampler:          DPMSolverDataConsistencyScheduler(trailing)",
                     "made with 8 samples, DPM-Solver++, 3 steps, trailing spacing, first call shared",
                     "calibration:      mean ± ", "autoencoder:      the Haar wavelet transform, 1 level(s)"):
        assert fragment in out
    code, _, err = _run(capsys, "info", "--model", tmp_path)
    assert code == 2 and "no model_index.json" in err
    code, _, err = _run(capsys, "info")
    assert code == 2 and "--model DIR" in err


def test_info_with_a_model_says_what_super_resolve_would_do_without_sampling(capsys, tmp_path: Path) -> None:
    """``info FILE --model DIR``: the acquisition assumed, the input's in-plane resampling where it is finer than the
    model was trained for, the output grid, the memory and the noise std read from the air."""
    import dataclasses

    from helpers import head_in_air
    from test_pipeline import _pipe

    from gen_sr.risk import Calibration

    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, in_plane_spacing=(0.7, 1.5), num_inference_steps=2)
    pooled = Calibration(scale=4.0, alpha=0.1, delta=0.1, method="crc", bound="", num_volumes=8, risk_hat=0.1,
                         risk_upper=0.1, sampling=pipe.sampling_settings(noise_std=1.0))  # a noisy run's, any grid
    pipe.calibration = pooled
    pipe.calibrations = pipe.calibrations.with_record(dataclasses.replace(pooled, scale=3.0, grid_spacing=1.0))
    pipe.save_pretrained(tmp_path / "model")
    for size, spacing, grid in ((48, (1.0, 1.0, 3.0), "48 x 48 x 12 voxels of 1 x 1 x 1 mm"),
                                (96, (0.35, 0.35, 2.8), "48 x 48 x 16 voxels of 0.7 x 0.7 x 0.7 mm")):
        scan = head_in_air((size, size, 4), sigma=2.0, radius=size * 0.3).astype(np.float32)
        path = write_nifti(tmp_path / f"lr_{size}.nii.gz", scan, np.diag([*spacing, 1.0]))
        code, out, _ = _run(capsys, "info", path, "--model", tmp_path / "model")
        assert code == 0 and f"output grid: {grid}" in out and "warning:" not in out
        assert ("resampled:   in-plane from 0.35 x 0.35 x 2.8 to 0.7 x 0.7 x 2.8 mm" in out) == (size == 96)
        # the record its risk map would use: the 1 mm grid's own, the pooled one (its grids not recorded) for 0.7 mm
        assert ("calibration: mean ± 3 × (std), the record for 1 mm grids" in out) == (size == 48)
        assert ("calibration: mean ± 4 × (std)\n" in out) == (size == 96)
        assert "acquisition: axis 2:" in out and "memory:      about" in out and "read from the background air" in out
    series = head_in_air((48, 48, 4), sigma=2.0, radius=14.4).astype(np.float32)
    series = write_nifti(tmp_path / "series.nii.gz", np.stack([series, series], -1), np.diag([1.0, 1.0, 3.0, 1.0]))
    code, _, err = _run(capsys, "info", series, "--model", tmp_path / "model")  # a 4D series: which volume?
    assert code == 2 and "--volume N" in err and "Traceback" not in err
    code, out, _ = _run(capsys, "info", series, "--model", tmp_path / "model", "--volume", "1")
    assert code == 0 and "output grid: 48 x 48 x 12 voxels of 1 x 1 x 1 mm" in out
    sra = np.zeros((4, 4))  # stored with the file's axes along S (3 mm slices), R, A
    sra[2, 0], sra[0, 1], sra[1, 2], sra[3, 3] = 3.0, 1.0, 1.0, 1.0
    head = head_in_air((48, 40, 4), sigma=2.0, radius=14.4).astype(np.float32)
    path_sra = write_nifti(tmp_path / "sra.nii.gz", np.transpose(head, (2, 0, 1)), sra)
    code, out, _ = _run(capsys, "info", path_sra, "--model", tmp_path / "model")
    assert code == 0 and "output grid: 12 x 48 x 40 voxels of 1 x 1 x 1 mm (the file's axis order)" in out, out
    # a BIDS sidecar's SliceThickness (as dcm2niix writes it): 2 mm slices every 3 mm, unless the run says otherwise
    gapped = write_nifti(tmp_path / "gapped.nii.gz", head, np.diag([1.0, 1.0, 3.0, 1.0]))
    (tmp_path / "gapped.json").write_text(json.dumps({"SliceThickness": 2, "SpacingBetweenSlices": 3}))
    code, out, _ = _run(capsys, "info", gapped, "--model", tmp_path / "model")
    assert code == 0 and "acquisition: axis 2: 2 mm slices every 3 mm" in out, out
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    pipe = LatentDiffusionSRPipeline.from_pretrained(tmp_path / "model")
    assert "axis 2: 3 mm slices every 3 mm" in pipe.plan(load_volume(gapped), slice_thickness=3.0).acquisition
    thin = write_nifti(tmp_path / "thin.nii.gz", scan, np.diag([0.7, 0.7, 1.0, 1.0]))
    code, out, _ = _run(capsys, "info", thin, "--model", tmp_path / "model")
    assert "warning:     outside the trained regime: slice thickness 1 mm along S" in out
    # --time: a run on an 8-voxel slab across the first in-plane axis of the resampled 48-voxel grid, timed
    code, out, err = _run(capsys, "info", path, "--model", tmp_path / "model", "--time")
    assert "timing:      super-resolving a central slab of the scan with 8 samples" in out  # said first, then a bar
    assert re.search(r"timing: +100%\|.*\| 2/2 ", err), err  # the tiny model's 2 steps, as super-resolve shows them
    assert code == 0 and re.search(r"time: +about [0-9.]+ (s|min|h) for 8 samples on this machine .*a slab of 16\.7% "
                                   r"of the output took [0-9]+\.[0-9] s", out), out  # the load decides the unit
    code, _, err = _run(capsys, "info", path, "--time")
    assert code == 2 and "give --model DIR too" in err
    code, _, err = _run(capsys, "info", path, "--noise-std", "2", "--slice-profile", "rect")  # ignored otherwise
    assert code == 2 and "--noise-std, --slice-profile preview a model's run on a file" in err
    code, _, err = _run(capsys, "info", "--model", tmp_path / "model", "--samples", "3")  # a model without a file
    assert code == 2 and "--samples previews a model's run on a file: give the FILE" in err
    # what a run with other settings would do: another grid, a given noise std, fewer samples than calibrated
    code, out, _ = _run(capsys, "info", path, "--model", tmp_path / "model", "--target-spacing", "2,2,2",
                        "--noise-std", "1.5", "--samples", "4")
    assert code == 0 and "output grid: 17 x 17 x 6 voxels of 1.976 x 1.976 x 2 mm" in out, out
    assert "to 1.976 x 1.976 x 2.8 mm first (for --target-spacing)" in out
    assert re.search(r"noise std: +0\.[0-9]+, as given \(--noise-std\)", out)  # 1.5 on 0.35 mm, less on 2 mm voxels
    assert "memory:      about" in out and "for 4 samples" in out
    assert "its coverage does not hold for this run" in out  # the model was calibrated with 8 samples


def test_info_with_a_model_resamples_a_fine_scan_once_for_its_plan_and_timing(capsys, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """``info FILE --model DIR --time`` on a scan finer in-plane than the model was trained for: its plan and the
    timed run resample the scan, read how that scaled its noise and read its noise once each
    (:data:`~test_pipeline.INPUT_WORK`, counted)."""
    import dataclasses

    from helpers import head_in_air
    from test_pipeline import _pipe, counted_commands

    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, in_plane_spacing=(0.7, 1.5), num_inference_steps=2)
    pipe.save_pretrained(tmp_path / "model")
    scan = head_in_air((96, 96, 4), sigma=2.0, radius=28.8).astype(np.float32)
    path = write_nifti(tmp_path / "fine.nii.gz", scan, np.diag([0.35, 0.35, 2.8, 1.0]))
    code, calls = counted_commands(monkeypatch)(["info", str(path), "--model", str(tmp_path / "model"), "--time",
                                                 "--samples", "2"])
    assert code == 0 and "resampled:   in-plane from 0.35" in capsys.readouterr().out
    assert calls == {"coarsen": 1, "air_noise_gain": 1, "scan_noise_std": 1}


def test_degrade_takes_a_measured_slice_profile_from_a_file(tmp_path: Path, capsys, hr_file: Path) -> None:
    from gen_sr.physics import SliceAcquisition, simulate_acquisition

    samples = (0.0, 0.3, 1.0, 1.0, 0.6, 0.0)  # skewed: neither gaussian nor rect
    profile = tmp_path / "profile.txt"
    profile.write_text(" ".join(map(str, samples)))
    out = tmp_path / "lr.nii.gz"
    code, stdout, _ = _run(capsys, "degrade", "--input", hr_file, "--output", out, "--slice-thickness", "3",
                           "--axis", "0", "--slice-profile", profile)
    assert code == 0 and "custom (6 samples) slices" in stdout
    expected, _, _ = simulate_acquisition(load_volume(hr_file), [SliceAcquisition(0, 3.0, profile=samples)])
    np.testing.assert_allclose(load_volume(out).data, expected.data, rtol=1e-5, atol=1e-5)
    gaussian = tmp_path / "gaussian.nii.gz"
    _run(capsys, "degrade", "--input", hr_file, "--output", gaussian, "--slice-thickness", "3", "--axis", "0")
    assert not np.allclose(load_volume(gaussian).data, load_volume(out).data)
    # the sidecar records the profile (gen_sr's own key), for super-resolve to take
    assert json.loads((tmp_path / "lr.json").read_text())["SliceProfile"] == list(samples)
    assert json.loads((tmp_path / "gaussian.json").read_text())["SliceProfile"] == "gaussian"


def test_super_resolve_takes_the_slice_profile_degrade_recorded(capsys, tmp_path: Path) -> None:
    """A scan degraded with ``--profile rect`` is fitted with rect slices without the flag (its sidecar's
    ``SliceProfile``); a profile given wins; a sidecar profile that is not one is a clear error unless one is given."""
    from helpers import head_in_air, tiny_pipeline

    from gen_sr.pipelines import LatentDiffusionSRPipeline

    tiny_pipeline(2).save_pretrained(tmp_path / "model")
    hr = write_nifti(tmp_path / "hr.nii.gz", head_in_air((32, 32, 24), radius=10.0).astype(np.float32), np.eye(4))
    lr = tmp_path / "lr.nii.gz"
    assert _run(capsys, "degrade", "--input", hr, "--output", lr, "--slice-thickness", "3", "--axis", "2",
                "--profile", "rect")[0] == 0
    assert json.loads((tmp_path / "lr.json").read_text())["SliceProfile"] == "rect"
    run = ("--model", tmp_path / "model", "--input", lr, "--samples", "2", "--steps", "1", "--noise-std", "0")
    for name, flags, profile, source in (("sr", (), "rect", "sidecar"),
                                         ("given", ("--profile", "gaussian"), "gaussian", "given")):
        assert _run(capsys, "super-resolve", *run, "--output", tmp_path / f"{name}.nii.gz", *flags)[0] == 0
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert [t["profile"] for t in meta["operator"]["transforms"]] == [profile]
        assert meta["slice_profile_from"] == source and meta["slice_thickness_from"] == "sidecar"
    code, out, _ = _run(capsys, "info", lr, "--model", tmp_path / "model")  # the plan says what it would use
    assert code == 0 and ("acquisition: axis 2: 3 mm slices every 3 mm, rect profile (RAS+ axes; thickness and "
                          "profile from the scan's JSON sidecar;") in out, out
    pipe = LatentDiffusionSRPipeline.from_pretrained(tmp_path / "model")
    plan = pipe.plan(lr)  # in Python too; a profile given is used as before
    assert "rect profile" in plan.acquisition and plan.slice_profile_from == "sidecar"
    plan = pipe.plan(lr, slice_profile="gaussian", slice_thickness=4.0)
    assert "4 mm slices every 3 mm, gaussian profile" in plan.acquisition
    assert (plan.slice_profile_from, plan.slice_thickness_from) == ("given", "given")
    assert pipe.plan(load_volume(lr)).slice_profile_from == "sidecar"  # a Volume read from the file, too
    # a sidecar profile that is not one: named, unless the run gives its own
    (tmp_path / "lr.json").write_text(json.dumps({"SliceThickness": 3, "SliceProfile": "trapezoid"}))
    code, _, err = _run(capsys, "info", lr, "--model", tmp_path / "model")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f'{tmp_path / "lr.json"}: SliceProfile "trapezoid" is not a slice profile' in err and "--profile" in err
    code, out, _ = _run(capsys, "info", lr, "--model", tmp_path / "model", "--profile", "rect")
    assert code == 0 and "rect profile (RAS+ axes; thickness from the scan's JSON sidecar, profile as given;" in out
