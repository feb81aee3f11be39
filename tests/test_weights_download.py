"""A recipe's missing reference checkpoint is downloaded into paths.weights_dir with its published hash checked, whole
or not at all; offline, a hash mismatch or downloads turned off give the one-line message. Served by a local HTTP
server, never the internet."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF
from vtrain.config import ConfigError
from vtrain.config.validate import check_pretrained, check_values
from vtrain.training.pretrained import download_weights, published_hash

CONTENT = b"reference weights " * 1000


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/cut/"):  # the connection drops a tenth of the way through the file
            self.send_response(200)
            self.send_header("Content-Length", str(len(CONTENT)))
            self.end_headers()
            self.wfile.write(CONTENT[: len(CONTENT) // 10])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test's output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served on localhost; ``requests`` lists the paths asked for."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(CountingHandler, directory=str(served)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.served, httpd.url = served, f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def recipe(weights_dir: Path, url: str, download: bool = True):
    """The keys check_pretrained reads, as a recipe sets them (``pretrained: ${paths.weights_dir}/<file name>``)."""
    return OmegaConf.create({
        "paths": {"weights_dir": str(weights_dir), "download_weights": download},
        "pretrained": "${paths.weights_dir}/" + Path(url).name, "pretrained_url": url, "ckpt_path": None,
    })


def leftovers(directory: Path) -> list[str]:
    """Files of a download other than its result and its lock: temporary or partial files."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock") and not p.suffix == ".pth")


def test_the_hash_is_the_one_a_published_file_name_carries():
    """torch.hub's convention (HASH_REGEX): the hex digits after the last '-' of the file name."""
    assert published_hash("https://download.pytorch.org/models/resnet50-0676ba61.pth") == "0676ba61"
    assert published_hash("https://download.openmmlab.com/pretrain/third_party/resnext101_32x4d-a5af3160.pth") \
        == "a5af3160"
    assert published_hash("https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                          "swin_tiny_patch4_window7_224.pth") is None


def test_a_missing_file_is_downloaded_with_its_hash_checked(server, tmp_path, capsys):
    digest = hashlib.sha256(CONTENT).hexdigest()
    name = f"tiny-{digest[:8]}.pth"
    (server.served / name).write_bytes(CONTENT)
    weights = tmp_path / "weights"
    cfg = recipe(weights, f"{server.url}/{name}")
    check_pretrained(cfg, download_weights)
    assert (weights / name).read_bytes() == CONTENT and leftovers(weights) == []
    assert server.requests == [f"/{name}"]
    assert "100%" in capsys.readouterr().err  # torch.hub's progress bar, on stderr
    check_pretrained(cfg, download_weights)  # there now: not asked for again
    assert server.requests == [f"/{name}"]


def test_a_hash_mismatch_is_refused_and_the_file_removed(server, tmp_path):
    digest = hashlib.sha256(CONTENT).hexdigest()
    claimed = "0123abcd"
    assert not digest.startswith(claimed)
    name = f"tiny-{claimed}.pth"
    (server.served / name).write_bytes(CONTENT)
    weights = tmp_path / "weights"
    with pytest.raises(ConfigError) as raised:
        check_pretrained(recipe(weights, f"{server.url}/{name}"), download_weights)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"pretrained={weights}/{name} does not exist (hash mismatch: "
                                                       f"expected {claimed} got {digest}, file removed): download it "
                                                       f"from {server.url}/{name} into paths.weights_dir={weights}")
    assert not (weights / name).exists() and leftovers(weights) == []


def test_server_down_gives_the_one_line_message(tmp_path):
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tiny-0123abcd.pth"
    weights = tmp_path / "weights"
    with pytest.raises(ConfigError) as raised:
        check_pretrained(recipe(weights, url), download_weights)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"pretrained={weights}/tiny-0123abcd.pth does not exist (its "
                                                       f"download from {url} failed: [Errno 111] Connection refused)")
    assert message.endswith(f": download it from {url} into paths.weights_dir={weights} (or set VTRAIN_WEIGHTS), or "
                            "pass pretrained=null to train from scratch on purpose")
    assert not (weights / "tiny-0123abcd.pth").exists() and leftovers(weights) == []


def test_a_download_cut_short_leaves_nothing(server, tmp_path):
    """Written whole or not at all: a file without a published hash too (a Swin release's name)."""
    weights = tmp_path / "weights"
    url = f"{server.url}/cut/swin_tiny_patch4_window7_224.pth"
    with pytest.raises(ConfigError) as raised:
        check_pretrained(recipe(weights, url), download_weights)
    assert str(raised.value).startswith(f"pretrained={weights}/swin_tiny_patch4_window7_224.pth does not exist (its "
                                        f"download from {url} ended after {len(CONTENT) // 10} of {len(CONTENT)} "
                                        f"bytes, file removed): download it from {url}")
    assert "\n" not in str(raised.value)
    assert not (weights / "swin_tiny_patch4_window7_224.pth").exists() and leftovers(weights) == []


def test_a_weights_directory_that_cannot_be_written_is_one_line(server, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the weights directory should be
    with pytest.raises(ConfigError, match=r"^pretrained=.*/file/tiny-0123abcd.pth does not exist \(it cannot be "
                                          r"downloaded into .*/file: File exists\): download it from "):
        check_pretrained(recipe(blocked, f"{server.url}/tiny-0123abcd.pth"), download_weights)
    assert server.requests == []


def test_a_present_file_or_downloads_turned_off_ask_nothing(server, tmp_path):
    name = "tiny-0123abcd.pth"
    (server.served / name).write_bytes(CONTENT)
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(ConfigError) as raised:  # today's message, word for word
        check_pretrained(recipe(weights, f"{server.url}/{name}", download=False), download_weights)
    assert str(raised.value) == (f"pretrained={weights}/{name} does not exist: download it from {server.url}/{name} "
                                 f"into paths.weights_dir={weights} (or set VTRAIN_WEIGHTS), or pass pretrained=null "
                                 "to train from scratch on purpose")
    (weights / name).write_bytes(b"a file of the user's own")  # present: kept as it is, whatever its hash
    check_pretrained(recipe(weights, f"{server.url}/{name}"), download_weights)
    assert (weights / name).read_bytes() == b"a file of the user's own" and server.requests == []


def test_processes_that_start_together_download_once(server, tmp_path):
    """torchrun and SLURM start every rank's validation at once: one downloads, the others wait and find the file."""
    name = f"tiny-{hashlib.sha256(CONTENT).hexdigest()[:8]}.pth"
    (server.served / name).write_bytes(CONTENT)
    weights = tmp_path / "weights"
    results = []
    threads = [threading.Thread(target=lambda: results.append(download_weights(f"{server.url}/{name}",
                                                                                weights / name))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [None] * 3 and server.requests == [f"/{name}"]
    assert (weights / name).read_bytes() == CONTENT


def test_downloads_are_on_unless_turned_off_by_config_or_environment(monkeypatch):
    paths = OmegaConf.load(CONF / "paths" / "default.yaml")  # the group every config composes (test_configs)
    monkeypatch.delenv("VTRAIN_DOWNLOAD_WEIGHTS", raising=False)
    assert paths.download_weights is True
    monkeypatch.setenv("VTRAIN_DOWNLOAD_WEIGHTS", "false")
    assert paths.download_weights is False
    monkeypatch.setenv("VTRAIN_DOWNLOAD_WEIGHTS", "no")
    with pytest.raises(ConfigError, match=r"^paths.download_weights='no' is not true or false .*: use e.g. "
                                          r"paths.download_weights=false$"):
        check_values(OmegaConf.create({"paths": paths}))
