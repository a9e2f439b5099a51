"""The emission-factor library as versioned reference data: readable by every key, written by admins.

A factor id always means the same number. A corrected or final value is a new factor that `replaces`
the old one, which stays stored (reports cite it) but leaves the library in force; carbon figures are
computed at query time, so they follow at once."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from psycopg.rows import dict_row
from pydantic import ValidationError

from api.access import AccessDep
from api.models import EmissionFactorIn, EmissionFactorOut, Page
from api.problems import Problem
from api.query import pool
from processing.carbon import FACTOR_COLUMNS, active_library, library_from_rows

router = APIRouter(prefix="/v1", tags=["emission factors"])

_COLS = f"{', '.join(FACTOR_COLUMNS)}, origin, replaces, superseded_by, created_at"
_SCOPE = {"electricity": 2, "heat": 2, "natural_gas": 1, "diesel": 1}


def _out(row: dict[str, Any]) -> EmissionFactorOut:
    return EmissionFactorOut.model_validate({**row, "provisional": row["status"] == "provisional"})


@router.get("/emission-factors")
async def list_factors(
    who: AccessDep,
    request: Request,
    carrier: str | None = None,
    kind: str | None = None,
    region: str | None = None,
    year: int | None = Query(default=None, ge=1900, le=2200),
    include_superseded: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    cursor: str | None = Query(default=None, description="next_cursor of the previous page"),
) -> Page[EmissionFactorOut]:
    """Factors in factor-id order, in force only unless `include_superseded`."""
    async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLS} FROM emission_factors WHERE (%(carrier)s::text IS NULL OR carrier = %(carrier)s) "
            "AND (%(kind)s::text IS NULL OR kind = %(kind)s) AND (%(region)s::text IS NULL OR region = %(region)s) "
            "AND (%(year)s::int IS NULL OR year = %(year)s) AND (%(all)s OR superseded_by IS NULL) "
            "AND factor_id > %(after)s ORDER BY factor_id LIMIT %(limit)s",
            {
                "carrier": carrier,
                "kind": kind,
                "region": region,
                "year": year,
                "all": include_superseded,
                "after": cursor or "",
                "limit": limit + 1,
            },
        )
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page[EmissionFactorOut](
        data=[_out(r) for r in rows], next_cursor=rows[-1]["factor_id"] if more else None
    )


@router.get("/emission-factors/{factor_id}")
async def get_factor(factor_id: str, who: AccessDep, request: Request) -> EmissionFactorOut:
    async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {_COLS} FROM emission_factors WHERE factor_id = %s", (factor_id,))
        row = await cur.fetchone()
    if row is None:
        raise Problem(404, "not-found", "Not found", f"no emission factor {factor_id!r}")
    return _out(row)


@router.post("/emission-factors", status_code=201)
async def create_factor(body: EmissionFactorIn, who: AccessDep, request: Request) -> EmissionFactorOut:
    """Add a factor, optionally superseding one (`replaces`). Admin only. The library with the new
    factor must still validate (one factor per carrier, kind, region and year in force, units, fuel
    inputs reproducing the value)."""
    who.require_admin()
    row = {
        "factor_id": body.factor_id,
        "carrier": body.carrier,
        "scope": _SCOPE[body.carrier],
        "kind": body.kind,
        "region": body.region,
        "year": body.year,
        "value": body.value,
        "unit": body.unit,
        "status": body.status,
        "published": body.published,
        "publisher": body.publisher,
        "document": body.document,
        "source_url": body.source_url,
        "note": body.note,
        "replaces": body.replaces,
        "sources": [{"title": body.document, "url": body.source_url, "evidence": body.evidence}],
        "inputs": body.inputs,
    }
    async with pool(request).connection() as conn:
        async with conn.transaction():
            # One writer at a time: the check below must see every factor in force.
            await conn.execute("LOCK TABLE emission_factors IN SHARE ROW EXCLUSIVE MODE")
            library = await active_library(conn)
            cur = await conn.execute(
                f"SELECT {', '.join(FACTOR_COLUMNS)}, superseded_by FROM emission_factors"
            )
            names = [d.name for d in cur.description or ()]
            stored = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
            if any(r["factor_id"] == body.factor_id for r in stored):
                raise Problem(
                    409,
                    "conflict",
                    "Already exists",
                    f"factor {body.factor_id!r} exists; ids never change meaning",
                )
            if body.replaces is not None:
                old = next((r for r in stored if r["factor_id"] == body.replaces), None)
                if old is None or old["superseded_by"]:
                    raise Problem(
                        422,
                        "unknown-reference",
                        "Nothing to replace",
                        f"no factor {body.replaces!r} in force",
                    )
                old["superseded_by"] = body.factor_id
            candidate = {**row, "library_version": library.version + 1, "superseded_by": None}
            try:
                library_from_rows([*stored, candidate])
            except ValidationError as exc:
                reason = "; ".join(str(e["msg"]) for e in exc.errors())
                raise Problem(422, "invalid-factor", "Invalid factor", reason[:500]) from exc
            except ValueError as exc:
                raise Problem(422, "invalid-factor", "Invalid factor", str(exc)[:500]) from exc
            await conn.execute(
                f"INSERT INTO emission_factors ({', '.join(FACTOR_COLUMNS)}, origin, replaces, created_by) VALUES "
                f"({', '.join('%(' + c + ')s' for c in FACTOR_COLUMNS)}, 'admin', %(replaces)s, %(created_by)s)",
                {
                    **candidate,
                    "sources": orjson.dumps(row["sources"]).decode(),
                    "inputs": None if body.inputs is None else orjson.dumps(body.inputs).decode(),
                    "created_by": who.key_id,
                },
            )
            if body.replaces is not None:
                await conn.execute(
                    "UPDATE emission_factors SET superseded_by = %s WHERE factor_id = %s",
                    (body.factor_id, body.replaces),
                )
        async with conn.cursor(row_factory=dict_row) as dcur:
            await dcur.execute(
                f"SELECT {_COLS} FROM emission_factors WHERE factor_id = %s", (body.factor_id,)
            )
            created = await dcur.fetchone()
    if created is None:
        raise RuntimeError("inserted factor not found")
    return _out(created)
