"""What a gvisor kernel cannot do: see the host kernel, reach the network, write or read host files."""

from __future__ import annotations

import ast
import asyncio
import base64
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from tests.conftest import Backend, _cleanup_sandboxes
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec

pytestmark = [pytest.mark.gvisor, pytest.mark.parametrize("backend", ["gvisor"], indirect=True)]


FORK_BOMB = ("import os, time\nkids = 0\nwhile True:\n    if os.fork() == 0:\n        time.sleep(600)\n"
             "        os._exit(0)\n    kids += 1\n")


def gvisor_kernel(kernelspec_dir: Path, name: str, **config: str | bool) -> str:
    return write_kernelspec(kernelspec_dir, name, {"runtime": "gvisor", **config})


@pytest.fixture(scope="module")
def kc(backend: Backend, kernelspec_dir: Path) -> Iterator[BlockingKernelClient]:
    with running_kernel(gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor")) as (_km, client):
        run(client, "import os, socket")
        yield client


def test_kernel_runs_on_gvisors_kernel_not_the_hosts(kc: BlockingKernelClient) -> None:
    import os

    release = value(kc, "os.uname().release").strip("'")
    assert release != os.uname().release
    assert release == "4.4.0"  # what gVisor reports


def test_no_network_to_the_hosts_loopback(kc: BlockingKernelClient) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        content, _ = run(kc, f"socket.create_connection(('127.0.0.1', {port}), timeout=3)")
        assert content["status"] == "error"
        assert content["ename"] in ("ConnectionRefusedError", "TimeoutError", "OSError")
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_only_tmp_and_the_workspace_are_writable(kc: BlockingKernelClient, tmp_path: Path) -> None:
    for path in ("/etc/snapkernel-probe", "/usr/snapkernel-probe", str(Path.home() / "snapkernel-probe")):
        content, _ = run(kc, f"open({path!r}, 'w')")
        assert content["status"] == "error", (path, content)
        assert content["ename"] in ("OSError", "PermissionError", "FileNotFoundError"), (path, content)
        assert not Path(path).exists()
    assert value(kc, "open('/tmp/probe', 'w').write('x')") == "1"
    assert value(kc, "open(os.path.join(os.getcwd(), 'probe'), 'w').write('xy')") == "2"


def test_backend_state_dir_and_token_are_hidden(kc: BlockingKernelClient, backend: Backend) -> None:
    token = backend.state_dir / "token"
    content, _ = run(kc, f"open({str(token)!r}).read()")
    assert content["status"] == "error" and content["ename"] in ("FileNotFoundError", "PermissionError")
    assert value(kc, f"os.path.exists({str(backend.state_dir / 'backend.db')!r})") == "False"
    # Of the state dir, only the path to this sandbox's own workspace is there, if it can be listed at all.
    workspace = Path(value(kc, "os.environ['HOME']").strip("'"))
    run(kc, "def listing(d):\n    try:\n        return sorted(os.listdir(d))\n    except PermissionError:\n"
            "        return 'unreadable'")
    for d, only in ((backend.state_dir, "sandboxes"), (workspace.parent.parent, workspace.parent.name),
                    (workspace.parent, "workspace")):
        assert value(kc, f"listing({str(d)!r})") in (repr([only]), "'unreadable'"), d


def test_memory_hog_gets_a_memory_error_and_the_kernel_lives(backend: Backend, kernelspec_dir: Path) -> None:
    with running_kernel(gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor-512m", memory="512Mi")) as (km, c):
        content, outputs = run(c, "hog = bytearray(2 * 1024**3)", timeout=60)
        assert content["status"] == "error" and content["ename"] == "MemoryError"
        assert any(m["msg_type"] == "error" for m in outputs)  # shown in the notebook
        assert km.is_alive() and value(c, "'still here'") == "'still here'"


def test_a_small_sandboxs_fork_bomb_stops_before_its_memory_limit(backend: Backend, kernelspec_dir: Path) -> None:
    """At 2Gi, 64 sleeping children of a kernel were enough for the memory limit to kill the whole sandbox.
    (At 1Gi, with 22 tasks, a clean-clone run still saw the sandbox killed once: see issue 14's note.)"""
    with running_kernel(gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor-2g", memory="2Gi")) as (km, c):
        assert value(c, "int(open('/sys/fs/cgroup/pids/pids.max').read())") == "38"
        content, _ = run(c, FORK_BOMB, timeout=120)
        assert content["status"] == "error" and content["ename"] == "BlockingIOError", content
        assert km.is_alive()


def test_fork_bomb_stops_in_its_cell_and_a_restart_clears_it(kc: BlockingKernelClient, backend: Backend,
                                                              kernelspec_dir: Path) -> None:
    """The Sentry enforces the sandbox's pids limit: `fork` fails in the cell, the user cannot lift the limit,
    other sandboxes and the backend answer, and a restart kills what the old kernel left."""
    from snapkernel.client import BackendClient

    def tasks(c: BlockingKernelClient) -> int:
        return int(value(c, "int(open('/sys/fs/cgroup/pids/pids.current').read())"))

    with running_kernel(gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor")) as (km, c):
        run(c, "import os")
        limit = int(value(c, "int(open('/sys/fs/cgroup/pids/pids.max').read())"))
        assert limit == 70  # the default 4Gi: 16 + one per 64 MiB past 640 MiB
        content, _ = run(c, "open('/sys/fs/cgroup/pids/pids.max', 'w').write('100000')")
        assert content["status"] == "error" and content["ename"] == "PermissionError", content
        content, outputs = run(c, FORK_BOMB, timeout=120)
        assert content["status"] == "error" and content["ename"] == "BlockingIOError", content
        assert any(m["msg_type"] == "error" for m in outputs)  # shown in the notebook
        # (Until a restart the kernel may itself be short of a thread for its next cell: not asserted on.)
        assert value(kc, "1 + 1") == "2"  # another sandbox is unaffected

        async def status() -> int:
            client = BackendClient(backend.address, backend.token)
            try:
                return int((await client.status()).capacity.cpu_total)
            finally:
                await client.close()

        assert asyncio.run(status()) >= 1  # the backend keeps serving
        km.restart_kernel()
        c.wait_for_ready(timeout=60)
        assert tasks(c) < 40  # the sleeping children are gone


def test_notebook_dir_is_mounted_only_when_asked(kc: BlockingKernelClient, kernelspec_dir: Path,
                                                 tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    assert value(kc, f"os.path.exists({str(tmp_path)!r})") == "False"
    name = gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor-mount", mount_notebook_dir=True)
    with running_kernel(name, cwd=str(tmp_path)) as (_km, c):
        run(c, "import os")
        assert value(c, "os.getcwd()") == repr(str(tmp_path))
        assert value(c, "open('data.csv').read()") == repr("a,b\n1,2\n")
        assert value(c, "open('out.txt', 'w').write('written in the sandbox')") == "22"
    assert (tmp_path / "out.txt").read_text() == "written in the sandbox"


def test_a_mounted_directory_never_shows_the_state_dir_or_jupyters_runtime_dir(
        backend: Backend, kernelspec_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook directory above them (a home directory) shows neither the token nor the cookie secret
    (a backend of its own, with its state dir and Jupyter's runtime dir in that home)."""
    home = Path(tempfile.mkdtemp(prefix="skh-"))  # short: the sandbox's unix socket path has 107 bytes at most
    runtime_dir = home / ".local" / "share" / "jupyter" / "runtime"
    runtime_dir.mkdir(parents=True)
    (runtime_dir / "jupyter_cookie_secret").write_text("forges logins")
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime_dir))
    own = Backend(home / ".local" / "state" / "snapkernel", runtime="gvisor")
    own.state_dir.mkdir(parents=True)
    own.start()
    try:
        for k, v in own.env().items():
            monkeypatch.setenv(k, v)
        name = gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor-mount-home", mount_notebook_dir=True)
        with running_kernel(name, cwd=str(home)) as (_km, c):
            assert value(c, "open('notes.txt').read()") == "'mine'"
            assert value(c, f"import os; os.listdir({str(runtime_dir)!r})") == "[]"
            assert value(c, f"os.path.exists({str(own.state_dir / 'token')!r})") == "False"
    finally:
        own.stop()
        _cleanup_sandboxes(own)
        shutil.rmtree(home, ignore_errors=True)


def test_the_hosts_private_files_are_not_there(backend: Backend, kc: BlockingKernelClient,
                                              kernelspec_dir: Path) -> None:
    from jupyter_core.paths import jupyter_runtime_dir

    checkout = Path(__file__).resolve().parents[3]
    private = ["/etc/shadow", "/etc/gshadow", "/home", "/var", "/srv", "/opt", jupyter_runtime_dir(),
               str(Path.home() / ".ssh"), str(Path.home() / ".jupyter"), str(checkout / "README.md"),
               str(checkout / ".git"), str(checkout / "tests"), str(backend.state_dir / "token"),
               str(backend.state_dir / "snapshots")]
    seen = value(kc, f"[p for p in {private!r} if os.path.exists(p)]")
    assert seen == "[]", seen
    # Directories passed through on the way to the Python installation (/root above pyenv) cannot be listed.
    run(kc, "def listing(d):\n    try:\n        return sorted(os.listdir(d))\n    except PermissionError:\n"
            "        return 'unreadable'")
    venv = Path(sys.prefix).name
    for d, passage in (("/root", {".pyenv"}), (str(checkout), {venv, "snapkernel"})):
        seen = value(kc, f"listing({d!r}) if os.path.exists({d!r}) else 'absent'")
        assert seen in ("'unreadable'", "'absent'") or set(ast.literal_eval(seen)) <= passage, (d, seen)
    # The system's own directories are there, read-only, and programs find what /etc must hold.
    assert value(kc, "[os.path.isdir(p) for p in ('/usr/bin', '/bin', '/lib')]") == "[True, True, True]"
    assert value(kc, "sorted(os.listdir('/etc'))").count("shadow") == 0
    assert value(kc, "import pwd; pwd.getpwuid(os.getuid()).pw_name") == "'snapkernel'"
    assert value(kc, "socket.gethostbyname('localhost')") == "'127.0.0.1'"
    # Another sandbox's workspace is not there either.
    with running_kernel(gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor-other")) as (_km, other):
        run(other, "import os; open('mine.txt', 'w').write('secret')")
        theirs = value(other, "os.path.join(os.getcwd(), 'mine.txt')").strip("'")
        assert Path(theirs).read_text() == "secret"  # on the host, in the other sandbox's workspace
        assert value(kc, f"os.path.exists({theirs!r}), os.path.exists({str(Path(theirs).parent)!r})") == \
            "(False, False)"


def test_the_kernel_runs_unprivileged_with_its_packages(kc: BlockingKernelClient) -> None:
    assert value(kc, "os.getuid(), os.geteuid(), os.getgid()") == "(1000, 1000, 1000)"
    # The agent starts as root only to set the pids limit: nothing of it is left to the kernel.
    caps = ("{l.split()[0]: l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith(('CapInh', 'CapPrm', 'CapEff'))}")
    assert set(ast.literal_eval(value(kc, caps)).values()) == {"0000000000000000"}
    run(kc, "import subprocess, sys")
    assert value(kc, "subprocess.run(['id', '-u'], capture_output=True, text=True).stdout.strip()") == "'1000'"
    assert value(kc, "import numpy, ipykernel, snapkernel; numpy.arange(3).sum()") in ("3", "np.int64(3)")
    for writable in ("os.environ['HOME']", "'/tmp'", "os.getcwd()"):
        assert value(kc, f"os.access({writable}, os.W_OK)") == "True", writable


def test_pip_install_user_works_offline_and_lands_in_the_workspace(kc: BlockingKernelClient,
                                                                  tmp_path: Path) -> None:
    wheel = _tiny_wheel(tmp_path)
    data = base64.b64encode(wheel.read_bytes())
    run(kc, f"import base64; open({wheel.name!r}, 'wb').write(base64.b64decode({data!r}))")
    # `pip` as `!pip` finds it on PATH: the kernel's own, not the host system's (which refuses: PEP 668).
    content, outputs = run(kc, "import subprocess; r = subprocess.run(['pip', 'install', '--user', '--no-index', "
                               f"'--no-deps', {wheel.name!r}], capture_output=True, text=True); print(r.stdout, "
                               "r.stderr); r.returncode", timeout=120)
    assert content["status"] == "ok" and value(kc, "r.returncode") == "0", outputs
    assert value(kc, "import importlib, site; importlib.invalidate_caches(); import snaptiny; snaptiny.ANSWER") == "42"
    assert value(kc, "snaptiny.__file__.startswith(os.environ['HOME'])") == "True"


def _tiny_wheel(tmp_path: Path) -> Path:
    """A one-module wheel built by hand: pip installs it without an index or a build back-end."""
    import hashlib
    import zipfile

    files = {"snaptiny.py": b"ANSWER = 42\n",
             "snaptiny-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: snaptiny\nVersion: 1.0\n",
             "snaptiny-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "snaptiny-1.0.dist-info/RECORD,,\n"
    path = tmp_path / "snaptiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("snaptiny-1.0.dist-info/RECORD", record)
    return path


def test_an_image_directory_is_the_root_with_the_agents_python(backend: Backend, kernelspec_dir: Path,
                                                               tmp_path: Path) -> None:
    """`image: DIR` replaces the host's system directories; the agent's Python is mounted into it."""
    image = tmp_path / "image"
    (image / "usr" / "lib").mkdir(parents=True)
    # Hard links: a root filesystem of the host's shared libraries in a blink, without the host's /usr/bin.
    subprocess.run(["cp", "-al", "/usr/lib/x86_64-linux-gnu", str(image / "usr" / "lib")], check=True)
    (image / "usr" / "lib64").mkdir()
    subprocess.run(["cp", "-al", "/usr/lib64/ld-linux-x86-64.so.2", str(image / "usr" / "lib64")], check=True)
    for name in ("lib", "lib64"):
        (image / name).symlink_to(f"usr/{name}")
    (image / "image-marker").write_text("from the image")
    name = gvisor_kernel(kernelspec_dir, "snapkernel-test-gvisor-image", image=str(image))
    with running_kernel(name) as (_km, c):
        assert value(c, "open('/image-marker').read()") == "'from the image'"
        assert value(c, "import os; os.path.exists('/usr/bin/python3'), os.path.exists('/etc/shadow')") == \
            "(False, False)"
        assert value(c, "import numpy; int(numpy.arange(4).sum())") == "6"
