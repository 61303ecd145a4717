"""Shards from anywhere webdataset reads: the digits shards served over HTTP by a server on
127.0.0.1 that the tests start, through ``pipe:cat`` and as ``file:`` URLs give the local batches
(training, evaluation, 2 workers, 2 ranks, mid-epoch resume, the cache); the index is read from the
same place; a truncated or cut-off remote shard, a failing pipe command and a missing index are
errors that name the URL (and the command's stderr)."""

import functools
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_data_cache import assert_same, run
from test_datamodule import attach, rows
from test_shard_verify import cut_to_first_half

from lightning_diffusion.data import ShardDataModule, ShardError, ensure_embedded, verify_shards
from lightning_diffusion.data.shards import remote_shard_url

pytestmark = pytest.mark.usefixtures("one_thread")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="webdataset reads http(s) URLs with curl, which is not installed")
TRAIN = "train-{000000..000005}.tar"  # the digits' 6 training shards


class _Handler(SimpleHTTPRequestHandler):
    """Serves the server's directory, counts the requests per path and serves ``digits/`` under
    other names: ``/lying/`` sends half of a shard after announcing all of it (a transfer cut off
    mid-way); ``/stalling/`` sends half of a shard, then nothing for 5 s with the connection open;
    ``/flaky/`` answers the first request of an index with 503 and cuts the first transfer of a
    shard off half-way (later requests are served)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests[self.path] += 1
        mode, _, rest = self.path[1:].partition("/")
        if mode == "flaky" and self.server.requests[self.path] == 1 and rest == "index.json":
            self.send_error(503)
            return
        if rest.endswith(".tar") and (mode in ("lying", "stalling") or
                                      mode == "flaky" and self.server.requests[self.path] == 1):
            data = (self.server.root / "digits" / rest).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            if mode == "stalling":
                time.sleep(5)
            self.close_connection = True
            return
        if mode in ("lying", "stalling", "flaky"):
            self.path = "/digits/" + rest
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the directory served, its URL): ``digits/`` holds a copy of the embedded digits shards
    (written by write_shards), ``lying/`` serves them cut off mid-transfer."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(ensure_embedded("digits"), root / "digits")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.root, server.requests = root, Counter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """curl must reach the test's server directly, whatever proxy the environment sets."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def _forms(root, base):
    """(dataset, train pattern, val pattern) of each URL form, all of the same digits shards."""
    local = root / "digits"
    cat = f"pipe:cat {shlex.quote(str(local))}/"
    return {
        "http-directory": (f"{base}/digits", None, None),
        "http-index": (f"{base}/digits/index.json", None, None),
        "http-patterns": (f"{base}/digits/", f"{base}/digits/{TRAIN}", f"{base}/digits/val-000000.tar"),
        "pipe-index": (f"{cat}index.json", None, None),
        "pipe-patterns": (None, cat + TRAIN, f"{cat}val-000000.tar"),
        "file": (f"file:{local}", None, None),
        "file-patterns": (None, f"file:{local}/{TRAIN}", f"file://{local}/val-000000.tar"),
    }


@pytest.mark.parametrize("form", ["http-directory", "http-index", "http-patterns", "pipe-index", "pipe-patterns",
                                  "file", "file-patterns"])
def test_every_url_form_gives_the_local_batches(served, form):
    root, base, _ = served
    if form.startswith("http") and shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) URLs with curl, which is not installed")
    dataset, train, val = _forms(root, base)[form]
    options = dict(batch_size=128, cache=False, random_flip=True, num_classes=10)
    if dataset is None:  # patterns alone: no index, so no count
        options["batches_per_epoch"] = 12
    dm = attach(ShardDataModule(dataset, train=train, val=val, **options), 0, 1)
    local = attach(ShardDataModule(str(root / "digits"), **options), 0, 1)
    assert (dm.data_shape, dm.num_classes, len(dm.urls["train"])) == ((1, 8, 8), 10, 6)
    if not form.startswith("file"):  # a file: dataset reads its shards as local paths
        assert dm.urls["train"][0].startswith(form.split("-")[0])
    assert_same(run(dm, 2)[0], run(local, 2)[0])
    assert_same([list(dm.val_dataloader())], [list(local.val_dataloader())])


@needs_curl
def test_two_ranks_two_workers_read_every_remote_sample_once(served):
    root, base, _ = served
    seen = []
    for rank in range(2):
        dm = attach(ShardDataModule(f"{base}/digits", batch_size=32, num_workers=2, multiprocessing_context="fork",
                                    cache=False), rank, 2)
        seen += [("train", r) for r in rows(dm.eval_dataloader("train"))]  # 6 shards: shard-level split
        seen += [("val", r) for r in rows(dm.val_dataloader())]  # 1 shard: sample-level split
    local = ShardDataModule(str(root / "digits"), batch_size=2000)
    expected = [(s, r) for s in ("train", "val") for r in rows(local.eval_dataloader(s))]
    assert len(seen) == len(expected) == 1437 + 180
    assert sorted(seen) == sorted(expected)


