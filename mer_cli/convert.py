"""The conversion loop both importers share: encode tensors on a thread pool,
write them into a :class:`StoreWriter` in order from one thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mer_cli import interrupt
from mer_cli.formats.store import PartLayout, StoreWriter
from mer_cli.models.config import ModelConfig

#: encoded bytes allowed between the converter threads and the writer
INFLIGHT_BYTES = 1 << 30


def run_ordered(
    jobs: Iterator[tuple[Any, Callable[[], Any]]],
    consume: Callable[[Any, Any], None],
    threads: int,
    inflight: int,
) -> None:
    """Run ``jobs`` on a thread pool; ``consume(key, result)`` in order, here.

    At most ``inflight`` results exist at once. On any exception (Ctrl-C
    included) queued jobs are cancelled and running ones finish before this
    returns, so nothing touches the inputs afterwards.
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mer-quantize")
    window: deque[tuple[Any, Future]] = deque()
    try:
        for key, fn in jobs:
            window.append((key, pool.submit(fn)))
            if len(window) >= inflight:
                k, fut = window.popleft()
                consume(k, interrupt.result(fut))
        while window:
            k, fut = window.popleft()
            consume(k, interrupt.result(fut))
    finally:
        for _, fut in window:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def write_store(
    out: str | Path,
    cfg: ModelConfig,
    items: Iterable[Any],
    *,
    encode: Callable[[Any, dict[str, PartLayout]], Callable[[], Any]],
    finished: Callable[[Any], int],
    total_bytes: int,
    tokenizer: dict[str, Any],
    tokenizer_json: bytes,
    source: dict[str, Any],
    experts: str,
    dense: str,
    force: bool,
    threads: int,
    progress: bool,
    max_file_size: int | None,
) -> Path:
    """Convert ``items`` into a store at ``out`` (atomically) and return its path.

    ``items`` are dense items (``name``, ``dtype``, ``shape``) or expert items
    (``layer``, ``expert``), in the order they are written. ``encode(item,
    parts)`` returns a job producing the item's store bytes (an expert's: a dict
    of ``parts``); ``finished(item)`` releases its inputs and returns how many
    input bytes it covered, for the progress bar.
    """
    from tqdm import tqdm

    with (
        StoreWriter(
            out,
            cfg,
            expert_dtype=experts,
            dense_dtype=dense,
            tokenizer=tokenizer,
            source=source,
            force=force,
            max_file_size=max_file_size,
        ) as writer,
        tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="quantize",
            disable=not progress,
            smoothing=0.05,
        ) as bar,
    ):
        writer.add_file("tokenizer.json", tokenizer_json)
        inflight = max(2, min(2 * threads, INFLIGHT_BYTES // writer.extent_nbytes))

        def consume(item: Any, result: Any) -> None:
            if hasattr(item, "expert"):
                writer.add_expert(item.layer, item.expert, result)
            else:
                writer.add_dense(item.name, result, item.dtype, item.shape)
            bar.update(finished(item))

        jobs = ((it, encode(it, writer.parts)) for it in items)
        run_ordered(jobs, consume, threads, inflight)
        return writer.commit()
