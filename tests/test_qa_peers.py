"""Hostile QA of peer sessions (gpuvirt.service.peers, gpuvirt.host.peer_link): the server fed garbage, a peer
that answers garbage, and host ids that would become ssh options."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import pytest

from gpuvirt.errors import ConflictError, GpuvirtError


def _ctx(root, **kw):
    from gpuvirt.context import Context, resolve_settings

    return Context(resolve_settings(sim=str(root), **kw))


@pytest.fixture
def host(make_sim):
    return make_sim(["a100-40gb:1"], name="hp").root


def _serve(root, *lines: bytes):
    from gpuvirt.service.peers import serve

    out = io.BytesIO()
    with _ctx(root, host_id="hp") as c:
        code = serve(c, io.BytesIO(b"".join(lines)), out)
    return code, [json.loads(x) for x in out.getvalue().splitlines()]


HELLO = b'{"op":"hello","host":"hp","protocol":1}\n'


def test_deeply_nested_request_is_one_error_and_exit_2(host):
    code, out = _serve(host, HELLO, b"[" * 200_000 + b"]" * 200_000 + b"\n")
    assert code == 2 and out[-1]["ok"] is False and out[-1]["error"] == "UsageError"


@pytest.mark.parametrize("gpu", ["../../../tmp/x", "0000:01:00.0/../..", "/etc/passwd", ".."])
def test_step_gpu_that_is_a_path_is_refused(host, gpu):
    step = {"op": "mdev", "host": "hp", "gpu": gpu, "present": True, "params": {"uuid": "x", "type": "y"}}
    code, out = _serve(host, HELLO, json.dumps({"op": "step", "action": "forward", "step": step}).encode() + b"\n")
    assert code == 0 and out[-1]["ok"] is False and out[-1]["error"] == "UsageError", out


# --- the coordinator's side: a peer that answers garbage -------------------------------------------------------
def _peer(tmp_path, body: str):
    """A coordinator context whose peer_command runs a python script with ``body`` as its answers."""
    script = tmp_path / "peer.py"
    script.write_text("import sys, json, time, os\nhost = sys.argv[1]\n" + textwrap.dedent(body))
    cfg = tmp_path / "c.toml"
    cfg.write_text("[policies]\npeer_command = " + json.dumps([sys.executable, str(script), "{host}"]) + "\n")
    return cfg


REST = "\nfor _ in sys.stdin: print('{\"ok\": true}', flush=True)\n"
HELLO_OK = 'sys.stdin.readline(); print(json.dumps({"ok": True, "host": host, "protocol": 1}), flush=True)\n'


@pytest.mark.parametrize("answer", ['{"ok": true}', '{"ok": true, "doc": 5}', '{"ok": true, "doc": null}',
                                    '{"ok": true, "doc": {"gpus": 7}}'])
def test_malformed_view_reply_is_a_conflict(make_sim, tmp_path, answer):
    from gpuvirt.service.peers import PeerSession

    root = make_sim(["a100-40gb:1"], name="hc").root
    cfg = _peer(tmp_path, HELLO_OK + f"sys.stdin.readline(); print({answer!r}, flush=True)" + REST)
    with _ctx(root, host_id="hc", config=str(cfg)) as c:
        s = PeerSession(c, "hp")
        try:
            with pytest.raises(ConflictError, match="host hp"):
                s.remote_view()
        finally:
            s.close()


@pytest.mark.parametrize("req,answer", [
    ("metadata", '{"ok": true}'), ("metadata", '{"ok": true, "vid": 1, "data": "zz"}'),
    ("compat", '{"ok": true, "bits": 1, "code": 0, "reasons": [[1]]}'), ("compat", '{"ok": true}')])
def test_malformed_preflight_reply_is_a_conflict(make_sim, tmp_path, req, answer):
    from gpuvirt.service.peers import PeerSession

    root = make_sim(["a100-40gb:1"], name="hc").root
    cfg = _peer(tmp_path, HELLO_OK + f"sys.stdin.readline(); print({answer!r}, flush=True)" + REST)
    with _ctx(root, host_id="hc", config=str(cfg)) as c:
        s = PeerSession(c, "hp")
        try:
            with pytest.raises(ConflictError, match="host hp"):
                if req == "metadata":
                    s.vgpu_metadata(0, 1)
                else:
                    s.compatibility(0, b"x", 0, 1)
        finally:
            s.close()


def test_deeply_nested_reply_is_a_conflict(make_sim, tmp_path):
    from gpuvirt.service.peers import PeerSession

    root = make_sim(["a100-40gb:1"], name="hc").root
    cfg = _peer(tmp_path, "sys.stdin.readline(); print('[' * 200000 + ']' * 200000, flush=True)\n"
                          "sys.stdin.read()\n")
    with _ctx(root, host_id="hc", config=str(cfg)) as c:
        with pytest.raises(ConflictError, match="not a peer-session message"):
            PeerSession(c, "hp")


def test_peer_that_closes_stdout_but_lives_is_a_conflict(make_sim, tmp_path):
    from gpuvirt.service.peers import PeerSession

    root = make_sim(["a100-40gb:1"], name="hc").root
    cfg = _peer(tmp_path, "sys.stdin.readline(); os.close(1); time.sleep(30)\n")
    with _ctx(root, host_id="hc", config=str(cfg)) as c:
        with pytest.raises(ConflictError, match="host hp"):
            PeerSession(c, "hp")


@pytest.mark.parametrize("bad", ["-oProxyCommand=touch /tmp/x", "a b", "-l", "x;id", "a@b", "", "a/b"])
def test_host_id_never_becomes_an_ssh_option(make_sim, bad):
    from gpuvirt.service.peers import command

    root = make_sim(["a100-40gb:1"], name="hc").root
    with _ctx(root, host_id="hc") as c:
        with pytest.raises(GpuvirtError):
            command(c, bad)


@pytest.mark.parametrize("action,answer", [
    ("resolve", '{"ok": true}'), ("resolve", '{"ok": true, "changed": true, "params": 3}'),
    ("forward", '{"ok": true, "facts": [1]}'), ("forward", '{"ok": true}'), ("holds", '{"ok": true}'),
    ("holds", '{"ok": true, "holds": "yes"}')])
def test_malformed_step_reply_is_a_conflict(make_sim, tmp_path, action, answer):
    from gpuvirt.service.peers import PeerSession, RemoteOp

    root = make_sim(["a100-40gb:1"], name="hc").root
    cfg = _peer(tmp_path, HELLO_OK + f"sys.stdin.readline(); print({answer!r}, flush=True)" + REST)
    step = {"op": "mdev", "host": "hp", "gpu": "0000:01:00.0", "present": True,
            "params": {"uuid": "00000000-0000-0000-0000-000000000001", "type": "nvidia-1"}}
    with _ctx(root, host_id="hc", config=str(cfg)) as c:
        s = PeerSession(c, "hp")
        try:
            op = RemoteOp(s, step)
            with pytest.raises(ConflictError, match="host hp.*malformed"):
                if action == "resolve":
                    op.resolve()
                elif action == "forward":
                    op.forward()
                else:
                    op.holds(None, True)
        finally:
            s.close()


def test_lock_under_an_alias_address_keeps_the_one_lock_file_held(host):
    """'0000:41:00.0' and '0000_41_00.0' are one lock file: releasing one name must not leave the other
    believed held with its flock gone (nor fail the later unlock)."""
    import fcntl

    lock = b'{"op":"lock","gpu":"0000:41:00.0"}\n'
    alias = b'{"op":"lock","gpu":"0000_41_00.0"}\n'
    unlock = b'{"op":"unlock","gpu":"0000:41:00.0"}\n'
    unalias = b'{"op":"unlock","gpu":"0000_41_00.0"}\n'
    code, out = _serve(host, HELLO, lock, alias, unlock, unalias)
    assert code == 0 and all(o["ok"] for o in out), out
    # and after the session nothing is left held
    path = next((host / "var").rglob("gpu-0000_41_00.0.lock"))
    fd = open(path, "a")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fd.close()


@pytest.mark.parametrize("body", [
    "sys.stderr.write('\\x1b[2J\\x1b]0;owned\\x07 boom\\n'); sys.exit(3)\n",
    "sys.stdin.readline(); print(json.dumps({'ok': False, 'error': 'ConflictError', 'message': '\\x1b[2Jboom\\x07'}),"
    " flush=True)\n"])
def test_peer_text_reaches_the_operator_without_control_characters(make_sim, tmp_path, body):
    """What a peer writes (its stderr, its error message) ends up in the coordinator's one error line: terminal
    escape sequences from another machine must not reach the operator's terminal."""
    from gpuvirt.service.peers import PeerSession

    root = make_sim(["a100-40gb:1"], name="hc").root
    cfg = _peer(tmp_path, body)
    with _ctx(root, host_id="hc", config=str(cfg)) as c:
        with pytest.raises(GpuvirtError, match="boom") as err:
            PeerSession(c, "hp")
    assert str(err.value).isprintable(), str(err.value)
