"""/docs and /redoc work on a closed network: every asset they load comes from the gateway."""

from __future__ import annotations

import re

import pytest

from tests.helpers.app import make_settings, running_app

# src="..." / href="..." in the HTML, and url: '...' in Swagger UI's init script.
_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_doc_pages_load_nothing_from_another_host(sqlite_url: str, page: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.get(page)
        assert response.status_code == 200
        html = response.text
        references = [a or b for a, b in _REFERENCE.findall(html)]
        assert references, html
        assert "http://" not in html
        assert "https://" not in html
        assert "//fonts." not in html
        if page == "/docs":
            assert "validatorUrl: null" in html.replace('"validatorUrl"', "validatorUrl")
        for reference in references:
            assert reference.startswith("/"), f"{page} loads {reference} from elsewhere"
            asset = await client.get(reference)
            assert asset.status_code == 200, reference
            assert asset.content, reference


async def test_the_document_is_openapi_with_the_gateway_errors(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorResponse"]["required"] == ["error"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["messages"]
    # The configured cap is what the document says.
    assert body["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 32768
    health = document["paths"]["/health"]["get"]
    assert "security" not in health
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"] or path.startswith("/api/chat"), (
                method,
                path,
            )
            assert "default" in operation["responses"], (method, path)


async def test_unknown_doc_asset_is_404(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.get("/docs/assets/..%2f..%2fsettings.py")
        assert response.status_code == 404
        assert (await client.get("/docs/assets/swagger-ui.css")).status_code == 200
