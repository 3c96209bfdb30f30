"""``gpuvirt peer-session`` (hidden): this host's end of a peer session, started by a coordinator's
``rebalance --cluster --execute`` or ``reconcile`` through ``policies.peer_command`` (gpuvirt.service.peers)."""

from __future__ import annotations

import sys

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.state import state


@app.command("peer-session", hidden=True)
def peer_session(ctx: typer.Context) -> None:
    """Answer a coordinator's peer-session requests (JSON lines) on stdin/stdout until it ends the session;
    the GPU locks taken for it end with this process."""
    from gpuvirt.service.peers import serve

    code = serve(state(ctx).context(), sys.stdin.buffer, sys.stdout.buffer)
    if code:
        raise typer.Exit(code)
