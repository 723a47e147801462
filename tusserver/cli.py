"""`tusserver [serve]`, `tusserver token`, `tusserver upload`: the command line.

`serve` hands its settings to the supervisor (`tusserver.server.supervisor`); `upload` is the
optional client (`tusserver.uploader`), loaded only when asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from tusserver import auth
from tusserver.server.supervisor import serve
from tusserver.settings import (
    OPTIONS,
    SettingError,
    build_settings,
    default_text,
    env_name,
    field_of,
    parse_duration,
    parse_size,
)
from tusserver.uploader import command as uploader

EXIT_USAGE = 2
SUBCOMMANDS = ("serve", "token", "upload")


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    for option, parse, help_text, metavar in OPTIONS:
        flag = f"--{option}"
        shown = f"{help_text} [env {env_name(option)}; default: {default_text(option)}]"
        if metavar is None:
            parser.add_argument(
                flag, dest=field_of(option), action=argparse.BooleanOptionalAction, help=shown
            )
        elif option == "secret":
            parser.add_argument(
                flag, dest=field_of(option), action="append", metavar=metavar, help=shown
            )
        else:
            parser.add_argument(
                flag, dest=field_of(option), type=_argtype(parse), metavar=metavar, help=shown
            )


def _argtype(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (SettingError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


# What `tusserver --help` says besides the options: the endpoints beside the tus one, and
# the signals.
SERVE_EPILOG = (
    "Endpoints besides the tus endpoint (--base-path), without a token: GET /health (200 "
    "while Redis answers), GET /ready (JSON; 200 when this process should get uploads, 503 "
    "with the failed checks: Redis, the data directory, --min-free-disk, or stopping), GET "
    "/metrics (Prometheus text summed over the workers; --metrics-token, --no-metrics). "
    "Signals: SIGTERM or SIGINT stop gracefully (/ready answers 503 at once, the listener "
    "closes after --drain-delay, a second signal ends that wait, running PATCHes commit what "
    "arrived); SIGHUP reloads --tls-cert and --tls-key (without them it changes nothing)."
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tusserver",
        description="A resumable upload server (tus 1.0.0) for very large files. "
        "Without a subcommand it serves. Every serve option can also be set with the "
        "TUS_* environment variable named beside it; flags win.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{serve,token,upload}")
    serve = commands.add_parser(
        "serve",
        help="serve uploads (the default)",
        description="Serve tus uploads (the default command). Each option can also be set "
        "with the TUS_* environment variable named beside it; flags win. Other commands: "
        "`tusserver token --help`.",
        epilog=SERVE_EPILOG,
    )
    _serve_parser(serve)
    token = commands.add_parser("token", help="print a signed access token for a client")
    token.add_argument("--subject", required=True, help="who the token is for (owner of uploads)")
    token.add_argument(
        "--actions", default="create,upload,read", help="comma-separated: create,upload,read,delete"
    )
    token.add_argument("--ttl", type=_argtype(parse_duration), default=900.0,
                       help="lifetime, e.g. 15m, 24h [default: 15m]")  # fmt: skip
    token.add_argument("--max-size", type=_argtype(parse_size), help="largest upload allowed")
    token.add_argument("--upload-id", help="allow only this upload")
    token.add_argument(
        "--finish",
        action="store_true",
        help="the token keeps working after it expires for HEAD, PATCH and DELETE of the "
        "uploads it creates, until each completes or expires (the fin claim)",
    )
    token.add_argument(
        "--secret", help=f"signing secret [default: the first of {env_name('secret')}]"
    )
    upload = commands.add_parser(
        "upload", help="upload files and folders to a tus server", description=uploader.DESCRIPTION
    )
    uploader.add_arguments(upload)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in SUBCOMMANDS:
        args_list.insert(0, "serve")  # `tusserver --help` shows the serve options
    args = make_parser().parse_args(args_list)
    if args.command == "token":
        return _token(args)
    if args.command == "upload":
        return uploader.run(args)
    try:
        flags = {k: v for k, v in vars(args).items() if k != "command"}
        settings = build_settings(flags, os.environ)
    except SettingError as error:
        print(f"tusserver: {error}", file=sys.stderr)
        return EXIT_USAGE
    return serve(settings)


def _token(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get(env_name("secret"), "").split(",")[0].strip()
    if not secret:
        print("tusserver token: no secret: pass --secret or set TUS_SECRET", file=sys.stderr)
        return EXIT_USAGE
    try:
        token = auth.issue_token(
            secret,
            subject=args.subject,
            actions=[a.strip() for a in args.actions.split(",") if a.strip()],
            ttl_s=args.ttl,
            max_size_bytes=args.max_size,
            upload_id=args.upload_id,
            finishes=args.finish,
        )
    except ValueError as error:
        print(f"tusserver token: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    return 0