@needs_curl
def test_mid_epoch_resume_from_the_http_stream_is_exact(served):
    root, base, _ = served
    options = dict(batch_size=64, num_workers=2, multiprocessing_context="fork", shuffle_buffer=100,
                   random_flip=True, seed=5, cache=False)
    straight, _ = run(attach(ShardDataModule(str(root / "digits"), **options), 1, 2), 3)
    resumed, _ = run(attach(ShardDataModule(f"{base}/digits", **options), 1, 2), 1, resume=(1, 5))
    assert len(straight[1]) == 12 and len(resumed[-1]) == 7
    assert_same([straight[0]], [resumed[0]])
    assert_same([straight[1][5:]], [resumed[-1]])  # epoch 1 from its 6th batch on, as if never stopped


@needs_curl
def test_remote_shards_are_cached_by_url_and_read_once(served):
    root, base, server = served
    dm = attach(ShardDataModule(f"{base}/digits", batch_size=128), 0, 1)
    assert dm.caches("train") and dm.caches("val")  # auto: the sizes the index records are small
    server.requests.clear()
    cached, loader = run(dm, 8)
    reads = {p: n for p, n in server.requests.items() if p.startswith("/digits/train-")}
    assert reads and max(reads.values()) == 1 and len(loader.dataset.cache) == len(reads)
    assert_same(cached, run(attach(ShardDataModule(str(root / "digits"), batch_size=128, cache=False), 0, 1), 8)[0])


@needs_curl
def test_a_truncated_remote_shard_is_named_with_its_url(served):
    root, base, _ = served
    shutil.copytree(root / "digits", root / "cut", dirs_exist_ok=True)
    shard = root / "cut" / "val-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:data.find(b"\x89PNG", len(data) // 2) + 40])  # inside a PNG's bytes
    # the server announces the cut size (Content-Length): refused before the first sample
    with pytest.raises(ShardError, match=rf"shard {base}/cut/val-000000\.tar is announced by the server as "
                                         rf"\d+ bytes, but {base}/cut/index\.json records {len(data)}: it is truncated"):
        list(ShardDataModule(f"{base}/cut", batch_size=64).val_dataloader())
    size = (root / "cut" / "test-000000.tar").stat().st_size
    cut_to_first_half(root / "cut" / "test-000000.tar")  # a valid tar of fewer samples
    cut = (root / "cut" / "test-000000.tar").stat().st_size
    with pytest.raises(ShardError, match=rf"shard {base}/cut/test-000000\.tar is announced by the server as {cut} "
                                         rf"bytes, but {base}/cut/index\.json records {size}: it is truncated"):
        list(ShardDataModule(f"{base}/cut", batch_size=64, verify=False).test_dataloader())
    # the server announces the whole shard and sends half: curl's partial transfer
    with pytest.raises(ShardError, match=rf"shard {base}/lying/val-000000\.tar could not be read: `curl` exited "
                                         r"with status 18 \(partial transfer"):
        list(ShardDataModule(f"{base}/lying", batch_size=64, retries=0).val_dataloader())


@needs_curl
def test_verify_shards_reads_a_remote_dataset_and_names_a_bad_shard(served):
    root, base, _ = served
    verify_shards(f"{base}/digits")
    verify_shards(f"pipe:cat {root / 'digits' / 'index.json'}")
    shutil.copytree(root / "digits", root / "tampered", dirs_exist_ok=True)
    shard = root / "tampered" / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a sample
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{base}/tampered/train-000003\.tar"):
        verify_shards(f"{base}/tampered")


def test_a_failing_pipe_is_named_with_its_stderr(served):
    root, _, _ = served
    fail = "pipe:sh -c 'echo boom >&2; exit 3'"
    with pytest.raises(ShardError, match=rf"shard {fail} could not be read: the command `sh -c 'echo boom >&2; "
                                         r"exit 3'` exited with status 3; its stderr: boom"):
        ShardDataModule(None, train=fail)  # the first sample is read at construction
    with pytest.raises(ShardError, match=r"shard pipe:false could not be read: .*`false` exited with status 1"):
        ShardDataModule(None, train="pipe:false")
    # a whole, valid tar on stdout, then a failure: the exit status still counts
    late = f"pipe:cat {root / 'digits' / 'val-000000.tar'}; echo late >&2; exit 4"
    with pytest.raises(ShardError, match=r"val-000000\.tar; echo late >&2; exit 4 could not be read: .*status 4; "
                                         r"its stderr: late"):
        list(ShardDataModule(None, val=late, batch_size=64, num_classes=10).val_dataloader())


