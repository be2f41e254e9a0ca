"""GCMiF (eq. 7): F_ME = MP(Transformer(F_1, ..., F_51)), and the Table 5 global alternatives.

The paper gives no transformer size. We use TRANSFORMER_LAYERS = 1 pre-norm encoder layer
(norm_first, no final LayerNorm: with the paper's Adam lr 1e-3 and no warm-up, both the post-norm
layer and a final LayerNorm made the loss sit at the class-prior value for 100+ steps when
overfitting 8 samples whose features differ little; pre-norm alone fits them in ~40 steps),
TRANSFORMER_HEADS = 8 heads (32 dims each at d = 256), feed-forward TRANSFORMER_FF_MULT * d = 512,
ReLU, dropout 0.1: 527,104 parameters at d = 256. A learnable token embedding (one vector per
token, i.e. per landmark; 51 x d = 13,056) is added before the transformer: without it,
self-attention plus mean pooling cannot tell which landmark a token came from (it is permutation
invariant). It starts at std POS_STD = 0.3 (tokens arrive at ~0.5 per element), not the usual 0.02:
a landmark's movement means one class at the brow and another at the mouth, and at 0.02 the identity
is lost next to the content (chosen on synthetic seed 1, docs/experiments.md). GCMiF = 540,160
parameters; the whole model 3,444,686, 0.75% over the paper's 3,419,074 (see model/__init__.py).

Alternatives (`global_fusion`): `sa` (the above), `mean` / `max` (pooling of the tokens), `lstm`
(one LSTM layer, hidden d, over the tokens in landmark order, then mean pooling of its outputs).
`gcmif: false` (Table 3) is mean pooling of the tokens, whatever `global_fusion` says (Table 5's
"MeanPl" row equals Table 3's "LAMiF only" row, so the paper's GCMiF-off is mean pooling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GLOBAL_FUSIONS = ("sa", "mean", "max", "lstm")
TRANSFORMER_LAYERS = 1
TRANSFORMER_HEADS = 8
TRANSFORMER_FF_MULT = 2
DROPOUT = 0.1
POS_STD = 0.3  # token embedding init: which landmark a token is must be visible next to its content


class GCMiF(nn.Module):
    """Global fusion of the tokens: B x T x d -> F_ME, B x d."""

    def __init__(self, dim: int, num_tokens: int, mode: str = "sa"):
        super().__init__()
        if mode not in GLOBAL_FUSIONS:
            raise ValueError(f"global_fusion must be one of {list(GLOBAL_FUSIONS)}, got {mode!r}")
        self.mode = mode
        if mode == "sa":
            self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
            nn.init.trunc_normal_(self.pos, std=POS_STD, a=-2 * POS_STD, b=2 * POS_STD)
            layer = nn.TransformerEncoderLayer(
                dim, TRANSFORMER_HEADS, TRANSFORMER_FF_MULT * dim, DROPOUT, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, TRANSFORMER_LAYERS, enable_nested_tensor=False)
        elif mode == "lstm":
            self.lstm = nn.LSTM(dim, dim, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.mode == "sa":
            return self.encoder(tokens + self.pos).mean(dim=1)  # B x T x d -> B x d, eq. 7
        if self.mode == "lstm":
            return self.lstm(tokens)[0].mean(dim=1)  # B x T x d -> B x d
        if self.mode == "max":
            return tokens.amax(dim=1)
        return tokens.mean(dim=1)
