"""The first failures a new user meets with the CLI (issue 22), against real servers on port 0: a folder
with a bad file, a server without a model, the REST port given as --target, and argument errors of
`fovea train` / `fovea serve` reported before TensorFlow is imported."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import serving, start_server, stop_server
from conftest import subprocess_env
from fovea.cli import main as cli_main
from PIL import Image


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, "tiny", 16)
    with serving(models) as srv:
        yield srv


def test_a_folder_with_bad_files_answers_the_good_ones_and_names_the_bad(server, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]):
        (folder / f"img{i}.png").write_bytes(_png(color))
    # A JPEG cut short, the case: its header reads well, so only the server's decoder can tell,
    # as images[i] of a request holding the others too.
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, format="JPEG")
    (folder / "img1.png").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    # Not an image at all: the client's own check names it before anything is sent.
    (folder / "notes.jpg").write_text("not an image")

    rc = cli_main(["predict", "--target", f"127.0.0.1:{server.port}", str(folder)])
    out, err = capsys.readouterr()
    print(out, err, sep="\n")
    assert rc == 1
    answered = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert answered == [str(folder / f"img{i}.png") for i in (0, 2, 3)]
    assert f"{folder / 'img1.png'} could not be decoded" in err
    assert f"{folder / 'notes.jpg'}: not a JPEG, PNG, GIF or BMP image" in err
    assert "images[" not in err
    assert "2 of 5 images could not be classified" in err


def test_predict_against_a_server_without_a_model_fails_at_once(tmp_path, capsys) -> None:
    srv = start_server(tmp_path / "empty")
    try:
        (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
        rc = cli_main(
            ["predict", "--timeout", "60", "--target", f"127.0.0.1:{srv.port}", str(tmp_path / "a.png")]
        )
    finally:
        stop_server(srv)
    err = capsys.readouterr().err
    print(err)
    assert rc == 1
    # Not retried until the 60 s deadline: the error is the server's answer, not DEADLINE_EXCEEDED.
    assert "the server has no model loaded" in err and "not retried" in err, err
    assert "DEADLINE_EXCEEDED" not in err


def test_the_rest_port_as_target_says_so(server, tmp_path, capsys) -> None:
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    rc = cli_main(["predict", "--target", f"127.0.0.1:{server.http_port}", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    print(err)
    assert rc == 1
    assert f"cannot connect to 127.0.0.1:{server.http_port}: it answers HTTP/1.x, not gRPC" in err, err
    assert "that is likely the REST port" in err and "8500" in err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["train", "--data", "d", "--models", "m", "--input-size", "7"], "--input-size must be at least 32"),
        (["serve", "--model-dir", "m", "--port", "abc"], "--port: cannot read 'abc'"),
    ],
)
def test_argument_errors_come_before_tensorflow_is_imported(command, message) -> None:
    # The child reports whether TensorFlow was imported by the time the CLI gave its error.
    code = (
        "import sys; from fovea.cli import main; rc = main(sys.argv[1:]); "
        "print('tensorflow imported:', 'tensorflow' in sys.modules); sys.exit(rc)"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, *command],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    print(f"fovea {command[0]} argument error took {time.monotonic() - start:.2f} s: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert done.stdout.strip() == "tensorflow imported: False"
