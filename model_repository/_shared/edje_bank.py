"""The token bank's store: a collection's tokens in memory, kept up to date (no Triton needed).

Used by ``edje_token_bank`` and by ``make bench`` (the gather figure). It needs only numpy and
pylance, never the client package, and reads the collection format that
``edje_client.collection`` documents: the ``tokens`` column (float16, or int8 with
``token_scales``) and the ``edje`` schema metadata.
"""

from __future__ import annotations

import json
import os

import numpy as np

METADATA_KEY = b"edje"


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def physical_memory_bytes() -> int:
    """The memory this process may use: the machine's RAM, or its container's limit if lower.

    A pod's memory limit (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) is what an
    oversized bank would run into, as an OOM kill; refusing it at load is clearer.
    """
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


class TokenBank:
    """A collection's tokens in memory, float16 ``[rows, Q, D]``, kept up to date.

    Parameters
    ----------
    uri
        The collection (a Lance dataset).
    max_bytes
        Refuse a bank larger than this (its tokens as float16): shard it across servers.
    expect
        ``(Q, D)`` the ranker takes; ``model_id`` the server's model (``""``: unchecked).
    """

    def __init__(
        self,
        uri: str,
        max_bytes: int,
        expect: tuple[int, int],
        model_id: str = "",
        storage_options: dict[str, str] | None = None,
    ) -> None:
        import lance

        try:
            self.dataset = lance.dataset(uri, storage_options=storage_options)
        except (ValueError, OSError) as exc:
            raise ValueError(f"token bank {uri}: cannot open the collection ({exc})") from None
        raw = (self.dataset.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"token bank {uri} is not an EDJE collection (no edje metadata)")
        meta = json.loads(raw)
        shape = (int(meta["num_tokens"]), int(meta["token_width"]))
        if shape != tuple(expect):
            raise ValueError(f"token bank {uri} holds {shape} tokens, the ranker takes {expect}")
        if model_id and meta.get("model_id") and meta["model_id"] != model_id:
            raise ValueError(
                f"token bank {uri} was made by model {meta['model_id']!r}, this server "
                f"serves {model_id!r}"
            )
        self.uri, self.shape, self.max_bytes = uri, shape, max_bytes
        self.int8 = meta["token_dtype"] == "int8"
        self.tokens = np.zeros((0, *shape), dtype=np.float16)
        self.rows = 0
        self._read_new_rows()

    def __len__(self) -> int:
        return self.rows

    def refresh(self) -> int:
        """Move to the newest committed version; read the rows it added; return how many."""
        latest = self.dataset.latest_version
        if latest == self.dataset.version:
            return 0
        return self._read_new_rows(self.dataset.checkout_version(latest))

    def _read_new_rows(self, dataset=None) -> int:
        """Read the rows of ``dataset`` (default: the current one) past those in memory.

        The bank moves to ``dataset`` only once its rows are in memory, so a failed read
        (storage gone, too large) is retried by the next refresh instead of being skipped.
        """
        dataset = self.dataset if dataset is None else dataset
        total = dataset.count_rows()
        new = total - self.rows
        if new <= 0:  # e.g. a compaction: same rows, new files
            self.dataset = dataset
            return 0
        size = total * self.shape[0] * self.shape[1] * 2
        if size > self.max_bytes:
            raise MemoryError(
                f"token bank {self.uri} holds {size / 1e9:.1f} GB of tokens, more than the "
                f"{self.max_bytes / 1e9:.1f} GB allowed (max_bank_bytes; default: this "
                "machine's RAM or the container's memory limit): shard it across servers"
            )
        columns = ["tokens", "token_scales"] if self.int8 else ["tokens"]
        table = dataset.to_table(columns=columns, offset=self.rows, limit=new)
        q, d = self.shape
        flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if self.int8:
            scales = table.column("token_scales").combine_chunks().flatten().to_numpy()
            block = (flat.reshape(new, q, d) * scales.reshape(new, q, 1)).astype(np.float16)
        else:
            block = flat.reshape(new, q, d)
        if len(self.tokens) < total:  # grow geometrically: appends cost amortised O(new rows)
            grown = np.empty((max(total, 2 * len(self.tokens)), q, d), dtype=np.float16)
            grown[: self.rows] = self.tokens[: self.rows]
            self.tokens = grown
        self.tokens[self.rows : total] = block
        self.rows, self.dataset = total, dataset
        return new

    def check(self, rows: np.ndarray) -> None:
        """``LookupError`` naming the first of ``rows`` the bank does not hold."""
        unknown = rows[(rows < 0) | (rows >= self.rows)]
        if unknown.size:
            raise LookupError(
                f"unknown image id {int(unknown[0])} (the bank holds ids 0..{self.rows - 1})"
                if self.rows
                else f"unknown image id {int(unknown[0])} (the bank is empty)"
            )

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float16 ``[N, Q, D]`` of ``rows``; ``LookupError`` naming the first unknown."""
        self.check(rows)
        return np.take(self.tokens, rows, axis=0)
