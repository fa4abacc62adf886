"""`fusar-edge serve` through its real HTTP socket on loopback."""

import base64
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from fusar_edge.cli import main
from fusar_edge.data.synth import sample_scene
from fusar_edge.runtime import Runtime
from fusar_edge.serve.app import ServeSettings, build_app

TOKEN = "s3cret-token-0123456789"


class Served:
    """A uvicorn server on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app, graceful_s: float = 30):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=graceful_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    s = sample_scene(root / "allowed", seed=4)
    (root / "secret.txt").write_text("not for clients")
    return s, root


@pytest.fixture(scope="module")
def runtime(scene):
    s, _ = scene
    return Runtime.open(tiles=s["tiles"], threads=1)


@pytest.fixture(scope="module")
def served(runtime, scene):
    _, root = scene
    srv = Served(build_app(runtime, ServeSettings(token=TOKEN, allow_dirs=[root / "allowed"], workers=2,
                                                  max_upload_bytes=1 << 20)))
    yield srv
    srv.stop()


def client(srv, token=TOKEN):
    return httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {token}"} if token else {})


def test_ask_answers_as_the_runtime_does(served, runtime, scene):
    s, _ = scene
    want = runtime.ask(s["scene_tif"], "How many ships are there in this image?")
    with client(served) as c, open(s["scene_tif"], "rb") as f:
        r = c.post("/v1/ask", files={"image": ("scene.tif", f, "image/tiff")},
                   data={"question": "How many ships are there in this image?"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["text"] == want.text and got["answer"] == want.answer and got["token_ids"] == want.token_ids
        assert got["image"]["path"] == "scene.tif"  # never the server's temporary file
        assert got["anchor"]["tlm"] == "applied"
        # the same scene by path under --allow-dir, with an explicit anchors upload
        with open(s["anchors"], "rb") as a:
            r = c.post("/v1/ask", files={"anchors": ("anchors.npz", a)},
                       data={"path": "scene.tif", "question": "How many ships are there in this image?"})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want.text
        assert r.json()["anchor"]["source"] == "file:anchors.npz"  # the client's name, not the server's copy


def test_chat_completions_is_openai_shaped(served, runtime, scene):
    s, _ = scene
    want = runtime.ask(s["scene_tif"], "Where is the ship in this image?")
    url = "data:image/tiff;base64," + base64.b64encode(open(s["scene_tif"], "rb").read()).decode()
    body = {"model": "demo", "temperature": 0.7, "n": None, "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Where is the ship in this image?"},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}
    with client(served) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == want.text
    assert out["usage"]["completion_tokens"] == len(want.token_ids) and out["usage"]["prompt_tokens"] > 64
    assert out["fusar"]["answer"] == want.answer


def test_bad_requests_are_json_naming_the_field(served, scene):
    s, root = scene
    tif = open(s["scene_tif"], "rb").read()
    with client(served) as c:
        cases = [
            (c.post("/v1/ask", data={"question": "How many ships?"}), 422, "image"),
            (c.post("/v1/ask", files={"image": ("x.tif", tif)}), 422, "question"),
            (c.post("/v1/ask", files={"image": ("x.tif", tif)}, data={"question": "q", "bbox": "1,2,3"}), 422, "bbox"),
            (c.post("/v1/ask", files={"image": ("x.exe", tif)}, data={"question": "q"}), 422, "image"),
            (c.post("/v1/ask", data={"question": "q", "path": "../secret.txt"}), 403, "path"),
            (c.post("/v1/ask", data={"question": "q", "path": str(root / "secret.txt")}), 403, "path"),
            (c.post("/v1/ask", files={"image": ("x.tif", b"not a tiff")}, data={"question": "q"}), 422, None),
            (c.post("/v1/ask", files={"image": ("x.tif", tif)}, data={"question": "q", "max_new_tokens": "100000"}),
             422, "max_new_tokens"),
            (c.post("/v1/ask", files={"image": ("x.tif", tif)}, data={"question": "q", "task": "dance"}), 422, "task"),
            (c.post("/v1/ask", data={"question": "q", "path": "scene\x00.tif"}), 422, "path"),
            (c.post("/v1/ask", data={"question": "q", "path": "a" * 5000}), 422, "path"),
            (c.post("/v1/ask", data={"question": "q", "image": "not a file"}), 422, "image"),
            (c.post("/v1/ask", json={"question": "q", "path": "scene.tif"}), 422, None),
            (c.post("/v1/ask", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"}),
             400, None),
            (c.get("/v1/ask"), 405, None),
            (c.post("/v1/chat/completions", json={"no_anchors": "false", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}),
             422, "no_anchors"),
            (c.post("/v1/chat/completions", content=b"{oops"), 400, None),
            (c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 422,
             "messages[0].content"),
            (c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
             422, "messages[0].content[1].image_url.url"),
            (c.post("/v1/ask", files={"image": ("big.tif", b"0" * (2 << 20))}, data={"question": "q"}), 413, None),
            (c.get("/v2/nothing"), 404, None),
        ]
        for r, status, param in cases:
            assert r.status_code == status, (r.request.url, r.text)
            err = r.json()["error"]
            assert err["message"] and "Traceback" not in r.text and "fusar-serve-" not in err["message"]
            if param:
                assert err["param"] == param and err["message"].startswith(param.split("[")[0]), err
        assert "secret" not in json.dumps([r.json() for r, _, _ in cases]).replace("secret.txt", "")
        assert "multipart/form-data" in cases[[r.request.method == "POST" and r.request.headers.get(
            "content-type") == "application/json" and r.request.url.path == "/v1/ask" for r, _, _ in cases].index(True)][0].text
        for i in range(3):  # made-up routes all count as one series, never one each
            c.get(f"/random-{i}")
        text = c.get("/metrics").text
        assert "/random-" not in text and "/v2/nothing" not in text and 'route="other"' in text
    with client(served, token=None) as c:
        r = c.post("/v1/ask", data={"question": "q", "path": "scene.tif"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/healthz").status_code == 200  # liveness needs no token
    with client(served, token="wrong-token-0123456789") as c:
        assert c.get("/metrics").status_code == 401


def test_metrics_count_requests_and_stages(served):
    with client(served) as c:
        text = c.get("/metrics").text
    assert 'fusar_requests_total{code="200",route="/v1/ask"}' in text
    assert 'fusar_stage_seconds_count{stage="vision"}' in text and "fusar_queue_depth 0.0" in text
    assert 'fusar_errors_total{kind="permission_error",route="/v1/ask"}' in text


class SlowRuntime:
    """Stands in for a model that takes ``delay`` seconds per question (pool and HTTP behaviour only)."""

    source, weights, backend = "slow", "none", "torch"
    config = SimpleNamespace(max_new_tokens=8)

    def __init__(self, delay):
        self.delay, self.started = delay, threading.Event()

    def ask(self, image, question, **kwargs):
        self.started.set()
        time.sleep(self.delay)
        return SimpleNamespace(text="3", answer=3, timings_ms={"total": self.delay * 1e3},
                               model={"new_tokens": 1, "max_new_tokens": 8}, to_json=lambda: {
                                   "answer": 3, "text": "3", "image": {"path": str(image)}})


def _post_small_ask(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        return c.post("/v1/ask", files={"image": ("x.png", b"png")}, data={"question": "q"})


def _ask_in_background(srv, slow):
    """Start one question in a thread and wait until the runtime is busy with it; -> (thread, results)."""
    results = {}
    t = threading.Thread(target=lambda: results.update(r=_post_small_ask(srv)))
    t.start()
    assert slow.started.wait(10)
    return t, results


def test_a_question_without_anchors_says_how_a_client_gives_them(scene):
    """No --tiles on the server and no anchors in the request: 422 on the anchors field, with the
    client's three ways (an anchors part, a server with --tiles, no_anchors) rather than CLI flags."""
    s, _ = scene
    with Runtime.open(threads=1) as rt:  # the built-in demo applies TLM; no tile store
        srv = Served(build_app(rt, ServeSettings(workers=1)))
        try:
            with client(srv, token=None) as c:
                files = {"image": ("mine.tif", open(s["scene_tif"], "rb").read())}
                r = c.post("/v1/ask", files=files, data={"question": "How many ships are there?"})
                err = r.json()["error"]
                assert r.status_code == 422 and err["param"] == "anchors" and err["message"].startswith("anchors: mine.tif")
                assert "anchors=@" in err["message"] and "--tiles" in err["message"] and "no_anchors" in err["message"]
                with open(s["anchors"], "rb") as f:
                    ok = c.post("/v1/ask", files={**files, "anchors": ("a.npz", f.read())},
                                data={"question": "How many ships are there?"})
                assert ok.status_code == 200 and ok.json()["anchor"]["tlm"] == "applied"
        finally:
            srv.stop()


