"""When the answer appears: the one definition of the logit-lens *emergence layer* in llava-lens."""

from __future__ import annotations

from typing import Any


def emergence_layers(ranks: Any) -> list[int]:
    """Per token, the first logit-lens row from which its rank stays 0 (top-1) to the last; -1 if never.

    ``ranks [L, S]`` as in :attr:`llava_lens.LogitLens.target_ranks` (row ``l < L - 1`` decodes
    ``blocks.l.hook_resid_pre``, so 0 = the embeddings; the last row is the model's output, where
    the generated token is top-1 under greedy decoding). A token that is top-1 at some middle row,
    loses it and regains it later emerges at the later row.
    """
    top = (ranks == 0).flip(0).int().cumprod(0).sum(0)  # length of the trailing run of top-1 rows
    n_rows = ranks.shape[0]
    return [n_rows - int(k) if k > 0 else -1 for k in top]
