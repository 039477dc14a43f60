"""`motif-video serve` refuses bad settings with one error line and exit code 2, before loading any model."""

from __future__ import annotations

import socket

import pytest

from motif_video.cli import main as cli_main


@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "port must be within"),
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--memory-fraction", "1.5"], "--memory-fraction"),
    (["--lora-dir", "no-such-folder"], "is not a folder"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_bad_settings_exit_2_with_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["serve", "--data-dir", str(tmp_path / "data"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_a_port_in_use_is_an_error(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_one_server_per_data_dir(tmp_path):
    from motif_video.commands.serve import _lock_data_dir
    from motif_video.errors import MotifVideoError

    held = _lock_data_dir(tmp_path)
    try:
        with pytest.raises(MotifVideoError, match=r"another server \(pid \d+\) is using"):
            _lock_data_dir(tmp_path)
    finally:
        held.close()
    _lock_data_dir(tmp_path).close()  # free again once its holder lets go