def test_full_queue_is_503_with_retry_after_and_slow_answers_time_out():
    slow = SlowRuntime(delay=1.5)
    srv = Served(build_app(slow, ServeSettings(workers=1, max_queue=0, timeout_s=0.5)))
    try:
        t, first = _ask_in_background(srv, slow)
        busy = _post_small_ask(srv)
        t.join()
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2" and busy.json()["error"]["type"] == "overloaded"
        assert first["r"].status_code == 504 and "--timeout" in first["r"].json()["error"]["message"]
    finally:
        srv.stop()


def test_shutdown_finishes_the_question_in_flight():
    slow = SlowRuntime(delay=1.0)
    srv = Served(build_app(slow, ServeSettings(workers=1, timeout_s=30)))
    t, results = _ask_in_background(srv, slow)
    srv.stop()  # like SIGTERM: stop taking requests, finish the admitted one
    t.join()
    assert results["r"].status_code == 200 and results["r"].json()["answer"] == 3


def test_an_upload_stalled_at_shutdown_is_told_503_in_json():
    """Past the graceful-shutdown time uvicorn cancels what still runs; a client whose upload stalled
    is told the server is stopping (503, Retry-After, the API's JSON), not a plain-text 500."""
    srv = Served(build_app(SlowRuntime(delay=0.01), ServeSettings()), graceful_s=1)
    port = int(srv.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n"
                     b"q\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n" + b"0" * 1000)
        time.sleep(0.3)  # the request is in; the rest of its body never comes
        srv.server.should_exit = True
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    srv.thread.join(timeout=60)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 2" in head.lower(), data
    error = json.loads(body)["error"]
    assert error["type"] == "unavailable" and "server stopping" in error["message"]


