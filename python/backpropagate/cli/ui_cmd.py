"""`backprop ui`: serve the web UI (optional extra: pip install 'backpropagate[ui]')."""

from __future__ import annotations

from pathlib import Path

import typer

from backpropagate.cli import app
from backpropagate.errors import DependencyError


@app.command("ui")
def ui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback needs --auth."),
    port: int = typer.Option(7860, "--port", min=0, max=65535, help="Port to listen on (0 = any free port)."),
    share: bool = typer.Option(
        False, "--share", help="Listen on every network interface (0.0.0.0), for others on your network; needs --auth."
    ),
    auth: str | None = typer.Option(
        None, "--auth", help="Require a login: user:password (kept only as a hash in memory)."
    ),
    auth_file: Path | None = typer.Option(  # noqa: B008 (typer's idiom)
        None, "--auth-file", help="Read user:password from the first line of this file (kept out of `ps`)."
    ),
    workspace: Path = typer.Option(  # noqa: B008 (typer's idiom)
        Path("."), "--workspace", "-w", help="The only folder the UI reads and writes (data, uploads/, runs/)."
    ),
    max_upload_mb: int = typer.Option(100, "--max-upload-mb", min=1, help="Largest dataset upload, in MiB."),
) -> None:
    """Open the web UI: check data, train, watch runs, export and chat, in the browser."""
    try:
        import uvicorn

        from backpropagate.ui.app import UIConfig, create_app
        from backpropagate.ui.security import check_exposure, parse_auth, read_auth_file
    except ImportError as exc:
        raise DependencyError(
            "DEP_MISSING_PACKAGE",
            f"the web UI needs its extra ({exc.name} is missing): pip install 'backpropagate[ui]'",
        ) from exc
    credential = read_auth_file(auth_file) if auth_file else parse_auth(auth) if auth else None
    bind = "0.0.0.0" if share else host
    check_exposure(bind, share, credential)
    config = UIConfig(workspace=workspace, host=bind, credential=credential, max_upload_bytes=max_upload_mb * 2**20)
    ui = create_app(config)
    typer.echo(f"backprop ui: http://{bind}:{port}/ (workspace {config.workspace.resolve()})", err=True)
    # Runs are worker processes of their own: they go on when the server stops, and a new server shows them.
    server = uvicorn.Server(uvicorn.Config(ui, host=bind, port=port, log_level="warning", access_log=False))
    ui.state.ui.stopping = lambda: server.should_exit  # open event streams (run pages) end on Ctrl-C
    server.run()
