"""Reading shards: raw samples, decoding, and the train/eval streams (no Lightning here).

Kept free of Lightning and of the rest of the package so that spawned DataLoader workers, which
re-import the module of the dataset they unpickle, start quickly.

Shard content is untrusted: only PNG/JPEG, ``.npy`` (with ``allow_pickle=False``) and ASCII
``.cls`` labels are decoded; nothing is unpickled. Shards listed in an ``index.json`` are checked
against it as they are read (:func:`iter_shard`): the sample count on every complete read, the
SHA-256 once per local shard and process, on every read of a remote one. With ``cache``, a stream
keeps each shard's samples in memory after its first complete, checked read (:class:`ShardCache`)
and decodes each sample at most once.

A shard is named by anything webdataset reads: a local path or ``file:`` URL (opened as a file), a
``pipe:COMMAND`` (the command's stdout is the tar stream) or an ``http://`` / ``https://`` (or other
``webdataset.gopen``) URL, opened through webdataset (:class:`UrlStream`). A command that exits
non-zero is a :class:`ShardError` naming the URL, with the command's stderr. No remote read hangs:
curl has a connect timeout, every read a stall timeout, and transient failures are retried with
backoff (:class:`Network`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import select
import signal
import stat as stat_module
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightning_diffusion.encodings import categories_from_images, images_from_categories  # noqa: F401 - as before

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")

# TrainStream's __len__ is exact: each worker yields its own share of the rank's batches.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class ShardError(RuntimeError):
    """A shard that cannot be read or holds a bad sample; the message names the shard and key."""


@dataclass(frozen=True)
class Categories:
    """How a categorical stream decodes ``x``: to int64 categories in ``[0, num_categories)``.

    Attributes:
        num_categories: K, the number of categories.
        levels: for images, the 8-bit value each category is stored as (``levels[k]`` is category
            k, e.g. ``(0, 255)`` for binarized images); None: the stored value is the category.
    """

    num_categories: int
    levels: tuple[int, ...] | None = None

    def decode(self, arr: np.ndarray, where: str, ext: str) -> torch.Tensor:
        """``arr`` (an integer array as stored) as int64 categories; :class:`ShardError` naming
        ``where`` (the shard and key) for a float array or a value that is no category."""
        k = self.num_categories
        if arr.dtype.kind not in "biu":
            raise ShardError(f"{where}: .{ext} holds {arr.dtype} values, but the dataset is categorical "
                             f"(integers in [0, {k})); rewrite the shards with integer data, or read the "
                             "dataset as continuous (data.categorical=false)")
        values = arr.astype(np.int64)
        if self.levels is not None:
            lut = np.full(max(256, int(values.max(initial=0)) + 1), -1, dtype=np.int64)
            lut[list(self.levels)] = np.arange(len(self.levels))
            cats = lut[np.clip(values, 0, len(lut) - 1)]
            bad = np.flatnonzero((cats < 0) | (values < 0))
            if bad.size:
                i = int(bad[0])
                raise ShardError(f"{where}: .{ext} holds the value {int(values.flat[i])} at flat position {i}, "
                                 f"which is none of the dataset's {k} category levels {list(self.levels)} "
                                 "(index.json `levels`); rewrite the shards")
            values = cats
        else:
            bad = np.flatnonzero((values < 0) | (values >= k))
            if bad.size:
                i = int(bad[0])
                raise ShardError(f"{where}: .{ext} holds category {int(values.flat[i])} at flat position {i}, "
                                 f"outside [0, {k}) (num_categories {k}); rewrite the shards, or fix "
                                 "num_categories in index.json")
        return torch.from_numpy(np.ascontiguousarray(values))


def expand_pattern(pattern: str) -> list[str]:
    """Expand a brace pattern (``train-{000000..000009}.tar``, several joined by ``::``) to paths or URLs
    (``pipe:cat /data/train-{000000..000009}.tar``, ``https://host/train-{000000..000009}.tar``)."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


def local_path(url: str) -> str | None:
    """The local file that ``url`` names: a path as it is, a ``file:`` URL's path (as webdataset's
    ``gopen`` opens it); None for a URL that webdataset reads through a command or the network
    (``pipe:``, ``http:``, ``https:``, ``gs:``, ...). A string whose "scheme" is none of
    webdataset's (``C:``, ``data:2024/x``) is a path."""
    from webdataset.gopen import gopen_schemes

    scheme = urlparse(url).scheme
    if scheme == "file":
        return url2pathname(urlparse(url).path)
    return None if scheme in gopen_schemes else url


#: curl's exit statuses (``man curl``) that a failed http(s) read is most likely to end with
CURL_EXIT = {6: "could not resolve the host", 7: "could not connect to the server",
             18: "partial transfer: the connection ended before the size the server announced",
             22: "the server answered with an HTTP error (4xx/5xx, e.g. 404: no such file there)",
             28: "no connection within the connect timeout", 35: "the TLS handshake failed",
             52: "the server closed the connection without answering",
             56: "the connection failed while receiving data", 60: "the server's TLS certificate could not be verified"}
#: curl's exit statuses after which a read is tried again (``retries``): a connection refused, timed
#: out, closed without an answer, reset or cut off, which a server being restarted or overloaded gives
CURL_TRANSIENT = {7, 18, 28, 52, 55, 56}
#: the HTTP statuses (curl's exit 22) after which a read is tried again: the server is busy or failing for now
HTTP_TRANSIENT = {408, 429, 500, 502, 503, 504}
#: seconds before the first retry of a read; doubled for each further one, up to ``RETRY_BACKOFF_MAX_S``
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 30.0
#: how much of a command's stderr an error message quotes (its end)
STDERR_TAIL = 2000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Network:
    """How long a remote read (an ``http(s)://`` URL read by ``curl``, a ``pipe:`` command) may
    wait, and how often a failed one is tried again. All times in seconds.

    Attributes:
        connect_timeout: how long curl waits for the server to accept the connection
            (``curl --connect-timeout``); a ``pipe:`` command has no connection of its own.
        stall_timeout: how long a read may go without a single byte: then the process behind it
            (curl, or the command and all its children) is killed, and the read is tried again or
            fails with a :class:`ShardError` naming the URL and the timeout. Before curl's first
            byte it may wait ``connect_timeout + stall_timeout``.
        retries: how many times a stalled read, or a curl transfer that failed in a way that may
            pass (``CURL_TRANSIENT``: refused, timed out, reset, cut off; HTTP 408, 429, 5xx), is
            tried again, after 1, 2, 4, ... s (at most 30 s); each retry is logged as a warning
            naming the URL and the attempt. The new transfer skips the bytes already read. A
            ``pipe:`` command that fails is not run again (it may not be safe to; a stalled one is).
    """

    connect_timeout: float = 30.0
    stall_timeout: float = 30.0
    retries: int = 3

    def check(self, where: str) -> "Network":
        """Self, or a ValueError naming ``where`` (e.g. ``ShardDataModule: data.``) and the bad option."""
        for option, value in (("connect_timeout", self.connect_timeout), ("stall_timeout", self.stall_timeout)):
            if not value > 0:
                raise ValueError(f"{where}{option} must be > 0 seconds, got {value}")
        if self.retries < 0:
            raise ValueError(f"{where}retries must be >= 0, got {self.retries} (0: never try a read again)")
        return self


class UrlStream:
    """The bytes of a URL, read through webdataset's opener: a ``pipe:COMMAND`` runs the command in
    the shell and reads its stdout, an ``http(s)://`` (or other curl) URL is read by ``curl``, a
    ``file:`` URL or path is opened as a file, another scheme (``gs:``, ``ais:``) by
    ``webdataset.gopen.gopen``.

    The command and curl run in webdataset's ``Pipe``, but started here rather than by ``gopen``:
    in a session of their own (a stalled pipeline is killed whole), with their stderr captured (in
    a temporary file: :meth:`failure` quotes it when the command fails, and a command that succeeds
    has it written to this process's stderr), and curl with the timeouts of ``network`` (webdataset
    fixes curl's options: a 30 s connect timeout, none for a stalled transfer, and curl's own
    retries, which cannot resume a transfer already written to the pipe). Reads wait at most
    ``network.stall_timeout`` for a byte and are retried as :class:`Network` says.

    Call :meth:`finish` after reading to the end of the data (it checks the command's exit status)
    or :meth:`close` to stop reading early: a command still running then is ended (SIGPIPE), and
    how it ended is no failure of its own. ``bytes_read`` counts the bytes read; ``length`` is the
    size the server announced (``Content-Length``) once curl's transfer started, if it did.
    """

    def __init__(self, url: str, network: Network = Network()):
        from webdataset.gopen import gopen_curl, gopen_schemes, rewrite_url

        self.url, self.network, self.bytes_read, self.ended = url, network, 0, False
        self.status: int | None = None  # the command's exit status, once it ended
        self.length: int | None = None
        self.attempt = 1
        self._stderr = ""
        self._files: dict[str, str] = {}  # this attempt's temporary files: "stderr", "headers"
        self._stopped = False  # we closed its stdout while it ran: its exit status is ours, not its failure
        self._stalled: str | None = None  # why the last attempt was killed as stalled
        self._skip = 0  # bytes a retried transfer drops: those the failed one had delivered
        self._started = False  # this attempt delivered a byte
        self._target = rewrite_url(url)  # GOPEN_REWRITE sees the URL as the user wrote it
        self.command = self._target[len("pipe:"):] if self._target.startswith("pipe:") else None
        self._curl = gopen_schemes.get(urlparse(self._target).scheme) is gopen_curl
        self._open()

    def _open(self) -> None:
        from webdataset import utils
        from webdataset.gopen import Pipe, gopen

        if self.command is None and not self._curl:
            try:
                self.stream = gopen(self._target, "rb")
            except FileNotFoundError as e:
                if urlparse(self._target).scheme in ("", "file"):
                    raise
                raise self._not_installed(e) from e
            self.proc = getattr(self.stream, "proc", None)  # webdataset's Pipe runs a process (gsutil, ais)
            self._ok = {0, 128 + signal.SIGPIPE, -signal.SIGPIPE, *getattr(self.stream, "ignore_status", ())}
            return
        if self.command is not None and utils.enforce_security:
            raise ValueError(f"{self.url}: webdataset's unsafe_gopen is off, so pipe: commands are refused")
        for name in ("stderr", "headers") if self._curl else ("stderr",):
            fd, self._files[name] = tempfile.mkstemp(prefix="lightning-diffusion-", suffix=f".{name}")
            os.close(fd)
        try:
            with open(self._files["stderr"], "wb") as stderr:
                if self.command is not None:
                    self.stream = Pipe(self.command, mode="rb", shell=True, stderr=stderr, start_new_session=True,
                                       ignore_status=[141])
                else:  # -N: curl passes each byte on as it comes (the stall watch sees the transfer, not a buffer)
                    self.stream = Pipe(["curl", "-sS", "-f", "-L", "-N", "--connect-timeout",
                                        f"{self.network.connect_timeout:g}", "-D", self._files["headers"],
                                        self._target], mode="rb", stderr=stderr, start_new_session=True,
                                       ignore_status=[141, 23])
        except FileNotFoundError as e:
            self._remove_files()
            raise self._not_installed(e) from e
        except BaseException:
            self._remove_files()
            raise
        self.proc = self.stream.proc
        # the statuses of a command that did not fail: 0, and those of one ended by our closing its stdout
        # (SIGPIPE: 141 from the shell, -13 as a signal; curl's 23, a write error)
        self._ok = {0, 128 + signal.SIGPIPE, -signal.SIGPIPE, *self.stream.ignore_status}

    def _not_installed(self, e: FileNotFoundError) -> OSError:
        return OSError(f"webdataset reads {self.url} with `{e.filename}`, which is not installed: install it "
                       "(e.g. apt-get install curl), or read the data through a pipe: command")

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that are left for -1); fewer only at the end of the data."""
        if self.proc is None:  # a plain file (GOPEN_REWRITE made the URL a path)
            data = self.stream.read(size)
            self.bytes_read += len(data)
            self.ended = self.ended or (not data and size != 0)
            return data
        chunks, n = [], 0
        while size < 0 or n < size:
            data = self._read_some(1 << 20 if size < 0 else size - n)
            if not data:
                break
            chunks.append(data)
            n += len(data)
        return b"".join(chunks)

    def _read_some(self, n: int) -> bytes:
        """At most ``n`` bytes of the process's stdout, as soon as there are any; b"" at the end.
        The read waits with ``select`` (a pipe's own read has no timeout), and a stalled or failed
        attempt is retried here: what the reader sees is the one stream of bytes."""
        while not self.ended:
            wait = self.network.stall_timeout + (self.network.connect_timeout if self._curl and not self._started
                                                 else 0.0)
            if not select.select([self.proc.stdout], [], [], wait)[0]:
                self._kill()
                self._stalled = (f"no bytes for {wait:g} s (stall_timeout={self.network.stall_timeout:g} s"
                                 + (f" + connect_timeout={self.network.connect_timeout:g} s before the first byte"
                                    if self._curl and not self._started else "") + ")")
                self._retry_or_end(self._stalled, transient=True)
                continue
            data = os.read(self.proc.stdout.fileno(), n)  # the fd itself: no buffer that select cannot see
            if data:
                if not self._started and self._curl:
                    self.length = self._announced_length()
                self._started = True
                drop = min(self._skip, len(data))
                self._skip -= drop
                if drop < len(data):
                    self.bytes_read += len(data) - drop
                    return data[drop:]
                continue
            try:  # the end of its output: how did it end
                status = self.proc.wait(self.network.stall_timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                status = self.proc.wait()
            self._retry_or_end(None, transient=self._transient(status), status=status)
        return b""

    def _transient(self, status: int) -> bool:
        """Whether curl's exit ``status`` may pass if the transfer is tried again."""
        if not self._curl or status in self._ok:
            return False
        if status == 22:
            code = re.search(r"returned error: (\d{3})", self._peek_stderr())
            return code is not None and int(code.group(1)) in HTTP_TRANSIENT
        return status in CURL_TRANSIENT

    def _retry_or_end(self, stalled: str | None, transient: bool, status: int | None = None) -> None:
        """After an attempt ended (``status``) or stalled: start the next attempt if it may pass and
        retries are left, else end the stream (a stall raises :class:`ShardError`)."""
        if status is None:
            status = self.proc.wait()
        if not transient or self.attempt > self.network.retries:
            self.status, self.ended = status, True
            if stalled is not None:
                raise ShardError(f"{self.url}: {self.failure()}")
            return
        why = stalled or f"{self._describe(status)}{self._stderr_detail(self._peek_stderr())}"
        delay = min(RETRY_BACKOFF_S * 2 ** (self.attempt - 1), RETRY_BACKOFF_MAX_S)
        log.warning("%s: %s; trying again in %g s (attempt %d of %d; data.init_args.retries=%d)", self.url, why,
                    delay, self.attempt + 1, self.network.retries + 1, self.network.retries)
        self.stream.stream.close()
        self._remove_files()
        time.sleep(delay)
        self.attempt += 1
        self._skip, self._started, self._stalled = self.bytes_read, False, None
        self._open()

    def _kill(self) -> None:
        """End the process behind the stream, with its children (it leads a session of its own)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if self._files else self.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "UrlStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading: close the stream and end the command behind it if it still runs (killed
        with its children at once: a stalled one would never see the closed pipe; its exit status
        is then no failure of its own). Idempotent."""
        if self.proc is None:  # a plain file (GOPEN_REWRITE made the URL a path)
            self.stream.close()
            return
        if self.status is None:
            self._stopped = not self.ended and self.proc.poll() is None
        self.stream.stream.close()  # our end of its stdout; webdataset's Pipe.close would raise on the status
        if self.status is None:
            if self._stopped:
                self._kill()
            self.status = self.proc.wait()
        if "stderr" in self._files:
            self._stderr = self._peek_stderr()
            if self._stderr and self.status in self._ok and not self._stopped:
                print(self._stderr, file=sys.stderr)  # a command that succeeded: what it said, as without the capture
        self._remove_files()

    def finish(self) -> None:
        """After the end of the data: read what is left (a tar's padding), wait for the command, and
        raise :class:`ShardError` naming the URL if it failed."""
        while self.read(1 << 20):
            pass
        self.close()
        failure = self.failure()
        if failure is not None:
            raise ShardError(f"{self.url}: {failure}")

    def failure(self) -> str | None:
        """Why the command behind the stream failed (a stall and its timeout; or its exit status, and
        curl's meaning of it and the command's stderr), or None when it did not; closes the stream
        first."""
        self.close()
        tries = f" (after {self.attempt} attempts)" if self.attempt > 1 else ""
        if self._stalled is not None:
            what = f"the command `{self.command}`" if self.command is not None else "the server"
            return (f"{what} stalled: {self._stalled}{tries}; raise data.init_args.stall_timeout if the source "
                    "is this slow")
        if self.status is None or self.status in self._ok or self._stopped:
            return None
        return f"{self._describe(self.status)}{self._stderr_detail(self._stderr)}{tries}"

    def _describe(self, status: int) -> str:
        if self.command is not None:
            what = f"the command `{self.command}`"
        else:
            args = self.proc.args
            what = f"`{args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]}`"
        ended = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        meaning = f" ({CURL_EXIT[status]})" if what == "`curl`" and status in CURL_EXIT else ""
        return f"{what} {ended}{meaning}"

    def _stderr_detail(self, text: str) -> str:
        if text:
            return f"; its stderr: {text}"
        return " and wrote nothing to stderr" if self.command is not None else ""

    def _peek_stderr(self) -> str:
        """The end of this attempt's captured stderr ("" without one)."""
        try:
            with open(self._files["stderr"], "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - STDERR_TAIL))
                return f.read().decode("utf-8", "replace").strip()
        except (OSError, KeyError):
            return ""

    def _announced_length(self) -> int | None:
        """The ``Content-Length`` of the response curl is passing on (the last one, after
        redirects), from the headers it wrote before the body; None if it announced none."""
        try:
            with open(self._files["headers"], "rb") as f:
                text = f.read().decode("latin-1")
        except (OSError, KeyError):
            return None
        found = re.findall(r"(?im)^content-length:\s*(\d+)\s*$", text.rsplit("\nHTTP/", 1)[-1])
        return int(found[-1]) if found else None

    def _remove_files(self) -> None:
        for path in self._files.values():
            try:
                os.unlink(path)
            except OSError:
                pass
        self._files = {}


def read_url(url: str, network: Network = Network()) -> bytes:
    """All bytes of ``url`` (a path or anything webdataset reads, see :class:`UrlStream`, which
    waits and retries as ``network`` says). A failed, stalled or timed-out command or transfer is
    an :class:`OSError` naming the URL (and the command's stderr or the timeout)."""
    path = local_path(url)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    stream = UrlStream(url, network)
    chunks = []
    try:
        with stream:
            while chunk := stream.read(1 << 20):
                chunks.append(chunk)
            stream.finish()
    except (OSError, ShardError) as e:  # a failed status, a stall
        raise OSError(f"cannot read {url}: {stream.failure() or e}") from e
    return b"".join(chunks)


class _HashingReader:
    """A binary stream read through SHA-256: the tar iterator reads the shard once, and the digest
    of what it read comes for free. ``hexdigest`` reads what the iterator left (tar padding after
    the end-of-archive blocks) and returns the digest of the whole stream."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


# (path, recorded SHA-256, size, mtime) of the local shards whose SHA-256 this process has checked: later
# reads skip the hashing. A forked DataLoader worker inherits the parent's set, a spawned one starts empty.
# A remote shard is hashed on every read: each is a new transfer, and there is no mtime to see a change by.
_VERIFIED: set[tuple[str, str, int, int]] = set()


def iter_shard(url: str, record: Mapping[str, Any] | None = None, verify: bool = True,
               network: Network = Network()) -> Iterator[dict[str, Any]]:
    """Yield the raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard.

    ``url`` is a local path or anything webdataset reads (``file:``, ``pipe:COMMAND``, ``http(s)://``,
    see :class:`UrlStream`). Any failure to open, transfer or parse the tar is raised as
    :class:`ShardError` naming the shard; a ``pipe:`` command or ``curl`` that exits non-zero is
    named with its exit status (and the command's stderr), also when the tar it gave looked whole.

    ``record`` is the shard's entry in ``index.json`` (``count``, ``sha256``, ``size`` in bytes;
    ``index``: the index's path or URL, for messages). With it, a read to the end raises
    :class:`ShardError` if the shard held another number of samples than ``count`` (a read
    abandoned part way, as the training stream's at an epoch's end, is checked only for holding
    more), with ``verify`` if the SHA-256 of its bytes, hashed as they are read, is not ``sha256``
    (a local file on its first complete read in this process, later reads of the unchanged file
    are not hashed again; a remote shard on every read), and if it is not ``size`` bytes long. A
    tar that breaks off short of ``size`` is named as truncated. The size is also checked when the
    shard is opened, before its first sample: a local file's (``os.stat``), a remote one's where the
    server announces it (``Content-Length``), so a cut shard is refused even by a read that stops
    early. The last sample is yielded only after these checks (and a command's exit status) passed:
    a stream cut inside a sample ends in a partial one, which is never handed out. A local path that
    is not a regular file (a directory, a device, a FIFO) is refused before it is read.

    ``network``: how a remote read waits and retries (:class:`Network`).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    record = record or {}
    count, size = record.get("count"), record.get("size")
    digest = record.get("sha256") if verify else None
    index = record.get("index", "index.json")
    path = local_path(url)
    stream = None
    try:
        if path is not None and not stat_module.S_ISREG(os.stat(path).st_mode):  # /dev/zero would never end
            raise ShardError(f"shard {url} is not a regular file (a directory, device or FIFO): name a tar file")
        stream = open(path, "rb") if path is not None else UrlStream(url, network)
        with stream:
            if path is not None:
                stat = os.fstat(stream.fileno())
                key = (path, digest, stat.st_size, stat.st_mtime_ns)
                _check_size(url, stat.st_size, size, index, "is")
            reader = _HashingReader(stream) if digest and (path is None or key not in _VERIFIED) else stream
            files = ({**f, "__url__": url} for f in tar_file_iterator(reader))
            read, last = 0, None
            samples = group_by_keys(files)
            for raw in samples:
                if read == 0 and path is None:  # curl has passed the headers on with the first bytes
                    _check_size(url, stream.length, size, index, "is announced by the server as")
                read += 1
                if count is not None and read > count:
                    read += sum(1 for _ in samples)
                    break
                if last is not None:
                    yield last
                last = raw  # held until the checks below: a stream cut inside a sample ends in a partial one
            actual = reader.hexdigest() if reader is not stream else None
            if path is None:
                stream.finish()  # the rest of the stream, and the exit status of the command behind it
            length = stat.st_size if path is not None else stream.bytes_read
            sizes = f" (to {length} of the {size} bytes it records)" if size is not None and length != size else ""
            if count is not None and read != count:
                raise ShardError(f"shard {url} holds {read} samples, but {index} records {count}: it was cut short"
                                 f"{sizes}, or replaced after the index was written; rewrite the shards with "
                                 "`lightning-diffusion shards` (or restore the file)")
            if actual is not None and actual != digest:
                raise ShardError(
                    f"shard {url}: SHA-256 is {actual}, but {index} records {digest}: the file is corrupt or "
                    "was replaced after the index was written; rewrite the shards with `lightning-diffusion "
                    "shards`, or read them unchecked with verify=False (--data.init_args.verify=false)")
            _check_size(url, length, size, index, "is")
            if actual is not None and path is not None:
                _VERIFIED.add(key)
            if last is not None:
                yield last
    except Exception as e:  # tarfile.ReadError, truncated data, duplicate names, a failed command ...
        failure = stream.failure() if isinstance(stream, UrlStream) else None
        if failure is not None:  # the command's failure explains whatever the tar looked like
            raise ShardError(f"shard {url} could not be read: {failure}") from e
        if isinstance(e, ShardError):
            raise
        if isinstance(e, FileNotFoundError) and path is not None:
            raise ShardError(f"shard {url} does not exist") from e
        if stream is None:  # the opener failed: a program that is not installed, a refused URL
            raise ShardError(f"shard {url} could not be opened: {e}") from e
        length = _length_read(stream, path)
        if size is not None and length is not None and length < size:
            raise ShardError(f"shard {url} is truncated: it ended after {length} bytes, but {index} records {size} "
                             f"({type(e).__name__}: {e}); rewrite or re-upload the shard, or check the transfer") from e
        raise ShardError(f"shard {url} is not a readable tar file: {type(e).__name__}: {e}") from e


def _check_size(url: str, length: int | None, size: int | None, index: str, how: str) -> None:
    """A :class:`ShardError` when a shard's ``length`` (its size on disk, or as the server announces
    it) is known and is not the ``size`` in bytes that ``index`` records."""
    if length is None or size is None or length == size:
        return
    raise ShardError(f"shard {url} {how} {length} bytes, but {index} records {size}: "
                     f"{'it is truncated' if length < size else 'it was replaced'}; rewrite the shards with "
                     "`lightning-diffusion shards` (or restore the file)")


def _length_read(stream: Any, path: str | None) -> int | None:
    """How long the shard behind a failed read is: a local file's size; for a remote stream the
    bytes read, if it had ended there (None if it had not, or never opened)."""
    if stream is None:
        return None
    if path is not None:
        return os.path.getsize(path) if os.path.exists(path) else None
    return stream.bytes_read if stream.ended else None


def decode_sample(raw: dict[str, Any], shape: tuple[int, ...] | None, labelled: bool,
                  categories: Categories | None = None) -> tuple[torch.Tensor, int | None]:
    """Decode one raw sample to (x, y): images to float CHW in [-1, 1], points to float32 [D]; with
    ``categories``, images to int64 CHW categories and ``.npy`` sequences to int64 [L] (see
    :class:`Categories`).

    Raises :class:`ShardError` naming the shard and key on a missing key, a wrong shape, and (with
    ``categories``) a float array or a value that is no category.
    """
    where = f"shard {raw.get('__url__')}, sample {raw.get('__key__')!r}"
    ext = next((e for e in (*IMAGE_EXTENSIONS, "npy") if e in raw), None)
    if ext is None:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ShardError(f"{where}: no image or npy entry (keys present: {present}); expected one of {[*IMAGE_EXTENSIONS, 'npy']}")
    try:
        if categories is not None:
            if ext == "npy":
                arr = np.load(io.BytesIO(raw[ext]), allow_pickle=False)
            else:
                from PIL import Image

                with Image.open(io.BytesIO(raw[ext])) as im:
                    im.load()
                    arr = np.asarray(im)
                arr = arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1)
        elif ext == "npy":
            x = torch.from_numpy(np.load(io.BytesIO(raw[ext]), allow_pickle=False).astype(np.float32))
        else:
            from PIL import Image

            with Image.open(io.BytesIO(raw[ext])) as im:
                im.load()
                arr = np.asarray(im, dtype=np.uint8)
            arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    except Exception as e:
        raise ShardError(f"{where}: cannot decode .{ext}: {type(e).__name__}: {e}") from e
    if categories is not None:
        x = categories.decode(arr, where, ext)
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ShardError(f"{where}: .{ext} has shape {list(x.shape)}, expected {list(shape)} (from the index / first sample)")
    y = None
    if "cls" in raw:
        try:
            y = int(raw["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as e:
            raise ShardError(f"{where}: .cls is not an ASCII integer") from e
    elif labelled:
        raise ShardError(f"{where}: missing key 'cls' (the dataset has class labels)")
    return x, y


class _Cached:
    """One sample of a cached shard: its raw bytes until it is first decoded, then only the
    decoded ``(x, y)``. The streams hand out these in place of raw samples; :func:`_decode` turns
    either into ``(x, y)``."""

    __slots__ = ("raw", "decoded")

    def __init__(self, raw: dict[str, Any]):
        self.raw: dict[str, Any] | None = raw
        self.decoded: tuple[torch.Tensor, int | None] | None = None


def _decode(item: dict[str, Any] | _Cached, shape: tuple[int, ...] | None, labelled: bool,
            categories: Categories | None) -> tuple[torch.Tensor, int | None]:
    """:func:`decode_sample` of a raw sample, or of a cached one once (later calls return the same
    ``(x, y)``: :func:`collate` stacks copies, so no batch shares memory with the cache)."""
    if not isinstance(item, _Cached):
        return decode_sample(item, shape, labelled, categories)
    if item.decoded is None:
        item.decoded = decode_sample(item.raw, shape, labelled, categories)  # a bad sample raises on every use
        item.raw = None
    return item.decoded


class ShardCache:
    """Shards' samples kept in memory by one stream (in its process, or in each worker's copy).

    :meth:`samples` reads a shard through :func:`iter_shard` (with its count and SHA-256 checks) the
    first time, and keeps the samples only once that read went to its end and passed the checks (a
    read abandoned part way, or one that raised, keeps nothing). Later reads of the shard are served
    from memory: no file is opened, no tar parsed, and each sample is decoded once, on first use.
    An entry is keyed by the file's (path, size, mtime_ns), looked up with one ``os.stat`` per read:
    a shard replaced on disk is read and checked again, and replaces its old entry. A remote shard
    (``pipe:``, ``http(s)://``) is keyed by its URL and the SHA-256 and size its index records (no
    mtime to see a change by): it is read once, checked, and kept for the stream's life. Memory: about
    the decoded samples (elements x 4 bytes for floats, 8 for int64 categories, plus ~0.5 KB of
    tensor per sample); raw bytes of a sample not yet decoded until it is. A pickled cache (a
    spawned worker's copy of the stream) arrives empty.
    """

    def __init__(self) -> None:
        self._shards: dict[str, tuple[tuple[Any, Any], list[_Cached]]] = {}

    def __reduce__(self):
        return ShardCache, ()

    def __len__(self) -> int:
        return len(self._shards)

    def __contains__(self, url: str) -> bool:
        return url in self._shards

    def samples(self, url: str, record: Mapping[str, Any] | None = None, verify: bool = True,
                network: Network = Network()) -> Iterator[_Cached]:
        """The samples of shard ``url`` (as :func:`iter_shard` would yield them, wrapped), from
        memory when the unchanged file was read to its end before."""
        path = local_path(url)
        if path is None:
            key = ((record or {}).get("sha256"), (record or {}).get("size"))
        else:
            try:
                stat = os.stat(path)
                key = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                key = None  # iter_shard names the missing shard
        hit = self._shards.get(url)
        if hit is not None and hit[0] == key:
            yield from hit[1]
            return
        self._shards.pop(url, None)  # changed on disk: the old samples are not the file's any more
        read: list[_Cached] = []
        for raw in iter_shard(url, record, verify, network):
            read.append(_Cached(raw))
            yield read[-1]
        if key is not None:  # iter_shard's checks passed: it raises after its last sample otherwise
            self._shards[url] = (key, read)


def _read_shard(cache: ShardCache | None, url: str, record: Mapping[str, Any] | None,
                verify: bool, network: Network) -> Iterator[dict[str, Any] | _Cached]:
    """A stream's read of one shard: :func:`iter_shard`, through ``cache`` when it has one."""
    return iter_shard(url, record, verify, network) if cache is None else cache.samples(url, record, verify, network)


def collate(samples: list[tuple[torch.Tensor, int | None]]) -> dict[str, torch.Tensor]:
    """Stack decoded samples into the batch dict of DESIGN.md."""
    batch = {"x": torch.stack([x for x, _ in samples])}
    if samples[0][1] is not None:
        batch["y"] = torch.tensor([y for _, y in samples], dtype=torch.int64)
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """Infinite resampled stream cut into ``batches_per_rank`` batches per epoch for one rank.

    Every (seed, epoch, rank, worker) gives its own reproducible stream: shards are drawn with
    replacement, samples pass a shuffle buffer of ``shuffle_buffer`` and, if ``random_flip``, are
    flipped horizontally with probability 1/2. Workers share the rank's batches as evenly as
    possible; DataLoader interleaves them, so batch b of an epoch is batch ``b // W`` of worker
    ``b % W``'s stream.

    ``records`` maps a shard's path to its entry in ``index.json``; each complete read of a shard is
    checked against it (see :func:`iter_shard`; ``verify=False``: the count only). The checks draw
    nothing from the streams' random generators, so the batches are the same with and without.

    ``categories`` (see :class:`Categories`): the samples are decoded to int64 categories.

    ``start_batch = k`` resumes an epoch after its first k batches (exact mid-epoch resume, with
    the same number of workers W): worker w takes the stream of worker ``(k + w) % W`` and skips
    that stream's first ``(k + w) // W`` batches by reading their raw bytes (no decoding), so
    the DataLoader's round robin continues with batch k, k + 1, ...

    ``cache``: keep each shard's samples in memory after its first complete, checked read and
    decode each sample once (:class:`ShardCache`, per process: each worker fills its own copy).
    The samples, their order and the random draws are those of the uncached stream, so the
    batches are bit-identical with and without.

    ``network``: how remote shards are waited for and retried (:class:`Network`).
    """

    def __init__(self, urls: list[str], batch_size: int, batches_per_rank: int, shape: tuple[int, ...],
                 labelled: bool, shuffle_buffer: int, random_flip: bool, seed: int, rank: int, world_size: int,
                 records: Mapping[str, Mapping[str, Any]] | None = None, verify: bool = True,
                 categories: Categories | None = None, cache: bool = False, network: Network = Network()):
        super().__init__()
        self.network = network
        self.cache = ShardCache() if cache else None
        self.urls, self.batch_size, self.batches_per_rank = urls, batch_size, batches_per_rank
        self.records, self.verify, self.categories = dict(records or {}), verify, categories
        self.shape, self.labelled = shape, labelled
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.batches_per_rank

    def _raw_samples(self, rng: random.Random) -> Iterator[dict[str, Any] | _Cached]:
        # the buffer holds raw bytes and a sample is decoded only when it leaves: filling the
        # buffer at an epoch start (or skipping batches on resume) costs tar reading alone
        buffer: list[dict[str, Any] | _Cached] = []
        while True:
            url = rng.choice(self.urls)
            for raw in _read_shard(self.cache, url, self.records.get(url), self.verify, self.network):
                if self.shuffle_buffer == 0:  # no shuffling
                    yield raw
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], raw = raw, buffer[j]
                yield raw

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        wid, nworkers = _worker()
        start = min(max(self.start_batch, 0), self.batches_per_rank)
        role = (start + wid) % nworkers  # the worker whose stream this one continues
        n_batches = self.batches_per_rank // nworkers + (role < self.batches_per_rank % nworkers)
        skip = (start + wid) // nworkers
        stream_id = f"{self.seed}-{self.epoch}-{self.rank}-{role}"
        raw = self._raw_samples(random.Random(stream_id))
        flip_rng = random.Random(f"flip-{stream_id}")  # its own stream: flipping leaves the sample order alone
        for i in range(n_batches):
            samples = [next(raw) for _ in range(self.batch_size)]
            flips = [flip_rng.random() < 0.5 for _ in range(self.batch_size)] if self.random_flip else None
            if i < skip:
                continue
            batch = collate([_decode(r, self.shape, self.labelled, self.categories) for r in samples])
            if flips is not None:
                flip = torch.tensor(flips)
                batch["x"] = torch.where(flip[:, None, None, None], batch["x"].flip(-1), batch["x"])
            yield batch


class EvalStream(IterableDataset):
    """Reads every sample of ``urls`` exactly once across ranks x workers, in batches.

    With at least as many shards as readers (ranks x workers), reader g takes shards g, g+G, ...;
    otherwise every reader walks all shards and keeps samples g, g+G, ... of the sequence. Every
    shard read is checked against its entry in ``records`` as in :class:`TrainStream`, decoded
    with ``categories`` and, with ``cache``, kept in memory (after a complete read) as there, and
    remote shards are waited for and retried as ``network`` says.
    """

    def __init__(self, urls: list[str], batch_size: int, shape: tuple[int, ...], labelled: bool,
                 rank: int, world_size: int, records: Mapping[str, Mapping[str, Any]] | None = None,
                 verify: bool = True, categories: Categories | None = None, cache: bool = False,
                 network: Network = Network()):
        super().__init__()
        self.network = network
        self.urls, self.batch_size, self.shape, self.labelled = urls, batch_size, shape, labelled
        self.rank, self.world_size, self.categories = rank, world_size, categories
        self.records, self.verify = dict(records or {}), verify
        self.cache = ShardCache() if cache else None

    def _shard(self, url: str) -> Iterator[dict[str, Any] | _Cached]:
        return _read_shard(self.cache, url, self.records.get(url), self.verify, self.network)

    def _raw(self) -> Iterator[dict[str, Any] | _Cached]:
        wid, nworkers = _worker()
        readers, me = self.world_size * nworkers, self.rank * nworkers + wid
        if len(self.urls) >= readers:
            for url in self.urls[me::readers]:
                yield from self._shard(url)
        else:
            i = 0
            for url in self.urls:
                for raw in self._shard(url):
                    if i % readers == me:
                        yield raw
                    i += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch = []
        for raw in self._raw():
            batch.append(_decode(raw, self.shape, self.labelled, self.categories))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)