def test_serve_checks_its_flags_before_loading_a_model(tmp_path, capsys):
    short = tmp_path / "token"
    short.write_text("abc\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for argv, words in [(["--port", "70000"], ["--port", "65535"]),
                        (["--token-file", str(tmp_path / "none")], ["--token-file"]),
                        (["--token-file", str(short)], ["at least 16"]),
                        (["--allow-dir", str(tmp_path / "nodir")], ["--allow-dir", "not a directory"]),
                        (["--workers", "0"], ["--workers"]),
                        (["--max-queue", "-1"], ["--max-queue", "0 or more"]),
                        (["--batch", "4", "--workers", "2"], ["--batch 4", "--workers"]),
                        (["--max-upload-mb", "inf"], ["--max-upload-mb"]),
                        (["--timeout", "nan"], ["--timeout"]),
                        (["--port", str(busy.getsockname()[1])], ["--port", "cannot listen"])]:
        assert main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (argv, err)
    busy.close()


def test_a_chunked_body_over_the_limit_is_413():
    """No Content-Length to refuse by: the limit counts the bytes as they arrive."""
    srv = Served(build_app(SlowRuntime(delay=0.01), ServeSettings(max_upload_bytes=100_000)))

    def body():
        yield (b'--b\r\nContent-Disposition: form-data; name="question"\r\n\r\nq\r\n--b\r\n'
               b'Content-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n')
        for _ in range(50):
            yield b"0" * 10_000
        yield b"\r\n--b--\r\n"

    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/ask", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
            assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
            assert c.get("/healthz").status_code == 200  # the server is fine afterwards
    finally:
        srv.stop()
