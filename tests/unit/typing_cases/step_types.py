"""Checked by mypy in tests/unit/test_step_typing.py, never run.

``ctx.step`` returns the type its step function returns and checks the step's
arguments against the function. A line whose end comment says ``revealed: T``
must reveal T, one saying ``error: CODE`` must be that mypy error, and no other
line may have either.
"""

from typing import reveal_type

from intentd.agent import Context, SyncContext


async def fetch_int(source: str, retries: int = 3) -> int:
    return len(source) + retries


def count_rows(source: str) -> list[str]:
    return [source]


async def handler(ctx: Context, payload: dict[str, str]) -> None:
    reveal_type(await ctx.step("x", fetch_int, "s3://bucket"))  # revealed: int
    reveal_type(await ctx.step("kw", fetch_int, "s3://bucket", retries=5))  # revealed: int
    reveal_type(await ctx.step("rows", count_rows, "s3://bucket"))  # revealed: list[str]
    reveal_type(ctx.attempt)  # revealed: int
    reveal_type(ctx.deadline)  # revealed: datetime.datetime | None
    validate = ctx.step_fn("validate")(fetch_int)
    reveal_type(await validate("s3://bucket"))  # revealed: int
    reveal_type(await ctx.step_fn()(count_rows)("s3://bucket"))  # revealed: list[str]


def sync_handler(ctx: SyncContext, payload: dict[str, str]) -> None:
    reveal_type(ctx.step("x", fetch_int, "s3://bucket"))  # revealed: int
    reveal_type(ctx.step("rows", count_rows, "s3://bucket"))  # revealed: list[str]
    reveal_type(ctx.step_fn()(count_rows)("s3://bucket"))  # revealed: list[str]
    reveal_type(ctx.step_fn("x")(fetch_int)("s3://bucket"))  # revealed: int


async def wrong_arguments(ctx: Context) -> None:
    await ctx.step("x", fetch_int, 42)  # error: call-overload
    await ctx.step("x", fetch_int, "s3://bucket", tries=5)  # error: call-arg
    await ctx.step("x", fetch_int)  # error: call-overload
    ctx.intent_id = "another"  # error: assignment
    await ctx.step_fn()(fetch_int)(42)  # error: arg-type


def wrong_arguments_sync(ctx: SyncContext) -> None:
    ctx.step("rows", count_rows, source=1)  # error: call-overload
