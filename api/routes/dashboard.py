"""The dashboard: static HTML, ES modules and CSS under `/dashboard/`, no build step. The pages call the
`/v1` routes with the user's API key themselves, so serving them needs no authentication."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"

# Scripts and styles from this origin only (no inline script), so an injected string in a device or
# site name can never run; connect-src 'self' keeps the API key from being sent anywhere else.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated each time (ETag), so a new release's files are never mixed with cached old ones.
    "Cache-Control": "no-cache",
}


class _DashboardFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


router = APIRouter(include_in_schema=False)
router.mount("/dashboard", _DashboardFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")
