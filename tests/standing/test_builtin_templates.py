"""The heavy built-in templates on the running installation (`make up`, then `make templates`; their builds need
the Debian registry and PyPI, so no test stack builds them): `make template-tests`. Each creates a sandbox from
the template through the installation's gateway (127.0.0.1) with the admin key `make up` wrote."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.templates, pytest.mark.timeout(600)]

PAGE_SERVER = (
    "mkdir -p /tmp/site && printf '<html><head><title>Served in the sandbox</title></head>"
    "<body><h1 id=h>hi</h1></body></html>' > /tmp/site/index.html && cd /tmp/site && "
    "exec python3 -m http.server 8000 --bind 127.0.0.1"
)
WAIT_FOR_SERVER = (
    "for i in $(seq 50); do python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8000')\" "
    "2>/dev/null && exit 0; sleep 0.2; done; exit 1"
)
WAIT_FOR_SERVER = (
    "for i in $(seq 50); do python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8000')\" "
    "2>/dev/null && exit 0; sleep 0.2; done; exit 1"
)
PLAYWRIGHT = """
from mvm_browser import playwright_chromium
with playwright_chromium() as browser:
    page = browser.new_page()
    page.goto("http://127.0.0.1:8000/index.html")
    print(page.title(), "|", page.inner_text("#h"))
"""
SELENIUM = """
from mvm_browser import selenium_chromium
from bs4 import BeautifulSoup
driver = selenium_chromium()
try:
    driver.get("http://127.0.0.1:8000/index.html")
    print(driver.title, "|", BeautifulSoup(driver.page_source, "html.parser").h1.text)
finally:
    driver.quit()
"""


def create(template: str):
    from microvm_sandbox import Sandbox

    return Sandbox.create(template, timeout=900)


def test_python_has_its_toolchain():
    with create("python") as sandbox:
        result = sandbox.exec(
            ["sh", "-c", "python3 -m pip --version && node --version && git --version && cc --version"]
        )
        assert result.exit_code == 0, result.stderr


def test_web_drives_headless_chromium_to_a_page_another_process_serves():
    with create("web") as sandbox:
        server = sandbox.commands.run(PAGE_SERVER, background=True)
        try:
            ready = sandbox.exec(["sh", "-c", WAIT_FOR_SERVER])
            assert ready.exit_code == 0
            for script in (PLAYWRIGHT, SELENIUM):
                result = sandbox.exec(["python3", "-c", script], timeout=240)
                assert result.exit_code == 0, result.stderr
                assert result.stdout.decode().strip() == "Served in the sandbox | hi"
        finally:
            server.kill()


def test_code_interpreter_keeps_state_and_returns_plots_tables_and_other_languages():
    with create("code-interpreter") as sandbox:  # bash and JavaScript too: the recipe installs both
        first = sandbox.run_code("import numpy as np\nvalues = np.arange(4)\nint(values.sum())")
        assert first.error is None and first.text == "6"
        plot = sandbox.run_code(
            "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5]); plt.title('Counts')\nplt.show()"
        )
        (figure,) = [r for r in plot.results if r.chart]
        assert figure.png and figure.chart["type"] == "bar" and figure.chart["title"] == "Counts"
        frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'n': values})")
        assert frame.results[0].table["columns"] == ["n"] and frame.results[0].table["total_rows"] == 4
        failed = sandbox.run_code("values.nope")
        assert failed.error.name == "AttributeError" and failed.status == "error"
        languages = set(sandbox.list_code_languages())
        assert "python" in languages
        for language, code, expected in (("bash", "X=4; echo $((X * 2))", "8"), ("javascript", "[1, 2].length", "2")):
            run = sandbox.run_code(code, language=language)
            assert run.error is None, run.error
            assert expected in (run.text or "".join(run.logs.stdout))


def test_desktop_shows_drives_and_streams_a_real_desktop():
    """The desktop template in a real guest: the session is up in the snapshot, input acts, VNC streams."""
    import asyncio

    import aiohttp
    import grpc

    from microvm.sandbox.v1 import desktop_service_pb2 as desk
    from microvm.sandbox.v1 import desktop_service_pb2_grpc
    from microvm_sandbox.client import default_api_key

    with create("desktop") as sandbox:
        channel = grpc.insecure_channel("127.0.0.1:50051")
        metadata = (("authorization", f"Bearer {default_api_key()}"),)
        stub = desktop_service_pb2_grpc.DesktopServiceStub(channel)
        shot = stub.Screenshot(desk.ScreenshotRequest(sandbox=sandbox.name), metadata=metadata, timeout=60)
        assert shot.png.startswith(b"\x89PNG") and (shot.width, shot.height) == (1024, 768)
        act = desk.DesktopActionRequest(sandbox=sandbox.name, launch=desk.LaunchAction(app="terminal"))
        assert stub.DesktopAction(act, metadata=metadata, timeout=60).pid > 0
        waited = stub.WaitForScreen(desk.WaitForScreenRequest(sandbox=sandbox.name), metadata=metadata, timeout=60)
        assert waited.outcome == desk.SCREEN_WAIT_OUTCOME_CHANGED
        typed = desk.DesktopActionRequest(sandbox=sandbox.name, type=desk.TypeAction(text="echo hi > /tmp/typed\n"))
        stub.DesktopAction(typed, metadata=metadata, timeout=60)
        for _ in range(50):
            if sandbox.exec(["cat", "/tmp/typed"]).stdout == b"hi\n":
                break
        assert sandbox.exec(["cat", "/tmp/typed"]).stdout == b"hi\n"
        live = stub.CreateDesktopStream(
            desk.CreateDesktopStreamRequest(sandbox=sandbox.name, view_only=True), metadata=metadata, timeout=60
        )

        async def banner() -> bytes:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(live.websocket_url, protocols=("binary",)) as ws,
            ):
                return (await asyncio.wait_for(ws.receive(), 60)).data

        assert asyncio.run(banner()).startswith(b"RFB 003.")
