"""The dashboard in Debian's Chromium, driven by Playwright, against a running stack: a small simulated
fleet goes through the real broker, collector, Kafka and processor; the pages load without script errors,
draw what the API answers, show a clear state for a route that is not deployed, and leave screenshots
in artifacts/."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright

from deploy.local import bootstrap
from meterflow.contract import now_ms
from meterflow.settings import Settings
from simulators.publisher import register_fleet, simulate_over_mqtt
from simulators.runner import RunOptions
from simulators.spec import FleetSpec, generate_fleet
from tests.integration.conftest import Pipeline
from tests.integration.fleet import wait_for_readings

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
# Series colours of api/dashboard/js/charts.js: finding them on the canvas means a series was drawn.
UP_RGB, LOAD_RGB, CARBON_RGB = (0x1B, 0x7F, 0x3B), (0x1F, 0x5F, 0xBF), (0x6B, 0x4F, 0xA3)
ESTIMATED_RGB = (0x8A, 0x6D, 0x00)
HOURS = 3


@dataclass
class Fleet:
    spec: FleetSpec
    tenant: str
    site: str
    vpp: str
    grid_zone: str


@dataclass
class Visit:
    """A page opened in the browser and everything it did."""

    page: Page
    errors: list[str] = field(default_factory=list)
    console_errors: list[ConsoleMessage] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


@pytest.fixture(scope="module")
def deployed(pipeline: Pipeline) -> set[str]:
    """Route templates the API serves (from its OpenAPI schema), to tell 'not deployed' from a bug."""
    return set(httpx.get(f"{pipeline.api_url}/openapi.json", timeout=30).json()["paths"])


@pytest.fixture(scope="module")
def fleet(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Two factories and four VPP resources (registered with their resource models), the last three
    hours backfilled through the whole pipeline."""
    prefix = f"d{uuid.uuid4().hex[:6]}-"
    vpp = f"{prefix}vpp"
    # Seed 1 gives the first factory a gas meter (Scope 1 at any hour) and puts the PV on the second
    # factory's site, so the first one's load and carbon are not zero on a sunny afternoon.
    # Resources report every minute and turn stale after three silent minutes: the module's tests run
    # well inside that after the backfill ends.
    spec = generate_fleet(
        enterprises=2, meters_per_site=2, vpp_resources=4, seed=1, tenant_prefix=prefix, vpp=vpp
    )
    creds = register_fleet(pipeline.api_url, pipeline.admin_key, spec)
    end = now_ms()
    start = end - HOURS * 3_600_000
    options = RunOptions(
        mode="backfill",
        start_ms=start - start % 60_000,
        duration_s=HOURS * 3600,
        truth_dir=tmp_path_factory.mktemp("dashboard-truth"),
        max_payload_bytes=pipeline.settings.ingest.max_payload_bytes,
    )
    result, outcome = simulate_over_mqtt(
        spec, options, host=pipeline.settings.mqtt.host, port=pipeline.settings.mqtt.port, creds=creds, qos=1
    )
    assert outcome.unanswered == 0
    wait_for_readings(pipeline, [e.tenant for e in spec.enterprises], result.true_readings)
    factory = spec.enterprises[0]
    grid_zone = f"{prefix}grid"
    _publish_intensity(pipeline.settings, factory.tenant, grid_zone, start, end)
    return Fleet(spec=spec, tenant=factory.tenant, site=factory.sites[0].site, vpp=vpp, grid_zone=grid_zone)


