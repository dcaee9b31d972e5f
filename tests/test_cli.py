"""`psr` end to end through `main(argv)`: outputs, sidecars, and every bad input."""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from psr.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def refs(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(a)
    Image.new("RGBA", (40, 70), (0, 0, 200, 128)).save(b)
    return [str(a), str(b)]


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_pngs_sidecars_and_resolved_recipe(tmp_path, refs, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "generate", "--ref", refs[0], "--ref", refs[1], "a cat and a box",
                           "--out", str(out), "--steps", "2", "-n", "2", "--seed", "5", "--size", "48x32", "-q")
    assert code == 0
    assert stdout.split() == [str(out / "0000.png"), str(out / "0001.png")]
    assert sorted(p.name for p in out.iterdir()) == ["0000.json", "0000.png", "0000.recipe.toml",
                                                     "0001.json", "0001.png"]
    assert Image.open(out / "0001.png").size == (48, 32)
    meta = json.loads((out / "0001.json").read_text())
    assert meta["prompt"] == "a cat and a box" and meta["seed"] == 6 and meta["steps"] == 2
    assert meta["references"][0]["sha256"] == hashlib.sha256(open(refs[0], "rb").read()).hexdigest()
    assert meta["recipe"]["model"]["preset"] == "embedded"
    assert meta["recipe"]["sample"] == {"steps": 2, "guidance": 3.0, "image_guidance": 4.0, "height": 32, "width": 48,
                                        "num_images": 2, "seed": 5}
    # The written recipe reproduces the run: same command, same bytes.
    code, _, _ = _run(capsys, "generate", "--ref", refs[0], "--ref", refs[1], "a cat and a box", "--out",
                      str(out), "--recipe", str(out / "0000.recipe.toml"), "-q")
    assert code == 0
    assert (out / "0002.png").read_bytes() == (out / "0000.png").read_bytes()
    assert (out / "0003.png").read_bytes() == (out / "0001.png").read_bytes()


def test_generate_without_references_and_the_untrained_note(tmp_path, capsys):
    import shutil

    from psr.core.presets import EMBEDDED_DIR

    code, stdout, stderr = _run(capsys, "generate", "a star", "--out", str(tmp_path / "a"), "--steps", "1", "-q")
    assert code == 0 and stdout.strip().endswith("0000.png")
    assert json.loads((EMBEDDED_DIR / "psr_model.json").read_text())["trained"] is True
    assert "untrained" not in stderr                    # the shipped model is trained: no warning
    # A model folder whose card says it is untrained is named as such on stderr.
    untrained = tmp_path / "untrained"
    shutil.copytree(EMBEDDED_DIR, untrained)
    (untrained / "psr_model.json").write_text(json.dumps({"trained": False}))
    code, _, stderr = _run(capsys, "generate", "a star", "--out", str(tmp_path / "b"), "--steps", "1", "-q",
                           "--set", f"model.path={str(untrained)!r}")
    assert code == 0 and "untrained" in stderr


def test_weights_flag_loads_trained_weights_on_top(tmp_path, capsys):
    # The shipped folder's own transformer/ as `--weights`: the same numbers land in the
    # same model, so the image is byte-identical; a LoRA merge is tested in test_rl.
    from psr.core.presets import EMBEDDED_DIR

    argv = ["a star", "--steps", "1", "-q", "--seed", "3"]
    code, plain, _ = _run(capsys, "generate", *argv, "--out", str(tmp_path / "plain"))
    assert code == 0
    code, weighted, _ = _run(capsys, "generate", *argv, "--out", str(tmp_path / "w"), "--weights", str(EMBEDDED_DIR))
    assert code == 0
    assert Path(plain.split()[0]).read_bytes() == Path(weighted.split()[0]).read_bytes()
    # Other weights (the output projection zeroed: the velocity is 0, the image is the
    # decoded noise) give another image.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(EMBEDDED_DIR / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensors = {k: v.zero_() if k.startswith("proj_out") else v for k, v in tensors.items()}
    (tmp_path / "zeroed" / "transformer").mkdir(parents=True)
    save_file(tensors, str(tmp_path / "zeroed" / "transformer" / "diffusion_pytorch_model.safetensors"))
    code, other, _ = _run(capsys, "generate", *argv, "--out", str(tmp_path / "z"),
                          "--weights", str(tmp_path / "zeroed"))
    assert code == 0
    assert Path(plain.split()[0]).read_bytes() != Path(other.split()[0]).read_bytes()


def _bad_inputs(tmp_path, refs):
    text = tmp_path / "text.png"
    text.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    wrong_kind = tmp_path / "wrong.toml"
    wrong_kind.write_text('command = "synth"\n')
    typo = tmp_path / "typo.toml"
    typo.write_text('command = "generate"\n[model]\nprest = "tiny"\n')
    fifo = tmp_path / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    return {
        "missing reference": (["--ref", str(tmp_path / "nope.png"), "x"], "no such file"),
        "directory reference": (["--ref", str(tmp_path), "x"], "is a directory"),
        "not an image": (["--ref", str(text), "x"], "not an image"),
        "empty file": (["--ref", str(empty), "x"], "empty (0 bytes)"),
        "too many references": (["--ref", refs[0], "--ref", refs[1], "x", "--set", "model.max_references=1"],
                                "at most 1"),
        "empty prompt": (["--ref", refs[0], "   "], "prompt: must not be empty"),
        "unwritable output": (["x", "--out", str(blocker / "sub")], "cannot write there"),
        "output is a file": (["x", "--out", str(blocker)], "not a directory"),
        "unknown recipe key": (["x", "--recipe", str(typo)], "model.prest: unknown key (did you mean 'preset'?)"),
        "unknown key by --set": (["x", "--set", "sample.stepz=3"], "did you mean 'steps'?"),
        "unknown preset": (["x", "--set", "model.preset=flux"], "unknown preset 'flux'"),
        "missing recipe": (["x", "--recipe", str(tmp_path / "none.toml")], "no such file"),
        "recipe of another command": (["x", "--recipe", str(wrong_kind)], "'synth' recipe"),
        "bad size": (["x", "--size", "64by64"], "--size"),
        "size off the grid": (["x", "--size", "70"], "multiple of 8"),
        "bad flag value": (["x", "--steps", "many"], "--steps"),
        "zero steps": (["x", "--steps", "0"], "sample.steps: must be >= 1"),
        "bad device": (["x", "--device", "quantum"], "not a torch device"),
        "bad override": (["x", "--set", "novalue"], "expected KEY.PATH=VALUE"),
        "pretrained preset without path": (["x", "--set", "model.preset=flux-dev"], "needs a local directory"),
        "missing trained weights": (["x", "--weights", str(tmp_path / "run")],
                                    "model.weights " + str(tmp_path / "run") + ": no such file or folder"),
        "weights that are not weights": (["x", "--set", f"model.weights={str(tmp_path)!r}"],
                                         "not a checkpoint (state.json), a final/ folder"),
        "weights file that is text": (["x", "--weights", str(text)], "not a readable safetensors file"),
        "size too large": (["x", "--size", "100000"], "sample.height: must be <= 8192 pixels"),
        "too many steps": (["x", "--steps", "100000000000"], "sample.steps: must be <= 10000"),
        "steps not an integer": (["x", "--steps", "1e20"], "--steps"),
        "device as reference": (["--ref", "/dev/zero", "x"], "not a regular file"),
        "fifo as reference": (["--ref", str(fifo), "x"], "not a regular file"),
    }


BAD_INPUTS = [
    "missing reference", "directory reference", "not an image", "empty file", "too many references",
    "empty prompt", "unwritable output", "output is a file", "unknown recipe key", "unknown key by --set",
    "unknown preset", "missing recipe", "recipe of another command", "bad size", "size off the grid",
    "bad flag value", "zero steps", "bad device", "bad override", "pretrained preset without path",
    "missing trained weights", "weights that are not weights", "weights file that is text", "size too large",
    "too many steps", "steps not an integer", "device as reference", "fifo as reference"]


def test_bad_input_table_is_complete(tmp_path):
    assert sorted(_bad_inputs(tmp_path, ["a", "b"])) == sorted(BAD_INPUTS)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, refs, capsys, case):
    argv, message = _bad_inputs(tmp_path, refs)[case]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    code, stdout, stderr = _run(capsys, "generate", *argv, "-q")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psr: error: "), stderr
    assert message in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()  # checked before the folder is made, or removed again while empty


