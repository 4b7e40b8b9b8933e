"""Finding the FID weights: explicit path, cache, one-time download with a checksum, and a fast, clear failure."""

import hashlib
import http.server
import threading
import time

import pytest

from lzn_jax.evaluation import inception_weights as weights
from lzn_jax.evaluation.inception_weights import InceptionWeightsError, fetch_weights


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LZN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_no_file_and_no_network_fails_within_seconds_saying_where_to_get_it_and_put_it(cache):
    start = time.monotonic()
    # Port 9 on loopback: nothing listens, the connection is refused at once (as an offline machine does).
    with pytest.raises(InceptionWeightsError) as error:
        fetch_weights(url="http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth", timeout=5)
    assert time.monotonic() - start < 6
    message = str(error.value)
    assert weights.FID_WEIGHTS_URL in message
    assert str(cache / weights.FID_WEIGHTS_FILENAME) in message and "LZN_CACHE" in message
    assert not any(cache.glob("*.part"))  # no partial file is left behind


def test_downloads_off_or_a_wrong_path_fail_at_once(cache, tmp_path):
    with pytest.raises(InceptionWeightsError, match="downloads are off"):
        fetch_weights(download=False)
    with pytest.raises(InceptionWeightsError, match="no file at"):
        fetch_weights(tmp_path / "nowhere.pth")


def test_cache_dir_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LZN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / ".cache" / "lzn_jax"


def test_download_lands_in_the_cache_once_and_is_checked(cache, tmp_path):
    content = b"weights of the test" * 1000
    digest = hashlib.sha256(content).hexdigest()
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/w.pth"
        path, got = fetch_weights(url=url, sha256=digest)
        assert path == cache / weights.FID_WEIGHTS_FILENAME and path.read_bytes() == content and got == digest
        fetch_weights(url=url, sha256=digest[:8])  # cached: no second request
        assert served == ["/w.pth"]
    finally:
        server.shutdown()
        thread.join()
    # The cached file is checked against the published prefix by default: this one is not the real file.
    with pytest.raises(InceptionWeightsError, match="expected one starting with 6726825d"):
        fetch_weights()
    with pytest.raises(InceptionWeightsError, match="SHA-256"):
        fetch_weights(path, sha256="0" * 64)
