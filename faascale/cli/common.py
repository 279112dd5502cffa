"""What the commands share: a user error is one ``error:`` line on stderr and exit status 2 (never
a traceback); the state directory and the platform's client."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer


def _user_errors() -> tuple[type[BaseException], ...]:
    from faascale.engine.config import ConfigError
    from faascale.engine.engine import PromptTooLongError
    from faascale.engine.manifest import CheckpointError
    from faascale.engine.model import ShardWeightsError
    from faascale.engine.sampling import SamplingParamsError
    from faascale.engine.sources import SourceError
    from faascale.engine.tokenizer import ChatTemplateError
    from faascale.platform.client import PlatformError
    from faascale.platform.instance import PlatformLockError
    from faascale.coldstart.dataset import DatasetError
    from faascale.coldstart.probe import ProbeError
    from faascale.coldstart.model import FeatureError
    from faascale.coldstart.vllm_log import VllmLogError
    from faascale.platform.spec import SpecError
    from faascale.platform.warm_pool import PoolSettingError

    return (CheckpointError, ConfigError, PromptTooLongError, SamplingParamsError, SourceError,
            SpecError, ChatTemplateError, ShardWeightsError, FileNotFoundError, PlatformError,
            VllmLogError, DatasetError, FeatureError, ProbeError, PoolSettingError,
            PlatformLockError)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def state_dir() -> Any:
    from faascale.platform.state import StateDir

    return StateDir()


def platform_client(admin: bool = True) -> Any:
    from faascale.platform.client import PlatformClient

    return PlatformClient.from_state(state_dir(), admin=admin)

