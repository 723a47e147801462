"""`tusserver upload PATH... --endpoint URL`: upload files and folders to any tus server.

Several files go at once (`--parallel`), each resumable: the upload URL of every file is kept
in a small state file, so running the same command again after Ctrl-C, a network drop or a
reboot resumes unfinished files from the server's offset and skips finished ones. The files
of each folder go as one batch of the server (unless `--no-batch`), which the state file
keeps too. The work of one file is in `uploader_transfer`, the local files and the state
file in `uploader_files`, the batches in `uploader_batches`, the display in
`uploader_progress`; this module is the command.

Exit codes: 0 every file is on the server, 1 some failed, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tusserver.settings import SettingError, parse_size
from tusserver.uploader.files import (
    LocalFile,
    ResumeState,
    default_state_path,
    files_by_folder,
    find_files,
)

if TYPE_CHECKING:
    from tusserver.uploader.batches import BatchClient, FolderBatch
    from tusserver.uploader.progress import Reporter
    from tusserver.uploader.transfer import FileResult, TokenSource, UploadOptions

Job = tuple[LocalFile, str | None]  # a file and the batch it goes in

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CHECKSUM_ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
TOKEN_ENV = "TUS_TOKEN"  # noqa: S105 (the name of a variable, not a token)
DESCRIPTION = (
    "Upload files and folders (recursively) to a tus server, several at once, each with "
    "a progress bar; the files of a folder go as one batch, which the server completes "
    "once all of them are there. Run the same command again to resume what was "
    "interrupted; files already uploaded are skipped. Exit status: 0 all uploaded, 1 some "
    "failed, 2 bad usage, 130 interrupted."
)
SETTLE_S = 5.0  # how long to wait for a batch whose files are all sent to complete, at least
SETTLE_BYTES_PER_S = 100e6  # and a little longer for more bytes (the server hashes them)


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except SettingError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return size


def _count(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return int(text)

    convert.__name__ = "number"
    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError("must be more than 0 and less than a day")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tusserver upload`."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files and folders to upload")
    parser.add_argument("--endpoint", required=True, metavar="URL",
                        help="the tus creation URL, e.g. http://127.0.0.1:1080/files/")  # fmt: skip
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None, metavar="T",
                      help=f"bearer token sent with every request [env {TOKEN_ENV}]")  # fmt: skip
    auth.add_argument("--token-command", metavar="CMD",
                      help="a command that prints a fresh token; run at start and whenever "
                      "the server refuses the current one (401)")  # fmt: skip
    parser.add_argument("--parallel", type=_count(1), default=3, metavar="N",
                        help="files uploaded at once [default: 3]")  # fmt: skip
    parser.add_argument("--chunk-size", type=_size, default=8 * 2**20, metavar="SIZE",
                        help="bytes per PATCH request, e.g. 8MiB [default: 8MiB]")  # fmt: skip
    parser.add_argument("--checksum", choices=CHECKSUM_ALGORITHMS,
                        help="send Upload-Checksum with every PATCH (if the server supports "
                        "it) and compare the server's SHA-256 of each file at the end")  # fmt: skip
    parser.add_argument("--retries", type=_count(0), default=8, metavar="N",
                        help="retries of a failed request (network error, 5xx, 409, 423) "
                        "[default: 8]")  # fmt: skip
    parser.add_argument("--retry-delay", type=_seconds, default=1.0, metavar="SECONDS",
                        help="first backoff delay, doubled per retry up to 30 s "
                        "[default: 1]")  # fmt: skip
    parser.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                        help="give up on a request silent for this long [default: 60]")  # fmt: skip
    parser.add_argument("--state-file", type=Path, metavar="PATH",
                        help=f"where upload URLs and batches are kept for resuming "
                        f"[default: {default_state_path()}]")  # fmt: skip
    parser.add_argument("--no-batch", action="store_true",
                        help="send the files of a folder as separate uploads, not as "
                        "one batch (a server without batches gets them so anyway)")  # fmt: skip


def _usage_error(message: str) -> int:
    print(f"tusserver upload: {message}", file=sys.stderr)
    return EXIT_USAGE


INSTALL_HINT = "pip install 'tusserver[uploader]'"


def missing_client_libraries() -> list[str]:
    """The uploader's optional dependencies that cannot be imported here."""
    missing = []
    for module, package in (("tusclient", "tuspy"), ("requests", "requests"), ("rich", "rich")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def run(args: argparse.Namespace) -> int:
    """Run `tusserver upload` with parsed arguments; the exit code (2 when the uploader's
    libraries are not installed, with how to install them)."""
    missing = missing_client_libraries()
    if missing:
        return _usage_error(
            f"the uploader needs {', '.join(missing)}, which this installation lacks: "
            f"{INSTALL_HINT}"
        )
    try:
        return _run(args)
    except KeyboardInterrupt:  # before the uploads started (token command, OPTIONS)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    # imported here, so `tusserver serve` never loads the client libraries
    from tusserver.uploader.batches import BatchClient
    from tusserver.uploader.transfer import RetryPolicy, TokenSource, UploadOptions
    from tusserver.uploader.tus import UploadFailed

    endpoint = str(args.endpoint)
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return _usage_error(f"--endpoint must be an http:// or https:// URL, not {endpoint!r}")
    try:
        command = shlex.split(args.token_command) if args.token_command else None
    except ValueError as error:
        return _usage_error(f"--token-command: {error}")
    if command == []:
        return _usage_error("--token-command is empty")
    files, problems = find_files(args.paths)
    if problems:
        for problem in problems:
            print(f"tusserver upload: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not files:
        print("nothing to upload: the folders hold no files")
        return EXIT_OK
    tokens = TokenSource(None if command else args.token, command)  # the command wins over env
    try:
        if command is not None:
            tokens.refresh(None)
        checksum = _checksum_to_send(args.checksum, endpoint, tokens, args.timeout)
    except UploadFailed as error:
        print(f"tusserver upload: {error}", file=sys.stderr)
        return EXIT_FAILED
    options = UploadOptions(
        endpoint=endpoint,
        chunk_size=args.chunk_size,
        checksum_algorithm=checksum,
        verify_sha256=args.checksum is not None,
        retry=RetryPolicy(retries=args.retries, base_delay_s=args.retry_delay),
        timeout_s=args.timeout,
    )
    state = ResumeState(args.state_file or default_state_path())
    client = BatchClient(endpoint, tokens, options.retry, options.timeout_s, _warn)
    folder_batches: list[FolderBatch] = []
    if not args.no_batch:
        try:
            folder_batches = _open_batches(files, state, client, endpoint)
        except UploadFailed as error:
            print(f"tusserver upload: {error}", file=sys.stderr)
            return EXIT_FAILED
    return _upload_all(files, folder_batches, state, tokens, options, args.parallel, client)


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _open_batches(
    files: list[LocalFile], state: ResumeState, client: BatchClient, endpoint: str
) -> list[FolderBatch]:
    """A batch for each folder's files (none for a server without batches, with a warning).
    Raises UploadFailed when the server refuses one."""
    from tusserver.uploader.batches import BatchesUnsupported, open_folder_batches

    folders = files_by_folder(files)
    if not folders:
        return []
    try:
        return open_folder_batches(folders, state, client, endpoint)
    except BatchesUnsupported as error:
        _warn(f"warning: the server has no batches ({error}); the files of each folder go "
              "as separate uploads")  # fmt: skip
        return []


def _checksum_to_send(
    algorithm: str | None, endpoint: str, tokens: TokenSource, timeout_s: float
) -> str | None:
    """The algorithm for Upload-Checksum, if asked for and advertised by the server."""
    from tusserver.uploader.tus import UploadFailed, server_checksum_algorithms

    if algorithm is None:
        return None
    try:
        advertised = server_checksum_algorithms(
            endpoint, tokens.headers(tokens.current()), timeout_s
        )
    except UploadFailed as error:
        print(f"warning: cannot ask the server about checksums ({error}); sending none",
              file=sys.stderr)  # fmt: skip
        return None
    if algorithm not in advertised:
        print(f"warning: the server does not advertise the {algorithm} checksum; sending "
              "none (the SHA-256 comparison at the end still runs)", file=sys.stderr)  # fmt: skip
        return None
    return algorithm


def _make_reporter() -> Reporter:
    from tusserver.uploader.progress import PlainReporter, RichReporter

    return RichReporter() if sys.stdout.isatty() else PlainReporter()


def _upload_all(
    files: list[LocalFile],
    folder_batches: list[FolderBatch],
    state: ResumeState,
    tokens: TokenSource,
    options: UploadOptions,
    parallel: int,
    client: BatchClient,
) -> int:
    from tusserver.uploader.progress import format_size

    total_bytes = sum(file.size for file in files)
    print(
        f"uploading {len(files)} file{'s' * (len(files) != 1)} ({format_size(total_bytes)}) "
        f"to {options.endpoint}, {min(parallel, len(files))} at a time",
        flush=True,
    )
    batch_of: dict[Path, str] = {}
    for folder_batch in folder_batches:
        batch, count = folder_batch.batch, len(folder_batch.files)
        resumed = ", resumed" if folder_batch.is_resumed else ""
        print(f"batch {batch.batch_id}: {batch.url} ({folder_batch.folder.name}, {count} "
              f"file{'s' * (count != 1)}{resumed})", flush=True)  # fmt: skip
        batch_of.update((file.path, batch.batch_id) for file in folder_batch.files)
    jobs = [(file, batch_of.get(file.path)) for file in files]
    reporter = _make_reporter()
    results: list[FileResult] = []
    started_at = time.monotonic()
    reporter.begin(len(files), total_bytes)
    workers = _start_workers(iter(jobs), results, state, tokens, options, reporter, parallel)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)  # a timed join lets Ctrl-C through
    except KeyboardInterrupt:
        reporter.close()
        unfinished = len(files) - sum(r.outcome != "failed" for r in results)
        print(f"interrupted: {unfinished} file{'s' * (unfinished != 1)} not uploaded; run "
              "the same command again to resume", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    reporter.close()
    _report_batches(folder_batches, results, client)
    return _summarize(results, time.monotonic() - started_at)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run the way Ctrl-C does


def _start_workers(
    pending: Iterator[Job],
    results: list[FileResult],
    state: ResumeState,
    tokens: TokenSource,
    options: UploadOptions,
    reporter: Reporter,
    parallel: int,
) -> list[threading.Thread]:
    """Threads that take files from `pending` until none is left. Daemons: Ctrl-C ends the
    command at once, mid-request; the next run resumes from the server's offset."""
    from tusserver.uploader.transfer import FileResult, upload_file

    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                job = next(pending, None)
            if job is None:
                return
            file, batch = job
            try:
                result = upload_file(file, state, tokens, options, reporter, batch)
            except Exception as error:  # a bug must not hang the other files
                result = FileResult(file, "failed", 0, f"unexpected error: {error!r}")
            reporter.file_done(result)
            with lock:
                results.append(result)

    workers = [threading.Thread(target=work, name=f"upload-{n}", daemon=True)
               for n in range(parallel)]  # fmt: skip
    for worker in workers:
        worker.start()
    return workers


def _report_batches(
    folder_batches: list[FolderBatch], results: list[FileResult], client: BatchClient
) -> None:
    """Say whether each batch completed: once all of its files are on the server, after
    waiting a little for the server to complete it."""
    from tusserver.uploader.tus import UploadFailed

    failed = {result.file.path for result in results if result.outcome == "failed"}
    for folder_batch in folder_batches:
        batch, count = folder_batch.batch, len(folder_batch.files)
        is_sent = not any(file.path in failed for file in folder_batch.files)
        wait_s = SETTLE_S + sum(file.size for file in folder_batch.files) / SETTLE_BYTES_PER_S
        try:
            now = client.settled(batch, wait_s if is_sent else 0.0)
        except UploadFailed as error:
            _warn(f"batch {batch.batch_id}: cannot read it ({error})")
            continue
        if now is None:
            print(f"batch {batch.batch_id}: gone from the server", flush=True)
        elif now.is_complete:
            print(f"batch {batch.batch_id}: completed, {count} file{'s' * (count != 1)}",
                  flush=True)  # fmt: skip
        else:
            print(f"batch {batch.batch_id}: not complete ({now.state}, {now.files_completed} "
                  f"of {count} files complete)", flush=True)  # fmt: skip


def _summarize(results: list[FileResult], elapsed_s: float) -> int:
    from tusserver.uploader.progress import format_size

    counts = {outcome: 0 for outcome in ("uploaded", "skipped", "failed")}
    for result in results:
        counts[result.outcome] += 1
    sent = sum(result.sent_bytes for result in results)
    rate = f", {format_size(sent / elapsed_s)}/s" if elapsed_s > 0 and sent else ""
    print(
        f"{counts['uploaded']} uploaded, {counts['skipped']} skipped (uploaded before), "
        f"{counts['failed']} failed; {format_size(sent)} sent in {elapsed_s:.1f} s{rate}",
        flush=True,
    )
    for result in results:
        if result.outcome == "failed":
            print(f"failed: {result.file.relative_path}: {result.detail}", file=sys.stderr)
    return EXIT_FAILED if counts["failed"] else EXIT_OK
