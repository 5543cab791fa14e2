"""The HTTP gateway on the real stack: one pipeline for the module (synthetic renderers, the gateway on),
driven over HTTP as a client would drive it, and the console driven in headless Chromium.

Covers submit (idempotency, validation problems, size limit, rate limit), lookup with fresh presigned
URLs, the SSE stream and its resumption with Last-Event-ID, cancel, the paginated history, tenant
isolation for every per-request route, API keys created, listed and revoked with `aigc keys`, and the
console: submit in the page, watch the progress move and the image appear in the gallery.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aigc.cli import main
from infra.pipeline import running_pipeline
from plumbing.metadata import connect
from plumbing.settings import ModelSpec, Settings
from plumbing.supervisor import Supervisor, free_port
from producers.gateway.keys import KeyStore

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".aigc" / "artifacts" / "console"
SERVICE_MS = 1500.0  # per frame: long enough for progress events mid-render
STEPS = 6
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Gateway:
    url: str
    settings: Settings
    keys: dict[str, str]  # tenant -> key; "ops" is an operator key
    supervisor: Supervisor

    def client(self, tenant: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


@pytest.fixture(scope="module")
def gw(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    settings = infra.model_copy(
        update={
            "home": tmp_path_factory.mktemp("gateway"),
            "models": {"synth": ModelSpec(path=Path("/synthetic"), backend="synthetic", max_batch=1)},
            "renderer": infra.renderer.model_copy(update={"progress_interval_s": 0.2}),
            "gateway": infra.gateway.model_copy(
                update={"port": port, "rate_per_s": 2.0, "rate_burst": 12.0, "key_cache_s": 0.0}
            ),
        }
    )
    with running_pipeline(
        settings,
        synthetic_ms=SERVICE_MS,
        isolate="gw",
        drop=True,
        gateway=True,
        echo=lambda line: print(f"[pipeline] {line}"),
    ) as pipe:
        cluster, session = connect(pipe.settings.cassandra)
        try:
            store = KeyStore(session, pipe.settings.cassandra.keyspace)
            keys = {t: store.create(t)[1] for t in ("alpha", "beta", "gamma", "browser")}
            keys["ops"] = store.create("operators", operator=True)[1]
        finally:
            cluster.shutdown()
        yield Gateway(f"http://127.0.0.1:{port}", pipe.settings, keys, pipe.supervisor)


def image(**extra: object) -> dict[str, object]:
    return {"prompt": "a lantern in fog", "width": 64, "height": 64, "steps": STEPS, **extra}


def sse(
    client: httpx.Client, request_id: str, last_event_id: str | None = None, most: int | None = None
) -> list[dict[str, object]]:
    """Every event of the request's stream until it ends (after the completion), or its first ``most``."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = [], {}
    with client.stream(
        "GET", f"/v1/generations/{request_id}/events", headers=headers, timeout=TIMEOUT_S
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "data" in current:
                    events.append({**current, "data": json.loads(current["data"])})
                    if most is not None and len(events) >= most:
                        break
                current = {}
            elif not line.startswith((":", "retry:")):
                name, _, value = line.partition(": ")
                current[name] = value
    return events


def unsigned(record: dict[str, object]) -> dict[str, object]:
    """``record`` without its outputs' presigned URLs, which are signed afresh on every read."""
    outputs = record.get("outputs")
    if not isinstance(outputs, list):
        return record
    return {**record, "outputs": [{k: v for k, v in o.items() if k != "url"} for o in outputs]}


def wait_state(client: httpx.Client, request_id: str, states: set[str]) -> dict[str, object]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        body = client.get(f"/v1/generations/{request_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.3)
    raise AssertionError(f"{request_id} never reached {states}: {body}")


def history(client: httpx.Client, limit: int) -> list[dict[str, Any]]:
    """The whole history, fetched page by page (``limit`` a page), newest first."""
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.get(
            "/v1/generations", params={"limit": limit, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        seen += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if not cursor:
            return seen


def test_submit_stream_resume_get_and_history(gw: Gateway) -> None:
    with gw.client("alpha") as client:
        idem = uuid.uuid4().hex
        first = client.post("/v1/generations", json=image(), headers={"Idempotency-Key": idem})
        assert first.status_code == 202, first.text
        rid = first.json()["id"]
        assert first.headers["location"] == f"/v1/generations/{rid}"
        again = client.post("/v1/generations", json=image(), headers={"Idempotency-Key": idem})
        assert again.status_code == 202 and again.json()["id"] == rid  # the same request, not a second one

        events = sse(client, rid)
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "completion" and kinds.count("completion") == 1, kinds
        assert events[-1]["data"]["status"] == "SUCCEEDED"
        done = [
            e["data"]["done"] for e in events if e["event"] == "status" and e["data"]["state"] == "RUNNING"
        ]
        assert done == sorted(done) and len(set(done)) >= 2, f"progress did not move: {done}"
        ids = [e["id"] for e in events]
        assert len(set(ids)) == len(ids)

        # A reconnect from the second event's id gets exactly the events after it: no gap, no repeat.
        resumed = sse(client, rid, last_event_id=ids[1])
        assert [e["id"] for e in resumed] == ids[2:]
        assert [unsigned(e["data"]) for e in resumed] == [unsigned(e["data"]) for e in events[2:]]

        got = client.get(f"/v1/generations/{rid}").json()
        assert got["state"] == "SUCCEEDED" and got["kind"] == "IMAGE"
        assert got["timings"]["total_ms"] > 0
        (output,) = got["outputs"]
        png = httpx.get(output["url"], timeout=10)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

        # Three more, then the history page by page, newest first, each exactly once.
        more = [client.post("/v1/generations", json=image(steps=1)).json()["id"] for _ in range(3)]
        for other in more:
            wait_state(client, other, {"SUCCEEDED"})
        # The history's row is written after the request's own row (a chore of the sink's batch, before its
        # transaction commits), so a request can read SUCCEEDED a moment before the history lists it.
        deadline = time.monotonic() + TIMEOUT_S
        seen = history(client, limit=2)
        while not {*more, rid} <= {i["id"] for i in seen}:
            assert time.monotonic() < deadline, f"the history lists {[i['id'] for i in seen]}"
            time.sleep(0.3)
            seen = history(client, limit=2)
        assert [i["id"] for i in seen[:4]] == [*reversed(more), rid]
        assert len({i["id"] for i in seen}) == len(seen)
        assert all(i["outputs"] and i["outputs"][0]["url"].startswith("http") for i in seen)


def test_a_stream_resumes_across_a_gateway_restart(gw: Gateway) -> None:
    with gw.client("alpha") as client:
        rid = client.post("/v1/generations", json=image()).json()["id"]
        first = sse(client, rid, most=1)
        gw.supervisor.signal("gateway", signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_S
        while "gateway" not in gw.supervisor.alive() or gw.supervisor.children["gateway"].restarts == 0:
            gw.supervisor.poll()
            assert time.monotonic() < deadline, "the gateway did not come back"
            time.sleep(0.2)
        assert gw.supervisor.wait_ready(TIMEOUT_S)
        rest = sse(client, rid, last_event_id=str(first[-1]["id"]))
        whole = sse(client, rid)
    assert [e["id"] for e in first + rest] == [e["id"] for e in whole]
    assert [e["event"] for e in whole][-1] == "completion"


def test_bad_requests_are_problem_documents(gw: Gateway) -> None:
    with gw.client("beta") as client:
        bad = client.post("/v1/generations", json=image(width=100))
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/problem+json"
        problem = bad.json()
        assert problem["field"] == "width" and problem["code"] == "INVALID_WIDTH", problem
        assert {"type", "title", "status", "detail"} <= problem.keys()

        unknown = client.post("/v1/generations", json=image(tenant_id="alpha")).json()
        assert unknown["field"] == "tenant_id" and unknown["status"] == 400  # the tenant comes from the key

        frames = client.post("/v1/generations", json=image(video={"num_frames": 1})).json()
        assert frames["field"] == "video.num_frames"

        hook = client.post("/v1/generations", json=image(webhook_url="https://user:pw@example.com/h")).json()
        assert (hook["field"], hook["code"]) == ("webhook_url", "INVALID_WEBHOOK_URL")  # the pipeline's rule

        model = client.post("/v1/generations", json=image(model="nope")).json()
        assert model["code"] == "UNKNOWN_MODEL"

        big = client.post("/v1/generations", json=image(prompt="x" * 70_000))
        assert big.status_code == 413 and big.json()["status"] == 413

        missing = client.get("/v1/generations/nope").json()
        assert missing["status"] == 404

    with gw.client(None) as anonymous:
        assert anonymous.get("/v1/generations").status_code == 401
        forged = anonymous.get(
            "/v1/generations", headers={"Authorization": "Bearer aigc_0123456789ab_" + "x" * 43}
        )
        assert forged.status_code == 401 and forged.json()["title"] == "Invalid API key"
        docs = anonymous.get("/openapi.json").json()
        assert {
            "/v1/generations",
            "/v1/generations/{request_id}",
            "/v1/generations/{request_id}/events",
            "/v1/generations/{request_id}/cancel",
        } <= docs["paths"].keys()
        assert anonymous.get("/docs").status_code == 200


def test_one_tenant_cannot_touch_another_tenants_request(gw: Gateway) -> None:
    with gw.client("alpha") as alpha, gw.client("beta") as beta:
        rid = alpha.post("/v1/generations", json=image(steps=2)).json()["id"]
        assert beta.get(f"/v1/generations/{rid}").status_code == 404
        assert beta.get(f"/v1/generations/{rid}/events").status_code == 404
        assert beta.post(f"/v1/generations/{rid}/cancel").status_code == 404
        wait_state(alpha, rid, {"SUCCEEDED"})
        assert beta.get(f"/v1/generations/{rid}").status_code == 404  # nor once it is finished
        assert rid not in {
            i["id"] for i in beta.get("/v1/generations", params={"limit": 200}).json()["items"]
        }
        assert rid in {i["id"] for i in alpha.get("/v1/generations", params={"limit": 200}).json()["items"]}
        # The same Idempotency-Key from two tenants names two requests.
        a = alpha.post("/v1/generations", json=image(steps=1), headers={"Idempotency-Key": "same"}).json()[
            "id"
        ]
        b = beta.post("/v1/generations", json=image(steps=1), headers={"Idempotency-Key": "same"}).json()[
            "id"
        ]
        assert a != b
        assert beta.get(f"/v1/generations/{a}").status_code == 404


def test_cancel_ends_a_request_cancelled(gw: Gateway) -> None:
    with gw.client("beta") as client:
        rid = client.post(
            "/v1/generations", json=image(video={"num_frames": 12, "fps": 8}, priority="LOW")
        ).json()["id"]
        cancelled = client.post(f"/v1/generations/{rid}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "CANCEL_REQUESTED"
        assert wait_state(client, rid, {"CANCELLED", "SUCCEEDED", "FAILED"})["state"] == "CANCELLED"
        assert client.post(f"/v1/generations/{rid}/cancel").status_code == 409


def test_a_key_over_its_rate_gets_429_with_retry_after(gw: Gateway) -> None:
    with gw.client("gamma") as client:
        answers = [client.post("/v1/generations", json=image(width=7)) for _ in range(20)]
    codes = [a.status_code for a in answers]
    assert codes[:12] == [400] * 12 and 429 in codes, codes  # the burst, then the limit
    limited = next(a for a in answers if a.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["content-type"] == "application/problem+json"


def test_keys_cli_creates_lists_and_revokes(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # The `aigc` entry point itself, in this process (an interpreter start per verb costs seconds here).
    for name, value in gw.settings.to_env().items():
        monkeypatch.setenv(name, value)

    def aigc(*args: str) -> tuple[int, str]:
        code = main(["keys", *args])
        return code, capfd.readouterr().out

    code, out = aigc("create", "delta", "--label", "ci", "--json")
    assert code == 0, out
    made = json.loads(out)
    code, listed = aigc("ls", "--tenant", "delta")
    assert made["key_id"] in listed and "active" in listed and made["key"] not in listed
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {made['key']}"}) as client:
        assert client.get("/v1/whoami").json()["tenant_id"] == "delta"
        code, out = aigc("revoke", made["key_id"])
        assert code == 0 and "revoked" in out
        assert client.get("/v1/whoami").status_code == 401
    assert aigc("revoke", "000000000000")[0] == 1
    assert aigc("create", "no spaces allowed")[0] == 2


def test_operator_overview_and_replay_dry_run(gw: Gateway) -> None:
    with gw.client("alpha") as tenant:
        assert tenant.get("/v1/ops/overview").status_code == 403
    with gw.client("ops") as ops:
        overview = ops.get("/v1/ops/overview")
        assert overview.status_code == 200, overview.text
        stages = {s["stage"]: s["ready"] for s in overview.json()["stages"]}
        assert stages.get("gateway") and stages.get("gatekeeper"), stages
        assert overview.json()["dead_letters"]["total"] >= 0
        dry = ops.post("/v1/ops/dlq/replay-dry-run").json()
        assert dry["summary"].startswith("replay (dry run")


@pytest.mark.skipif(
    not shutil.which("chromedriver"), reason="needs chromium and chromium-driver (make setup)"
)
def test_console_in_headless_chromium(gw: Gateway) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    shots = []

    def shot(name: str) -> None:
        path = ARTIFACTS / f"{name}.png"
        driver.save_screenshot(str(path))
        shots.append(path)

    try:
        driver.get(f"{gw.url}/console/")
        driver.find_element(By.ID, "api-key").send_keys(gw.keys["browser"])
        driver.find_element(By.ID, "use-key").click()
        WebDriverWait(driver, 10).until(lambda d: "browser" in d.find_element(By.ID, "whoami").text)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a lighthouse at dusk")
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys(str(STEPS))
        driver.find_element(By.ID, "submit").click()
        shot("1-submitted")
        progress = driver.find_element(By.ID, "progress")
        values = []

        def moved(_: object) -> bool:
            values.append(float(progress.get_attribute("value") or 0))
            return 0 < values[-1] < float(progress.get_attribute("max") or 1)

        WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.05).until(moved)
        shot("2-progress")
        request_id = driver.find_element(By.ID, "job-id").text
        img = WebDriverWait(driver, TIMEOUT_S).until(
            lambda d: d.find_element(By.CSS_SELECTOR, f"figure[data-id='{request_id}'] img")
        )
        size = int(driver.find_element(By.ID, "size").get_attribute("value"))
        natural = "return arguments[0].complete && arguments[0].naturalWidth"
        WebDriverWait(driver, 10).until(lambda _: driver.execute_script(natural, img) == size)
        assert driver.find_element(By.ID, "state").text == "SUCCEEDED"
        shot("3-gallery")

        key = driver.find_element(By.ID, "api-key")
        key.clear()
        key.send_keys(gw.keys["ops"])
        driver.find_element(By.ID, "use-key").click()
        stages = "#ops-stages tbody tr"
        WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, stages)) >= 5)
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, stages)]
        assert any(r.startswith("gateway ready") for r in rows), rows
        driver.find_element(By.ID, "ops-replay").click()
        WebDriverWait(driver, 20).until(lambda d: "dry run" in d.find_element(By.ID, "ops-replay-out").text)
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        shot("4-operator")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        print("console screenshots:", *shots, sep="\n  ")
        driver.quit()
