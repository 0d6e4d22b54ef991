"""/docs (Swagger UI) and /redoc render from vendored files: no request leaves loopback."""

from __future__ import annotations

from collections.abc import Callable

from playwright.sync_api import expect

from tests.conftest import Server
from tests.ui.conftest import Dash


def test_swagger_ui_works_offline(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    page = dash.open("/docs")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible(timeout=20_000)
    assert page.locator(".opblock").count() >= 10
    expect(page.locator('.opblock-summary-path[data-path="/v1/batches"]').first).to_be_visible()
    page.locator('.opblock-summary-path[data-path="/v1/batches"]').first.click()
    expect(page.locator(".opblock-body").first).to_be_visible()
    dash.shot("17-docs-swagger")
    assert dash.outside == []
    assert dash.violations() == []


def test_redoc_works_offline(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    page = dash.open("/redoc")
    expect(page.locator(".api-content")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("/v1/batches/{batch_id}/cancel").first).to_be_attached()
    dash.shot("18-docs-redoc")
    assert dash.outside == []
    # ReDoc's sidebar logo points at its CDN: the page's CSP refuses it before any request is made
    assert dash.violations() == ["img-src https://cdn.redoc.ly/redoc/logo-mini.svg"]