def _publish_intensity(settings: Settings, tenant: str, grid_zone: str, start_ms: int, end_ms: int) -> None:
    """Hourly intensity over the backfilled hours and the next day, in a zone of the factory's own, as
    the intensity service stores it (its Kafka path is tests/integration/test_grid_intensity.py)."""
    first_hour = start_ms - start_ms % 3_600_000
    with psycopg.connect(settings.db.conninfo()) as conn:
        conn.execute("UPDATE sites SET grid_zone = %s WHERE tenant_id = %s", (grid_zone, tenant))
        for ts in range(first_hour, end_ms + 25 * 3_600_000, 3_600_000):
            conn.execute(
                "INSERT INTO grid_intensity (zone, signal_type, basis, ts, duration_s, g_co2e_per_kwh, "
                "is_estimated, is_forecast, source, kafka_partition, kafka_offset) VALUES "
                "(%s, 'average', 'direct', to_timestamp(%s / 1000.0), 3600, %s, true, %s, 'test', 0, 0)",
                (grid_zone, ts, 500.0 + 10 * (ts // 3_600_000 % 24), ts > end_ms),
            )


@pytest.fixture(scope="module")
def vpp_service(pipeline: Pipeline, fleet: Fleet, deployed: set[str]) -> Iterator[None]:
    """The vpp service computing the fleet's capacity from its stored telemetry, while the VPP routes
    and resource models exist."""
    if "/v1/devices/{device}/resource" not in deployed or "/v1/vpps/{vpp}/capacity" not in deployed:
        yield
        return
    env = {
        **pipeline.env,
        "METERFLOW_VPP__GROUP": f"{pipeline.shared_group}-dashboard-vpp",
        "METERFLOW_VPP__METRICS_PORT": "0",
    }
    log_path = pipeline.log_dir / "dashboard-vpp.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "meterflow", "vpp"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        with pipeline.http() as http:
            while http.get(f"/v1/vpps/{fleet.vpp}/capacity", params={"duration_min": 60}).status_code != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the vpp service published no capacity for {fleet.vpp}: see {log_path}")
                time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(base_settings: Settings) -> Iterator[Browser]:
    # Installed here as well as by `stack up`: a reused healthy stack skips the bootstrap.
    chromium = bootstrap.install_browser(
        lambda msg: print(f"[bootstrap] {msg}", file=sys.stderr),  # noqa: T201
        base_settings.state_path / "bootstrap.log",
    )
    with sync_playwright() as playwright:
        # Debian's Chromium by path: Playwright's own browser download is never used.
        launched = playwright.chromium.launch(executable_path=str(chromium), headless=True)
        yield launched
        launched.close()


def _need(deployed: set[str], route: str) -> None:
    if route not in deployed:
        pytest.skip(f"GET {route} is not deployed yet")


def _api(pipeline: Pipeline, path: str, **params: Any) -> Any:
    with pipeline.http() as http:
        resp = http.get(path, params=params)
    assert resp.status_code == 200, (path, resp.status_code, resp.text)
    return resp.json()


@contextmanager
def _browse(
    browser: Browser, pipeline: Pipeline, path: str, key: str, *, typed: bool = True, block: str | None = None
) -> Iterator[Visit]:
    """`path` in a fresh browser profile. `typed`: the page asks for the key, which is typed in as a user
    would; otherwise the key is already stored. `block`: requests to matching URLs fail."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Asia/Shanghai")
    if block is not None:
        context.route(block, lambda route: route.abort())
    page = context.new_page()
    visit = Visit(page)
    page.on("pageerror", lambda exc: visit.errors.append(str(exc)))
    page.on("console", lambda msg: visit.console_errors.append(msg) if msg.type == "error" else None)
    page.on("request", lambda request: visit.requests.append(request))
    try:
        if not typed:
            page.goto(f"{pipeline.api_url}/dashboard/")
            page.evaluate("key => localStorage.setItem('meterflow.apiKey', key)", key)
        page.goto(f"{pipeline.api_url}/dashboard/{path}")
        if typed:
            page.get_by_label("Key", exact=True).fill(key)
            page.get_by_role("button", name="Use this key").click()
        yield visit
    finally:
        context.close()


def _settled(page: Page, panel: str, timeout_ms: float = 30_000) -> str:
    page.wait_for_function(
        "id => !['loading', undefined].includes(document.getElementById(id).dataset.state)",
        arg=panel,
        timeout=timeout_ms,
    )
    return str(page.get_attribute(f"#{panel}", "data-state"))


def _drawn(page: Page, panel: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of a series colour on the panel's chart canvas."""
    count = page.evaluate(
        """([id, rgb]) => {
            const canvas = document.querySelector(`#${id} canvas`);
            const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4) {
                if (Math.abs(px[i] - rgb[0]) < 8 && Math.abs(px[i + 1] - rgb[1]) < 8
                    && Math.abs(px[i + 2] - rgb[2]) < 8 && px[i + 3] > 200) n++;
            }
            return n;
        }""",
        [panel, list(rgb)],
    )
    return int(count)


def _assert_clean(visit: Visit, pipeline: Pipeline, deployed: set[str]) -> None:
    """No script error; the only console errors are the browser's own notes of 404s from routes that
    are not deployed; the key went in the Authorization header and never into a URL."""
    assert visit.errors == []
    for msg in visit.console_errors:
        url = urlsplit(msg.location.get("url", ""))
        assert "status of 404" in msg.text, msg.text
        assert url.path.startswith("/v1/") and not _served(url.path, deployed), (msg.text, url.path)
    api_calls = [r for r in visit.requests if urlsplit(r.url).path.startswith("/v1/")]
    assert api_calls
    for request in api_calls:
        assert pipeline.admin_key not in request.url
        assert request.headers.get("authorization") == f"Bearer {pipeline.admin_key}"


def _served(path: str, deployed: set[str]) -> bool:
    parts = path.split("/")
    for template in deployed:
        t = template.split("/")
        if len(t) == len(parts) and all(a == b or a.startswith("{") for a, b in zip(t, parts, strict=True)):
            return True
    return False


@pytest.fixture(scope="module")
def enterprise(browser: Browser, pipeline: Pipeline, fleet: Fleet) -> Iterator[Visit]:
    with _browse(
        browser, pipeline, f"enterprise.html?tenant={fleet.tenant}&site={fleet.site}", pipeline.admin_key
    ) as visit:
        for panel in ("load", "carbon", "account"):
            _settled(visit.page, panel)
        ARTIFACTS.mkdir(exist_ok=True)
        visit.page.screenshot(path=ARTIFACTS / "dashboard-enterprise.png", full_page=True)
        _narrow_screenshot(visit.page, "dashboard-enterprise-narrow.png")
        yield visit


@pytest.fixture(scope="module")
def operator(browser: Browser, pipeline: Pipeline, fleet: Fleet, vpp_service: None) -> Iterator[Visit]:
    with _browse(browser, pipeline, f"operator.html?vpp={fleet.vpp}", pipeline.admin_key) as visit:
        for panel in ("capacity", "live", "nodes", "stale-devices"):
            _settled(visit.page, panel)
        ARTIFACTS.mkdir(exist_ok=True)
        visit.page.screenshot(path=ARTIFACTS / "dashboard-operator.png", full_page=True)
        _narrow_screenshot(visit.page, "dashboard-operator-narrow.png")
        yield visit


def _narrow_screenshot(page: Page, name: str) -> None:
    """A phone-sized window: one column, nothing wider than the screen."""
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)  # the charts follow their container's new width on the next frame
    page.screenshot(path=ARTIFACTS / name, full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    page.set_viewport_size({"width": 1280, "height": 900})
    assert overflow <= 0, f"{name}: {overflow} px wider than a 390 px screen"


# --- both views ------------------------------------------------------------------------------------


def test_home_page_links_both_views(browser: Browser, pipeline: Pipeline) -> None:
    with _browse(browser, pipeline, "", pipeline.admin_key) as visit:
        page = visit.page
        assert page.title() == "meterflow dashboard"
        assert page.get_by_role("link", name="Operator view").is_visible()
        assert page.get_by_role("link", name="Enterprise view").is_visible()
        # The key is remembered by the browser, so the next page does not ask again.
        assert page.evaluate("localStorage.getItem('meterflow.apiKey')") == pipeline.admin_key
        page.goto(f"{pipeline.api_url}/dashboard/enterprise.html")
        assert page.locator("#key-dialog").is_hidden()
        assert visit.errors == []


def test_static_files_are_served_with_a_strict_policy(pipeline: Pipeline) -> None:
    resp = httpx.get(f"{pipeline.api_url}/dashboard/operator.html", timeout=30)
    assert resp.status_code == 200
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    assert httpx.get(f"{pipeline.api_url}/dashboard/vendor/uPlot.LICENSE", timeout=30).status_code == 200
    missing = httpx.get(f"{pipeline.api_url}/dashboard/no-such-file.js", timeout=30)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


def test_pages_load_without_errors(
    enterprise: Visit, operator: Visit, pipeline: Pipeline, deployed: set[str]
) -> None:
    for visit in (enterprise, operator):
        _assert_clean(visit, pipeline, deployed)
        # Every panel ended in a state a person can read: data, an empty note or a reason.
        for panel in visit.page.locator(".panel").all():
            state = panel.get_attribute("data-state")
            assert state in {"ready", "empty", "unavailable"}, (panel.get_attribute("id"), state)
            if state != "ready":
                assert panel.locator(".note").inner_text().strip()
    assert (ARTIFACTS / "dashboard-enterprise.png").stat().st_size > 0
    assert (ARTIFACTS / "dashboard-operator.png").stat().st_size > 0


def test_a_refused_key_is_asked_for_again(browser: Browser, pipeline: Pipeline, fleet: Fleet) -> None:
    with _browse(browser, pipeline, f"enterprise.html?tenant={fleet.tenant}", "mf_not_a_key") as visit:
        page = visit.page
        page.wait_for_function("() => !document.getElementById('key-dialog').hidden", timeout=30_000)
        assert "401" in page.locator("#key-message").inner_text()
        assert "refused" in page.locator("#tenants-note").inner_text()
        assert visit.errors == []


def test_an_enterprise_key_sees_only_its_enterprise(
    browser: Browser, pipeline: Pipeline, fleet: Fleet
) -> None:
    tenant = f"{fleet.tenant}-alone"
    with pipeline.http() as http:
        assert (
            http.post("/v1/enterprises", json={"tenant": tenant, "name": "No sites yet"}).status_code == 201
        )
        created = http.post("/v1/api-keys", json={"role": "enterprise", "tenant": tenant})
        assert created.status_code == 201, created.text
    key = created.json()["key"]
    # Asking for another tenant in the address shows nothing of it.
    path = f"enterprise.html?tenant={fleet.tenant}&site={fleet.site}"
    with _browse(browser, pipeline, path, key, typed=False) as visit:
        page = visit.page
        _settled(page, "load")
        assert page.locator("#tenant option").all_inner_texts() == [f"No sites yet ({tenant})"]
        assert page.get_attribute("#load", "data-state") == "empty"
        assert "no site" in page.locator("#load .note").inner_text()
        page.goto(f"{pipeline.api_url}/dashboard/operator.html?vpp={fleet.vpp}")
        _settled(page, "capacity")
        assert page.get_attribute("#capacity", "data-state") == "empty"
        assert "No VPP is visible to this key." in page.locator("#vpps-note").inner_text()
        assert visit.errors == []


# --- enterprise view -------------------------------------------------------------------------------


def _range(page: Page) -> dict[str, str]:
    """The selections the page keeps in its address."""
    return dict(
        json.loads(page.evaluate("JSON.stringify(Object.fromEntries(new URLSearchParams(location.search)))"))
    )


def _sent(visit: Visit, path: str) -> httpx.URL:
    """The last request the page made to `path`, to ask the API the same question."""
    sent = [r.url for r in visit.requests if urlsplit(r.url).path == path]
    assert sent, path
    return httpx.URL(sent[-1])


def test_load_curve_draws_the_site_load(
    enterprise: Visit, pipeline: Pipeline, fleet: Fleet, deployed: set[str]
) -> None:
    _need(deployed, "/v1/sites/{site}/load")
    page = enterprise.page
    sent = _sent(enterprise, f"/v1/sites/{fleet.site}/load")
    body = _api(pipeline, sent.path, **dict(sent.params))
    points = body["points"]
    assert len(points) >= HOURS * 4 - 1  # 15-minute intervals of the backfilled hours
    assert page.get_attribute("#load", "data-state") == "ready"
    assert int(page.get_attribute("#load", "data-points") or 0) == len(points)
    sums = json.loads(page.get_attribute("#load", "data-sums") or "[]")
    assert sums == pytest.approx([sum(p["peak_kw"] for p in points), sum(p["avg_kw"] for p in points)])
    assert float(page.get_attribute("#load", "data-energy-kwh") or 0) == pytest.approx(
        sum(p["energy_kwh"] or 0 for p in points)
    )
    # Net import: the site's PV and battery can make it negative, never exactly nothing.
    assert sum(p["energy_kwh"] or 0 for p in points) != 0
    # Three hours in a seven-day chart are a short line (about 15 px wide when the load is flat): the
    # figures are checked above, the pixels only show that the line was drawn.
    assert _drawn(page, "load", LOAD_RGB) > 15
    assert "kWh" in page.locator("#load-energy").inner_text()
    assert "kW" in page.locator("#load-peak").inner_text()
    assert _range(page)["site"] == fleet.site


def test_daily_carbon_draws_the_enterprise_days(
    enterprise: Visit, pipeline: Pipeline, fleet: Fleet, deployed: set[str]
) -> None:
    _need(deployed, "/v1/enterprises/{tenant}/carbon")
    page = enterprise.page
    sent = _sent(enterprise, f"/v1/enterprises/{fleet.tenant}/carbon")
    points = _api(pipeline, sent.path, **dict(sent.params))["points"]
    assert points and sum(p["co2e_kg"] for p in points) > 0
    assert page.get_attribute("#carbon", "data-state") == "ready"
    assert int(page.get_attribute("#carbon", "data-points") or 0) == len(points)
    sums = json.loads(page.get_attribute("#carbon", "data-sums") or "[]")
    assert sums[0] == pytest.approx(sum(p["co2e_kg"] for p in points))
    assert _drawn(page, "carbon", CARBON_RGB) > 50
    assert page.locator("#carbon table.data tbody tr").count() == len(points)
    assert "CO₂e" in (page.locator("#carbon table.data tbody").text_content() or "")


def test_estimated_carbon_draws_the_api_figures(
    enterprise: Visit, pipeline: Pipeline, fleet: Fleet, deployed: set[str]
) -> None:
    _need(deployed, "/v1/enterprises/{tenant}/carbon/estimated")
    page = enterprise.page
    sent = _sent(enterprise, f"/v1/enterprises/{fleet.tenant}/carbon/estimated")
    points = _api(pipeline, sent.path, **dict(sent.params))["points"]
    covered = [p for p in points if p["covered_kwh"] > 0]
    assert covered and sum(p["co2e_kg"] for p in covered) > 0
    assert page.get_attribute("#estimated", "data-state") == "ready"
    assert int(page.get_attribute("#estimated", "data-points") or 0) == len(points)
    sums = json.loads(page.get_attribute("#estimated", "data-sums") or "[]")
    assert sums[0] == pytest.approx(sum(p["co2e_kg"] for p in covered))
    assert _drawn(page, "estimated", ESTIMATED_RGB) > 20
    assert page.locator("#est-total").inner_text().endswith("CO₂e")
    # The next day is covered (forecast points), so a cleanest window is named, in the site's zone.
    assert "g/kWh" in page.locator("#est-best").inner_text()
    assert fleet.grid_zone in page.locator("#est-best-zone").inner_text()


def test_carbon_account_and_grade(
    enterprise: Visit, pipeline: Pipeline, fleet: Fleet, deployed: set[str]
) -> None:
    _need(deployed, "/v1/enterprises/{tenant}/carbon-account")
    page = enterprise.page
    year = _range(page)["year"]
    account = _api(pipeline, f"/v1/enterprises/{fleet.tenant}/carbon-account", year=year)
    assert page.get_attribute("#account", "data-state") == "ready"
    grade = account.get("grade")
    shown = page.locator("#acc-grade").inner_text()
    assert shown == (grade["label"] if grade else "Not graded")
    assert page.locator("#acc-scope2-location").inner_text().endswith("CO₂e")


# --- operator view ---------------------------------------------------------------------------------


def test_capacity_now(operator: Visit, pipeline: Pipeline, fleet: Fleet, deployed: set[str]) -> None:
    _need(deployed, "/v1/vpps/{vpp}/capacity")
    page = operator.page
    now = _api(pipeline, f"/v1/vpps/{fleet.vpp}/capacity", duration_min=60)
    assert now["devices_online"] > 0
    assert page.get_attribute("#capacity", "data-state") == "ready"
    # Capacity moves with the clock (energy-limited resources over the duration), a little between the
    # page's last update and this request.
    assert float(page.get_attribute("#capacity", "data-up-kw") or "nan") == pytest.approx(
        now["up_kw"], rel=0.02
    )
    assert float(page.get_attribute("#capacity", "data-down-kw") or "nan") == pytest.approx(
        now["down_kw"], rel=0.02
    )
    assert page.locator("#up-kw").inner_text().endswith("kW")
    assert page.locator("#online").inner_text() == str(now["devices_online"])


def test_live_chart_streams(operator: Visit, deployed: set[str]) -> None:
    _need(deployed, "/v1/vpps/{vpp}/capacity/stream")
    page = operator.page
    page.wait_for_function("() => document.getElementById('live').dataset.mode === 'stream'", timeout=30_000)
    # The stream's first event is the capacity now; later ones come only when it changes.
    page.wait_for_function(
        "() => Number(document.getElementById('live').dataset.updates) >= 2", timeout=30_000
    )
    assert int(page.get_attribute("#live", "data-points") or 0) >= 1
    assert _drawn(page, "live", UP_RGB) > 0


def test_live_chart_falls_back_to_polling(
    browser: Browser, pipeline: Pipeline, fleet: Fleet, deployed: set[str]
) -> None:
    _need(deployed, "/v1/vpps/{vpp}/capacity")
    # As behind a proxy that refuses streaming: the page must poll capacity-now instead.
    path = f"operator.html?vpp={fleet.vpp}"
    with _browse(
        browser, pipeline, path, pipeline.admin_key, typed=False, block="**/capacity/stream*"
    ) as visit:
        page = visit.page
        page.wait_for_function(
            "() => document.getElementById('live').dataset.mode === 'poll'", timeout=30_000
        )
        assert "polling every 2 s" in page.locator("#live-mode").inner_text()
        updates = int(page.get_attribute("#live", "data-updates") or 0)
        page.wait_for_function(
            f"() => Number(document.getElementById('live').dataset.updates) > {updates + 1}", timeout=30_000
        )
        assert int(page.get_attribute("#live", "data-points") or 0) >= 1
        assert visit.errors == []


def test_nodes_and_stale_devices(
    operator: Visit, pipeline: Pipeline, fleet: Fleet, deployed: set[str]
) -> None:
    _need(deployed, "/v1/vpps/{vpp}/capacity/nodes")
    _need(deployed, "/v1/vpps/{vpp}/stale-devices")
    page = operator.page
    nodes = _api(pipeline, f"/v1/vpps/{fleet.vpp}/capacity/nodes", duration_min=60)["nodes"]
    assert nodes
    assert page.locator("#nodes tbody tr").count() == len(nodes)
    assert {n["node"] for n in nodes} == set(page.locator("#nodes tbody th").all_inner_texts())
    stale = _api(pipeline, f"/v1/vpps/{fleet.vpp}/stale-devices")["devices"]
    assert page.locator("#stale-devices tbody tr").count() == len(stale)
    assert page.get_attribute("#stale-devices", "data-state") == ("ready" if stale else "empty")
