"""A progress bar on stderr (tqdm) that can be switched off."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, enabled: bool = True, total: Optional[int] = None) -> Iterator[T]:
    """Iterate ``items``, showing a tqdm bar labelled ``desc`` on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, unit="ex", leave=False, dynamic_ncols=True)
