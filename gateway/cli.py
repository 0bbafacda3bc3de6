"""Command line: `vllm-gateway serve | migrate | check-config | create-admin | backup | restore`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from gateway import backup, migrate
from gateway.app import create_app
from gateway.auth.admin_cli import create_admin
from gateway.fields import check_tier_grants
from gateway.settings import Settings


def load_settings() -> Settings:
    """Read settings from the environment (and .env) once; exit with a clear message if bad."""
    try:
        settings = Settings()
    except ValidationError as exc:
        # Only the messages: pydantic's own rendering would echo the offending (secret) input.
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        ]
        sys.stderr.write("invalid configuration, refusing to start:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
    try:
        # A field the tier settings may not allow (gateway.fields); the message names both.
        check_tier_grants(settings)
    except ValueError as exc:
        sys.stderr.write(f"invalid configuration, refusing to start:\n  {exc}\n")
        raise SystemExit(2) from None
    return settings


def serve(settings: Settings) -> None:
    """Migrate (when AUTO_MIGRATE) and serve until interrupted."""
    if settings.AUTO_MIGRATE:
        migrate.upgrade(settings.DATABASE_URL)
    app = create_app(settings)
    banner = (
        f"\n  {settings.APP_NAME} is starting on {settings.public_url}\n"
        f"  Chat: {settings.public_url}chat   admin console: {settings.public_url}dashboard\n"
        f"  API: {settings.public_url}docs   liveness: {settings.public_url}health\n"
    )
    sys.stderr.write(banner)
    sys.stderr.flush()
    uvicorn.run(
        app,
        host=settings.HOST,
        port=settings.PORT,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `vllm-gateway` command."""
    parser = argparse.ArgumentParser(prog="vllm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gateway (HOST, PORT and the rest from the environment)")
    mig = sub.add_parser("migrate", help="apply or undo database migrations")
    mig.add_argument("direction", choices=["upgrade", "downgrade"], nargs="?", default="upgrade")
    mig.add_argument("revision", nargs="?", help="target revision (default: head / base)")
    sub.add_parser("check-config", help="validate the configuration and exit")
    admin = sub.add_parser("create-admin", help="create an admin account, or promote a user")
    admin.add_argument("--username", required=True)
    admin.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin, not a prompt"
    )
    for name, helptext in (
        ("backup", "write a backup of the database to FILE (safe while the gateway runs)"),
        ("restore", "restore FILE into the empty database DATABASE_URL names"),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("file", type=Path, metavar="FILE")
        command.add_argument(
            "--pg-bin", type=Path, help="directory of pg_dump/pg_restore (default: PATH)"
        )
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "serve":
        serve(settings)
    elif args.command == "migrate":
        if args.direction == "upgrade":
            migrate.upgrade(settings.DATABASE_URL, args.revision or "head")
        else:
            migrate.downgrade(settings.DATABASE_URL, args.revision or "base")
    elif args.command in ("backup", "restore"):
        run = backup.backup if args.command == "backup" else backup.restore
        try:
            run(settings.DATABASE_URL, args.file, pg_bin=args.pg_bin)
        except backup.BackupError as exc:
            sys.stderr.write(f"{args.command} failed: {exc}\n")
            raise SystemExit(1) from None
        done = "written to" if args.command == "backup" else "restored from"
        sys.stdout.write(f"database {done} {args.file}\n")
    elif args.command == "create-admin":
        create_admin(settings, username=args.username, password_stdin=args.password_stdin)
    else:
        sys.stdout.write(f"configuration is valid ({settings.ENVIRONMENT.value})\n")