def test_a_missing_remote_index_is_named_before_training(served):
    root, base, _ = served
    with pytest.raises(OSError, match=r"no shard index: cannot read pipe:cat /nonexistent/index\.json: .*status 1; "
                                      r"its stderr: cat: /nonexistent/index\.json: No such file"):
        ShardDataModule("pipe:cat /nonexistent/index.json")
    with pytest.raises(ValueError, match=r"dataset 'pipe:cat /data/x\.tar' is a command that does not read "
                                         r"index\.json"):
        ShardDataModule("pipe:cat /data/x.tar")
    if shutil.which("curl") is not None:
        with pytest.raises(OSError, match=rf"no shard index: cannot read {base}/nope/index\.json: `curl` exited "
                                          r"with status 22 \(the server answered with an HTTP error"):
            ShardDataModule(f"{base}/nope/")


def test_without_curl_http_is_named_with_what_to_install(served, monkeypatch):
    root, base, _ = served
    monkeypatch.setenv("PATH", str(root))  # no curl there
    with pytest.raises(OSError, match=rf"no shard index: webdataset reads {base}/digits/index\.json with `curl`, "
                                      r"which is not installed: install it"):
        ShardDataModule(f"{base}/digits")
    with pytest.raises(ShardError, match=rf"shard {base}/digits/val-000000\.tar could not be opened: .*`curl`, which "
                                         r"is not installed"):
        ShardDataModule(None, val=f"{base}/digits/val-000000.tar")


def test_remote_shard_names_go_into_the_url_or_command_as_they_are():
    assert remote_shard_url("pipe:aws s3 cp s3://b/digits/index.json -", "train-000000.tar") == \
        "pipe:aws s3 cp s3://b/digits/train-000000.tar -"
    assert remote_shard_url("https://h/d/index.json?sig=1", "val-000000.tar") == "https://h/d/val-000000.tar?sig=1"
    assert remote_shard_url("https://h/d/meta.json", "a/val-0.tar") == "https://h/d/a/val-0.tar"
    for bad in ("x; rm -rf ~", "../secret.tar", "/etc/passwd", "$(id).tar"):
        with pytest.raises(ShardError, match=r"pipe:cat /d/index\.json lists a shard named .*; a remote index may "
                                             "name its shards only with"):
            remote_shard_url("pipe:cat /d/index.json", bad)