def test_two_runs_into_one_folder_keep_both_images(tmp_path, monkeypatch, capsys):
    # A second run starts while the first is writing its image: each must get its own
    # number, where choosing the number after generating gave both 0000 and lost one image.
    import psr.workflows.generate as gen

    out = tmp_path / "out"
    real_write, started = gen.write_atomic, []

    def write_while_another_run_starts(path, write):
        if not started:
            started.append(path)
            assert main(["generate", "a moon", "--out", str(out), "--steps", "1", "--seed", "7", "-q"]) == 0
        return real_write(path, write)
    monkeypatch.setattr(gen, "write_atomic", write_while_another_run_starts)
    assert main(["generate", "a star", "--out", str(out), "--steps", "1", "-q"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["0000.json", "0000.png", "0000.recipe.toml",
                                                     "0001.json", "0001.png", "0001.recipe.toml"]
    prompts = {json.loads((out / f"{n}.json").read_text())["prompt"] for n in ("0000", "0001")}
    assert prompts == {"a star", "a moon"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_write_the_system_refuses_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys, code):
    # A full disk or a folder made read-only while the model ran: the first image cannot be
    # written. Root ignores file permissions, so the refusal is simulated at the rename.
    real_replace = os.replace

    def refuse_images(src, dst):
        if str(dst).endswith(".png"):
            raise OSError(code, os.strerror(code), str(src))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", refuse_images)
    out = tmp_path / "out"
    out.mkdir()
    code_, stdout, stderr = _run(capsys, "generate", "a star", "--out", str(out), "--steps", "1", "-q")
    assert code_ == 2 and stdout == ""
    assert stderr == f"psr: error: cannot write {out / '0000.png'}: {os.strerror(code)}\n"
    assert list(out.iterdir()) == []  # no image, no sidecar, no recipe, no temporary file, no reservation


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, stderr = _run(capsys, "generate", "a star", "--out", str(out), "--steps", "1", "-q")
    finally:
        out.chmod(0o755)
    assert code == 2 and stderr.count("\n") == 1 and "cannot write there" in stderr


def test_an_os_error_naming_a_file_is_one_line_and_others_keep_their_traceback(monkeypatch, capsys):
    import psr.workflows.generate as gen

    def fails(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/out/0000.json")
    monkeypatch.setattr(gen, "run_generate", fails)
    assert main(["generate", "x", "-q"]) == 2
    assert capsys.readouterr().err == f"psr: error: /data/out/0000.json: {os.strerror(errno.EROFS)}\n"

    def bug(*args, **kwargs):
        raise OSError("a bug, not a file the system refused")
    monkeypatch.setattr(gen, "run_generate", bug)
    with pytest.raises(OSError, match="a bug"):
        main(["generate", "x", "-q"])


def test_quiet_also_silences_the_libraries_progress_bars(tmp_path, capsys):
    code, _, stderr = _run(capsys, "generate", "a star", "--out", str(tmp_path / "q"), "--steps", "1", "-q")
    assert code == 0 and "Loading" not in stderr and "%|" not in stderr, stderr
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # restored once the command ended


@pytest.mark.parametrize("setting, message", [
    ("sample.height=60", "sample.height 60: must be a multiple of 8"),
    ("model.preset='flux-dev'", "model.path: preset 'flux-dev' needs a local directory"),
    ("sample.width=9000", "sample.width: must be <= 8192 pixels"),
    ("sample.steps=100000", "sample.steps: must be <= 10000"),
])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_validate_refuses_what_the_command_refuses_before_loading(tmp_path, capsys, setting, message, command):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'command = "{command}"\n')
    assert _run(capsys, "validate", str(recipe))[0] == 0
    code, _, stderr = _run(capsys, "validate", str(recipe), "--set", setting)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr
    if command == "generate":  # the same words as the command itself
        code, _, stderr = _run(capsys, "generate", "x", "--out", str(tmp_path / "o"), "--set", setting, "-q")
        assert code == 2 and message in stderr


def test_validate(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('# psr generate --recipe good.toml "x"\ncommand = "generate"\n[sample]\nsteps = 4\n')
    assert _run(capsys, "validate", str(good))[0] == 0
    code, _, stderr = _run(capsys, "validate", str(good), "--set", "sample.steps=-1")
    assert code == 2 and "sample.steps: must be >= 1" in stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('command = "generat"\n')
    code, _, stderr = _run(capsys, "validate", str(bad))
    assert code == 2 and "did you mean 'generate'?" in stderr


def test_presets_lists_every_preset(capsys):
    from psr.core.presets import PRESETS

    code, stdout, _ = _run(capsys, "presets")
    assert code == 0 and [line.split()[0] for line in stdout.splitlines()] == list(PRESETS)


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    # Typer turns a KeyboardInterrupt into an exit code it returns (not raises) outside
    # standalone mode; a long job stopped by Ctrl-C must not report success.
    import psr.fit.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(psr.fit.loop, "run_fit", interrupted)
    assert main(["fit", "--recipe", str(ROOT / "recipes" / "fit-toy-vae.toml"), "--out", str(tmp_path / "vae")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "psr: interrupted"


def test_no_command_is_one_line_naming_what_is_missing(capsys):
    from psr.cli import main

    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "psr: error: no command given; choose one of the commands listed above"