@needs_curl
def test_a_fit_resumed_mid_epoch_from_the_http_stream_equals_the_local_fit(served, tmp_path):
    # the fit of tests/test_resume.py (14 steps, epochs of 4 batches, 2 workers, dropout, flips): on the
    # local shards straight, and over HTTP stopped at step 9 (epoch 2 after 1 batch, mid-epoch) and
    # resumed from that checkpoint: parameters, EMA and optimizer state agree bitwise
    from test_resume import assert_same as assert_same_fit
    from test_resume import final_state, fit_here, write_config

    root, base, server = served
    remote = f"--data.init_args.dataset={base}/digits"
    before = sum(n for path, n in server.requests.items() if path.endswith(".tar"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    fit_here(write_config(tmp_path / "c14.yaml"), straight, f"--data.init_args.dataset={root / 'digits'}")
    fit_here(write_config(tmp_path / "c9.yaml", max_steps=9), split, remote)
    assert final_state(split)["step"] == 9
    fit_here(write_config(tmp_path / "c14b.yaml"), split, remote, f"--ckpt_path={split}/checkpoints/last.ckpt")
    assert_same_fit(final_state(straight), final_state(split))
    assert sum(n for path, n in server.requests.items() if path.endswith(".tar")) > before  # it streamed


# -- issue 21: no remote read hangs ---------------------------------------------------------------
@pytest.fixture
def silent_server():
    """The URL of a listener on 127.0.0.1 that accepts connections (the kernel does) and never
    answers: a server that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@needs_curl
def test_a_server_that_never_answers_fails_the_fit_within_the_timeouts(silent_server, tmp_path):
    from test_fail_fast import fails_before_training, fit_config

    start = time.monotonic()
    out = fails_before_training(tmp_path, fit_config(tmp_path, [], dataset=f"{silent_server}/toy"),
                                "--data.init_args.connect_timeout=1", "--data.init_args.stall_timeout=1",
                                "--data.init_args.retries=0")
    took = time.monotonic() - start
    assert f"Seed set to 0 lightning-diffusion fit: error: {silent_server}/toy/index.json: the server stalled: no " \
           "bytes for 2 s (stall_timeout=1 s + connect_timeout=1 s before the first byte); raise " \
           "data.init_args.stall_timeout if the source is this slow (--debug" in out, out
    assert took < 10, took
    # shards alone (no index): the datamodule's first read fails as fast, naming the shard's URL
    start = time.monotonic()
    with pytest.raises(ShardError, match=rf"shard {silent_server}/train-0\.tar could not be read: the server stalled: "
                                         r"no bytes for 2 s \(stall_timeout=1 s \+ connect_timeout=1 s"):
        ShardDataModule(None, train=f"{silent_server}/train-0.tar", connect_timeout=1, stall_timeout=1, retries=0)
    assert time.monotonic() - start < 5


@needs_curl
def test_a_server_that_stalls_mid_shard_is_retried_then_named(served, caplog):
    _, base, _ = served
    dm = ShardDataModule(f"{base}/stalling", batch_size=64, stall_timeout=1, retries=1)  # the index is served whole
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="lightning_diffusion.data.streams"):
        with pytest.raises(ShardError, match=rf"shard {base}/stalling/val-000000\.tar could not be read: the server "
                                             r"stalled: no bytes for 1 s \(stall_timeout=1 s\) \(after 2 attempts\); "
                                             r"raise data\.init_args\.stall_timeout"):
            list(dm.val_dataloader())
    took = time.monotonic() - start
    assert 2 <= took < 6, took  # two stalls of 1 s and a backoff of 1 s, not the server's 5 s
    assert [r.getMessage() for r in caplog.records] == [
        f"{base}/stalling/val-000000.tar: no bytes for 1 s (stall_timeout=1 s); trying again in 1 s (attempt 2 of 2; "
        "data.init_args.retries=1)"]


def test_a_pipe_command_that_stalls_is_killed_and_named(served):
    root, _, _ = served
    marker = "31.4159"  # the sleep of this test's command, to find it among the processes
    command = f"pipe:head -c 5000 {root / 'digits' / 'val-000000.tar'}; sleep {marker}"
    start = time.monotonic()
    with pytest.raises(ShardError, match=rf"shard {command} could not be read: the command `.*sleep {marker}` stalled: "
                                         r"no bytes for 1 s \(stall_timeout=1 s\); raise"):
        list(ShardDataModule(None, val=command, batch_size=64, num_classes=10, stall_timeout=1, retries=0,
                             train=f"{root / 'digits' / 'train-000000.tar'}").val_dataloader())
    assert time.monotonic() - start < 5
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"sleep {marker}" not in left  # the whole command was killed, not only its shell


@needs_curl
def test_transient_failures_are_retried_logged_and_give_the_same_batches(served, caplog):
    root, base, server = served
    with caplog.at_level("WARNING", logger="lightning_diffusion.data.streams"):
        dm = ShardDataModule(f"{base}/flaky", batch_size=64, retries=2, cache=False)  # index: 503 first
        flaky = list(dm.val_dataloader())  # the shard: cut off half-way first
    assert_same([flaky], [list(ShardDataModule(str(root / "digits"), batch_size=64).val_dataloader())])
    assert server.requests["/flaky/index.json"] == server.requests["/flaky/val-000000.tar"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{base}/flaky/index.json: `curl` exited with status 22 (the server answered with "
                                  "an HTTP error") and "returned error: 503; trying again in 1 s (attempt 2 of 3; " \
        "data.init_args.retries=2)" in messages[0], messages
    assert messages[1].startswith(f"{base}/flaky/val-000000.tar: `curl` exited with status 18 (partial transfer") \
        and messages[1].endswith("trying again in 1 s (attempt 2 of 3; data.init_args.retries=2)"), messages


def test_curl_gets_the_connect_timeout_and_its_timeout_is_named(tmp_path, monkeypatch):
    # a curl on PATH that records its arguments and ends as curl does when no connection came in time
    fake = tmp_path / "curl"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho "curl: (28) Failed to connect" >&2\nexit 28\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(ShardError, match=r"shard http://10\.255\.255\.1/t\.tar could not be read: `curl` exited with "
                                         r"status 28 \(no connection within the connect timeout\); its stderr: curl: "
                                         r"\(28\) Failed to connect \(after 2 attempts\)"):
        ShardDataModule(None, train="http://10.255.255.1/t.tar", connect_timeout=2.5, retries=1)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--connect-timeout") + 1] == "2.5" and args[-1] == "http://10.255.255.1/t.tar"
    with pytest.raises(ValueError, match=r"ShardDataModule: data\.stall_timeout must be > 0 seconds, got 0"):
        ShardDataModule(None, train="http://10.255.255.1/t.tar", stall_timeout=0)
    with pytest.raises(ValueError, match=r"ShardDataModule: data\.retries must be >= 0, got -1"):
        ShardDataModule(None, train="http://10.255.255.1/t.tar", retries=-1)
